"""Pseudo-MOS end to end: biqa-gen records full-reference scores and the drawn values in each
sample's JSON; biqa-train-dpm ranks pairs across a reference's types by a pseudo-MOS
(PINet-style) and regresses full-reference scores (DeepFL-IQA-style weak labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.distortions import distort, get
from biqa.distortions.api import replay_draws
from biqa.fr_metrics import compute_fr_metrics
from biqa.generator import generate
from biqa.generator.refs import load_reference
from biqa.shards.reader import iter_samples
from biqa.training.pretrain import TrainConfig, train

torch.set_num_threads(1)
TYPES = "1,3,11,13,18"  # blur, motion blur (random angle), noise, impulses, mean shift


def _shards(out: Path, refs: list[Path], fr_metrics: str | None) -> Path:
    manifest = generate(refs=[str(r) for r in refs], distortions=TYPES, out=str(out),
                        per_shard=25, resize="96x72", workers=1, progress=False,
                        fr_metrics=fr_metrics)
    assert manifest["status"] == "complete"
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, Path]:
    refs = sample_reference_paths()
    val = [r for r in refs if r.stem in ("chelsea", "coffee")]
    root = tmp_path_factory.mktemp("scored")
    return {"train": _shards(root / "train", [r for r in refs if r not in val], "ssim,gmsd"),
            "val": _shards(root / "val", val, "ssim,gmsd")}


def test_samples_carry_their_scores_and_draws(scored):
    manifest = json.loads((scored["val"] / "manifest.json").read_text())
    assert manifest["config"]["fr_metrics"] == ["ssim", "gmsd"]
    refs = {r.stem: r for r in sample_reference_paths()}
    seen_types = set()
    for image, meta in iter_samples(scored["val"]):
        ref = load_reference(str(refs[meta["ref"]]), (96, 72), 64)
        assert meta["fr"] == compute_fr_metrics(ref, image, ("ssim", "gmsd"))  # lossless
        if meta["type"] == 3:  # motion blur's angle is recorded and replays the image
            assert set(meta["draws"]) == {"angle"}
            replayed = replay_draws(get(3), ref, meta["level"], meta["draws"])
            assert np.array_equal(replayed, image)
        seen_types.add(meta["type"])
    assert seen_types == {1, 3, 11, 13, 18}


def test_pseudo_mos_modes_need_the_scores_in_the_shards(tmp_path):
    bare = _shards(tmp_path / "bare", [sample_reference_paths()[0]], None)
    with pytest.raises(ValueError, match="biqa-gen --fr-metrics ssim"):
        train(TrainConfig(shards=str(bare), out=str(tmp_path / "o"), arch="tiny",
                          workers=0, input_size=(48, 48), batch_size=8, max_steps=1,
                          ranking_weight=1.0, rank_pairs="reference", pseudo_mos="ssim"))
    with pytest.raises(ValueError, match="--pseudo-mos"):
        TrainConfig(shards=str(bare), ranking_weight=1.0, rank_pairs="reference").validate()
    with pytest.raises(ValueError, match="unknown full-reference metric"):
        TrainConfig(shards=str(bare), regress=("sharpness",)).validate()


def test_cross_type_ranking_and_regression_learn_the_pseudo_mos(scored, tmp_path):
    """Ranking pairs of any two samples of one reference by SSIM, plus regression of SSIM
    and GMSD: on references never trained on, the predicted order of cross-type pairs
    agrees with SSIM better than chance, and the regressed scores correlate."""
    summary = train(TrainConfig(
        shards=str(scored["train"]), val_shards=str(scored["val"]), out=str(tmp_path / "run"),
        arch="tiny", epochs=1000, max_steps=240, batch_size=32, lr=0.05, workers=1,
        input_size=(64, 64), ranking_weight=1.0, rank_pairs="reference", pseudo_mos="ssim",
        regress=("ssim", "gmsd"), log_every=40, val_every=1000, restart_epochs=1000))
    val = summary["last"]["val"]
    print(f"cross-type pairs right {val['pair_ranking_acc']:.3f}, per-reference SRCC with SSIM "
          f"{val['pseudo_mos_srcc']:.3f}, regression SRCC {val['regression_srcc']}")
    # Seeds 0-4 gave pairs 0.65-0.92, per-reference SRCC 0.64-0.90, regression SRCC
    # 0.39-0.74 (SSIM) and 0.23-0.71 (GMSD); chance is 0.5, 0, 0 and 0.
    assert val["pair_ranking_acc"] >= 0.6 and val["pseudo_mos_srcc"] >= 0.5
    assert val["regression_srcc"]["ssim"] >= 0.3 and val["regression_srcc"]["gmsd"] >= 0.2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(state["regression_head"]) == {"weight", "bias"}
    assert state["regression_head"]["weight"].shape[0] == 2
    assert state["config"]["rank_pairs"] == "reference"


def test_regression_targets_follow_regress_whatever_the_pseudo_mos(scored):
    """The pseudo-MOS that orders pairs may also be regressed, in any position: each sample's
    targets are its scores in --regress order."""
    from biqa.shards.reader import open_shards
    from biqa.training.data import ShardStream
    truth = {tuple(np.float32([meta["fr"]["ssim"], meta["fr"]["gmsd"]]))
             for _, meta in iter_samples(scored["val"])}
    stream = ShardStream(open_shards(str(scored["val"])), (64, 64), 8, train=False,
                         pair_by="reference", rank_metric="gmsd", regress=("ssim", "gmsd"))
    rows = [tuple(row) for part in stream for row in part["targets"].numpy()]
    assert rows and set(rows) <= truth


def test_kadid_evaluation_beside_the_regression_head(scored, tmp_path):
    """KADID-10k images carry no full-reference scores: validating on them with --regress
    reports their confusion only (it used to fail on the missing targets)."""
    root = tmp_path / "kadid"
    (root / "images").mkdir(parents=True)
    ref = np.asarray(Image.open(sample_reference_paths()[6]).convert("RGB"))[:96, :96]
    rows = ["dist_img,ref_img,dmos,var"]
    for level in range(1, 6):
        name = f"I01_01_{level:02d}.png"
        Image.fromarray(distort(ref, 1, level, rng=level)).save(root / "images" / name)
        rows.append(f"{name},I01.png,3.0,0.1")
    (root / "dmos.csv").write_text("\n".join(rows) + "\n")
    summary = train(TrainConfig(shards=str(scored["val"]), out=str(tmp_path / "k"), arch="tiny",
                                max_steps=2, batch_size=8, workers=0, input_size=(64, 64),
                                regress=("ssim",), kadid_root=str(root)))
    assert summary["last"]["kadid10k"]["samples"] == 5
