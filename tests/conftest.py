"""Shared fixtures.  The reference outputs of the original generator are found
through one place: ``$BIQA_REFERENCE``, else ``../shared/reference`` beside the
checkout.  Where neither exists (a user's clone) the tests that need them skip;
under CI (``$CI`` set) they fail instead, so CI can never pass without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
