"""Shared fixtures.  The reference outputs of the original generator are found
through one place: ``$BIQA_REFERENCE``, else ``../shared/reference`` beside the
checkout.  Where neither exists (a user's clone) the tests that need them skip;
under CI (``$CI`` set) they fail instead, so CI can never pass without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from biqa.data import sample_reference_paths
from biqa.fidelity import Reference

REPO = Path(__file__).resolve().parents[1]


def _reference_root() -> tuple[Path | None, str]:
    """(folder, why not) -- $BIQA_REFERENCE when set, else ../shared/reference."""
    env = os.environ.get("BIQA_REFERENCE")
    root = Path(env) if env else REPO.parent / "shared" / "reference"
    if (root / "stats.csv").is_file():
        return root, ""
    where = f"$BIQA_REFERENCE={env}" if env else str(root)
    return None, f"reference outputs not found at {where} (no stats.csv)"


@pytest.fixture(scope="session")
def reference() -> Reference:
    root, why = _reference_root()
    if root is None:
        if os.environ.get("CI"):  # CI always has them: missing data is a failure there
            pytest.fail(why)
        pytest.skip(why + ": set $BIQA_REFERENCE or place them in ../shared/reference")
    return Reference(root)


# Types that a tiny CNN can tell apart on small crops.
TYPES = [(1, "gaussian_blur"), (11, "white_noise"), (13, "impulse_noise"), (18, "mean_shift")]
SIZE = "96x72"


def make_shards(out: Path, refs: list[Path], per_shard: int, **options) -> Path:
    """Real biqa-gen shards of the four types at 96x72 (small, so tests decode fast)."""
    from biqa.generator import generate
    manifest = generate(refs=[str(r) for r in refs], distortions=",".join(str(t) for t, _ in TYPES),
                        out=str(out), per_shard=per_shard, resize=SIZE, workers=1,
                        progress=False, **options)
    assert manifest["status"] == "complete"
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Train on five bundled references (three shards of 35/35/30 samples: odd and uneven),
    validate on two others (chelsea, coffee).  Shared, so never modify them in a test."""
    refs = sample_reference_paths()
    val = [r for r in refs if r.stem in ("chelsea", "coffee")]
    root = tmp_path_factory.mktemp("shards")
    return {"train": make_shards(root / "train", [r for r in refs if r not in val], 35),
            "val": make_shards(root / "val", val, 20)}


@pytest.fixture
def torch_threads():
    """``torch.set_num_threads`` for one test; the count before is restored after it."""
    import torch
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
