"""VIPNet fine-tuning end to end on toy datasets: frozen branches stay frozen, the
protocol learns (SRCC > 0.8 on the test split), cross-dataset testing, biqa-score,
resume, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from biqa.cli import finetune, score
from biqa.distortions import distort
from biqa.training.data import NORMALISATION, dpm_input
from biqa.training.finetune import (FinetuneConfig, LabelScale, fixed_offsets, protocol_labels)
from biqa.training.iqa_datasets import load_dataset, split_by_content
from biqa.training.metrics import srcc
from biqa.training.models import create_model
from biqa.training.pretrain import save_checkpoint
from biqa.training.vipnet import build_vipnet
from test_iqa_datasets import (TOY_TYPES, make_toy_samples, toy_references, write_live,
                               write_tid2013)

PATCH = (64, 48)  # width, height


@pytest.fixture(autouse=True)
def one_thread(torch_threads):
    """Two shared cores: one torch thread each is fastest and deterministic."""
    torch_threads(1)


@pytest.fixture(scope="module")
def dpm_checkpoint(tmp_path_factory):
    """A tiny DPM taught to classify (type, level) on upside-down toy references (other
    content than the fine-tuning images), saved in biqa-train-dpm's checkpoint format."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    images, labels = [], []
    for ref in toy_references():
        ref = np.ascontiguousarray(ref[::-1])
        for k, kind in enumerate(TOY_TYPES):
            for level in range(1, 6):
                images.append(distort(ref, kind, level, rng=int(rng.integers(2**31))))
                labels.append(5 * k + level - 1)
    images, labels = np.stack(images), torch.tensor(labels)
    h, w = images.shape[1:3]

    def batch(idx):
        crops = []
        for i in idx:
            top, left = rng.integers(0, h - PATCH[1] + 1), rng.integers(0, w - PATCH[0] + 1)
            crop = np.ascontiguousarray(images[i, top:top + PATCH[1], left:left + PATCH[0]])
            crops.append(crop.transpose(2, 0, 1))
        return dpm_input(torch.from_numpy(np.stack(crops)))

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=10)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        idx = rng.integers(0, len(images), 32)
        loss = torch.nn.functional.cross_entropy(model(batch(idx)), labels[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    path = tmp_path_factory.mktemp("dpm") / "best.pt"
    config = {"arch": "tiny", "num_classes": 10, "input_size": list(PATCH),
              "class_table": [{"class": c} for c in range(10)], "normalisation": NORMALISATION}
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    samples = make_toy_samples()
    base = tmp_path_factory.mktemp("finetune_data")
    (base / "tid2013").mkdir()
    (base / "live").mkdir()
    return {"tid2013": write_tid2013(base / "tid2013", samples),
            "live": write_live(base / "live", samples)}


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_frozen_branches_stay_frozen_in_train_mode(dpm_checkpoint):
    model, _ = build_vipnet("tiny", dpm=dpm_checkpoint, patch_size=PATCH)
    frozen = {"cpm": _bn_state(model.cpm), "dpm": _bn_state(model.dpm)}
    head_before = model.head.weight.clone()
    optimiser = torch.optim.Adam(model.trainable_parameters(), 1e-2)
    model.train()
    assert not model.cpm.training and not model.dpm.training
    assert all(not m.training for m in model.dpm.modules())
    x = torch.randint(0, 256, (8, 3, PATCH[1], PATCH[0]), dtype=torch.uint8)
    for _ in range(3):
        loss = model(x).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for name, before in frozen.items():
        after = getattr(model, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name  # BN stats included
        assert not any(p.requires_grad for p in getattr(model, name).parameters())
    assert not torch.equal(head_before, model.head.weight)


def test_content_branch_loads_torchvision_format_weights(tmp_path):
    source = create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, config = build_vipnet("resnet18", cpm_weights=path, dpm=None, dpm_arch="tiny",
                                 patch_size=PATCH)
    assert config["cpm_weights"] == str(path)
    loaded = model.cpm.backbone.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.state_dict().items())


def test_without_dpm_the_distortion_branch_trains():
    model, config = build_vipnet("tiny", dpm=None, dpm_arch="tiny", patch_size=PATCH)
    assert config["dpm"] is None
    stats = [m.running_mean.clone() for m in model.dpm.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    model.train()
    model(torch.randint(0, 256, (4, 3, PATCH[1], PATCH[0]), dtype=torch.uint8)).sum().backward()
    after = [m.running_mean for m in model.dpm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(stats, after))
    assert all(p.grad is not None for p in model.dpm.parameters())


def test_finetune_cross_score_and_resume(toy_data, dpm_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "tid2013", "--root", str(toy_data["tid2013"]), "--dpm", str(dpm_checkpoint),
            "--cpm-arch", "tiny", "--rounds", "2", "--epochs", "6", "--patches", "3",
            "--patch-size", "64x48", "--batch-size", "8", "--lr", "1e-3",
            "--cross", f"live={toy_data['live']}", "--out", str(out), "--workers", "0",
            "--device", "cpu"]
    first = CliRunner().invoke(finetune, args)
    assert first.exit_code == 0, first.output
    assert "median" in first.output and "live SRCC" in first.output  # the summary table
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 2
    summary = {k: results[k] for k in ("median_srcc", "median_plcc", "cross")}
    assert results["median_srcc"] > 0.8 and results["median_plcc"] > 0.8, summary
    assert results["cross"]["live"]["median_srcc"] > 0.7, summary  # LIVE's DMOS: direction handled
    assert set(results["median_per_type_srcc"]) == {"additive_gaussian_noise", "gaussian_blur"}
    assert "validation" in results["protocol"]["selection"]
    assert "frozen" in results["protocol"]["dpm"]
    assert Image.open(out / "per_type_srcc.png").size[0] > 100
    data = load_dataset("tid2013", toy_data["tid2013"])
    for r in results["rounds"]:
        split = split_by_content(data.groups, r["round"], seed=0)
        assert r["test_groups"] == sorted(set(np.asarray(data.groups)[split.test]))
        assert r["n_test"] == len(split.test) and r["n_val"] == len(split.val) > 0
        assert 1 <= r["best_epoch"] <= 6

    # biqa-score: the round's model on its own test images, one line per image
    test = data.subset(split_by_content(data.groups, 0, seed=0).test)
    scored = CliRunner().invoke(score, ["--model", str(out / "round_00" / "best.pt"),
                                        "--device", "cpu", *map(str, test.paths)])
    assert scored.exit_code == 0, scored.output
    lines = [line.split("\t") for line in scored.output.strip().splitlines()]
    assert [p for p, _ in lines] == [str(p) for p in test.paths]
    values = np.array([float(v) for _, v in lines])
    assert srcc(values, test.scores) > 0.7
    assert 0 < values.mean() < 6  # on TID2013's own MOS scale
    folder = CliRunner().invoke(score, ["--model", str(out / "round_01" / "best.pt"),
                                        "--device", "cpu", str(toy_data["live"] / "wn")])
    assert folder.exit_code == 0, folder.output
    assert len(folder.output.strip().splitlines()) == 84  # every image of the folder
    small = tmp_path / "small.png"  # smaller than the 64x48 patch: enlarged, and said so
    Image.open(test.paths[0]).crop((0, 0, 40, 30)).save(small)
    scored = CliRunner().invoke(score, ["--model", str(out / "round_00" / "best.pt"),
                                        "--device", "cpu", str(small)])
    assert scored.exit_code == 0, scored.output
    assert "(40x30) is smaller than the model's patch 64x48" in scored.output
    assert [line for line in scored.output.splitlines() if "\t" in line][0].startswith(str(small))

    # an interrupted or repeated run reuses the finished rounds and gives the same results
    second = CliRunner().invoke(finetune, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("already done") == 2
    again = json.loads((out / "results.json").read_text())
    assert again["rounds"] == results["rounds"]


def test_optimistic_protocol_is_labelled_and_needs_asking():
    optimistic = protocol_labels(FinetuneConfig(dataset="tid2013", select_on_test=True))
    assert "optimistic" in optimistic["selection"] and optimistic["validation_fraction"] == 0
    assert "from scratch" in protocol_labels(FinetuneConfig(dataset="tid2013"))["dpm"]
    with pytest.raises(ValueError, match="select-on-test"):
        FinetuneConfig(dataset="tid2013", val_fraction=0.0).check()


def test_fixed_crops_are_deterministic_and_inside():
    offsets = fixed_offsets((72, 96), (48, 64), 12)
    assert offsets == fixed_offsets((72, 96), (48, 64), 12)
    assert offsets[0] == (12, 16) and len(set(offsets)) == 12
    assert all(0 <= t <= 24 and 0 <= left <= 32 for t, left in offsets)


def test_label_scale_round_trip_and_direction():
    scale = LabelScale("live", mean=40.0, std=10.0, higher_better=False)
    dmos = np.array([20.0, 40.0, 70.0])
    assert np.allclose(scale.scores(scale.targets(dmos)), dmos)
    assert np.all(np.diff(scale.targets(dmos)) < 0)  # higher DMOS -> lower quality


def test_cli_errors_are_clear(tmp_path, toy_data):
    runner = CliRunner()
    broken = tmp_path / "tid"
    broken.mkdir()
    result = runner.invoke(finetune, ["--dataset", "tid2013", "--root", str(broken)])
    assert result.exit_code == 2 and "mos_with_names.txt" in result.output
    result = runner.invoke(finetune, ["--dataset", "tid2013", "--patch-size", "64by48"])
    assert result.exit_code == 2 and "expected WxH" in result.output
    result = runner.invoke(finetune, ["--dataset", "tid2013", "--root", str(toy_data["tid2013"]),
                                      "--cross", "imagenet=/x"])
    assert result.exit_code == 2 and "imagenet" in result.output
    not_a_model = tmp_path / "model.pt"
    torch.save({"weights": 1}, not_a_model)
    result = runner.invoke(score, ["--model", str(not_a_model), str(toy_data["tid2013"])])
    assert result.exit_code == 2 and "not a biqa-finetune model" in result.output
    not_a_torch_file = tmp_path / "junk.pt"
    not_a_torch_file.write_text("junk\n")
    for command, args in ((score, ["--model", str(not_a_torch_file), str(toy_data["tid2013"])]),
                          (finetune, ["--dataset", "tid2013", "--root", str(toy_data["tid2013"]),
                                      "--patch-size", "64x48", "--dpm", str(not_a_torch_file)])):
        result = runner.invoke(command, args)
        assert result.exit_code == 2 and "cannot read it as" in result.output, result.output


def test_rounds_are_reused_only_for_the_same_inputs(toy_data, dpm_checkpoint, tmp_path):
    """Reuse is keyed by content: another DPM file under the same path, or changed labels
    under the same file name, redo the round."""
    import shutil
    root = tmp_path / "tid2013"
    shutil.copytree(toy_data["tid2013"], root)
    dpm = tmp_path / "dpm.pt"
    shutil.copy(dpm_checkpoint, dpm)
    args = ["--dataset", "tid2013", "--root", str(root), "--dpm", str(dpm), "--cpm-arch",
            "tiny", "--rounds", "1", "--epochs", "1", "--patches", "2", "--patch-size", "64x48",
            "--batch-size", "8", "--out", str(tmp_path / "run"), "--workers", "0",
            "--device", "cpu"]

    def run() -> str:
        result = CliRunner().invoke(finetune, args)
        assert result.exit_code == 0, result.output
        return result.output

    run()
    assert "already done with the same inputs" in run()
    state = torch.load(dpm, weights_only=True)  # another DPM, saved over the same path
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    save_checkpoint(dpm, state)
    assert "made from other inputs" in run()
    assert "already done with the same inputs" in run()
    labels = root / "mos_with_names.txt"
    lines = labels.read_text().splitlines()
    score_, name = lines[0].split(" ", 1)
    labels.write_text("\n".join([f"{float(score_) + 1:.5f} {name}", *lines[1:]]) + "\n")
    assert "made from other inputs" in run()


def test_paper_protocol_changes_exactly_the_published_settings(toy_data, dpm_checkpoint,
                                                               tmp_path):
    ours, paper = FinetuneConfig(dataset="kadid10k"), FinetuneConfig(dataset="kadid10k",
                                                                      protocol="paper")
    changed = {k for k, v in paper.resolved().as_dict().items() if ours.as_dict()[k] != v}
    assert changed == {"protocol", "epochs", "schedule", "early_stopping", "test_crops",
                       "logistic", "select_on_test", "val_fraction", "patches"}
    assert paper.resolved().patches == 16  # train.sh's KADID-10k setting; 12 elsewhere
    assert FinetuneConfig(dataset="tid2013", protocol="paper").resolved().patches == 12
    refused = CliRunner().invoke(finetune, ["--dataset", "tid2013", "--root",
                                            str(toy_data["tid2013"]), "--protocol", "paper",
                                            "--epochs", "3"])
    assert refused.exit_code == 2 and "--protocol paper fixes epochs" in refused.output

    out = tmp_path / "paper"
    result = CliRunner().invoke(finetune, [
        "--dataset", "tid2013", "--root", str(toy_data["tid2013"]), "--dpm", str(dpm_checkpoint),
        "--cpm-arch", "tiny", "--rounds", "1", "--patch-size", "32x24", "--out", str(out),
        "--workers", "0", "--device", "cpu", "--protocol", "paper"])
    assert result.exit_code == 0, result.output
    assert "protocol: paper" in result.output  # the printed table says so
    results = json.loads((out / "results.json").read_text())
    saved = results["config"]
    assert (saved["protocol"], saved["epochs"], saved["schedule"], saved["test_crops"],
            saved["logistic"], saved["select_on_test"], saved["patches"]) == \
        ("paper", 35, "exponential", "random", False, True, 12)
    assert "paper" in results["protocol"]["protocol"]
    assert "optimistic" in results["protocol"]["selection"]
    assert results["protocol"]["plcc"] == "raw predictions"
    history = results["rounds"][0]["history"]
    best = results["rounds"][0]["best_epoch"]
    assert len(history) == 35 or len(history) == max(best + 11, 18)  # early stopping rule


@pytest.mark.parametrize("command, args, message", [
    ("finetune_main", ["--dataset", "tid2013", "--root", "/nonexistent"], "is not a folder"),
    ("finetune_main", ["--dataset", "tid2013", "--root", "/tmp"], "mos_with_names.txt"),
    ("finetune_main", ["--dataset", "tid2013", "--device", "gpu"], "cuda:N"),
    ("finetune_main", ["--dataset", "koniq"], "'koniq' is not one of"),
    ("finetune_main", ["--dataset", "tid2013", "--root", "{toy}"],  # default patch 384x288
     "images are smaller than the patch 384x288"),
    ("score_main", ["--model", __file__, "/nonexistent.png"], "does not exist"),
    ("score_main", ["--model", __file__, "--device", "tpu", __file__], "cuda:N"),
])
def test_flag_and_input_errors_come_before_torch_is_imported(tmp_path, toy_data, command, args,
                                                             message):
    import subprocess
    import sys
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('\\ntorch imported: %s\\n' "
        "% ('torch' in sys.modules)))\n"
        f"from biqa.cli import {command}\nsys.exit({command}())\n")
    args = [arg.replace("{toy}", str(toy_data["tid2013"])) for arg in args]
    done = subprocess.run([sys.executable, str(launcher), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1500:]
    assert "torch imported: False" in done.stderr and "Traceback" not in done.stderr


def test_an_image_that_fails_to_decode_is_named_in_one_line(toy_data, tmp_path):
    """A truncated image (readable header, so it passes the size check) fails in a loader
    worker: the error names the file, without the worker's traceback."""
    import shutil
    root = tmp_path / "tid2013"
    shutil.copytree(toy_data["tid2013"], root)
    victim = sorted((root / "distorted_images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    result = CliRunner().invoke(finetune, [
        "--dataset", "tid2013", "--root", str(root), "--dpm-arch", "tiny", "--cpm-arch", "tiny",
        "--rounds", "1", "--epochs", "1", "--patches", "1", "--patch-size", "64x48",
        "--out", str(tmp_path / "run"), "--workers", "2", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"cannot read image {victim}" in result.output, result.output
    assert "Traceback" not in result.output and "worker process" not in result.output
