"""DPM pre-training end to end on real WebDataset shards: learning, ranking, corrupt samples,
balanced ranks, checkpoints, kill + resume, 2-process torchrun, KADID evaluation, CLI errors."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.distortions import distort
from biqa.shards.reader import open_shards
from biqa.training.data import (ShardStream, crop_or_pad, deal_balanced, dpm_input,
                                split_quota, steps_per_epoch, worker_plan)
from biqa.training.pretrain import TrainConfig, load_dpm, train

from conftest import TYPES, make_shards

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def corrupt_member(shard: Path, key: str) -> None:
    """Rewrite ``shard`` with the PNG of ``key`` cut to a third of its bytes."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{key}.png":
                data = data[: len(data) // 3]
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_learns_classes_and_ranking_on_other_references(shards, tmp_path):
    """Classification + ranking from scratch; validated on references never trained on."""
    out = tmp_path / "run"
    summary = train(TrainConfig(
        shards=str(shards["train"]), val_shards=str(shards["val"]), out=str(out), arch="tiny",
        epochs=1000, max_steps=200, batch_size=32, lr=0.1, workers=1, input_size=(48, 48),
        ranking_weight=1.0, log_every=25, save_every=100,
        restart_epochs=67, val_every=1000))  # 3 steps/epoch: one cosine period, one validation
    chance = 1 / 20
    val = summary["last"]["val"]
    steps = [r for r in _metrics(out) if r["kind"] == "step"]
    print(f"val top-1 {val['top1']:.3f} (chance {chance:.3f}), per type {val['per_type']}, "
          f"pair ranking {val['pair_ranking_acc']:.3f}, rank loss "
          f"{[round(r['rank_loss'], 3) for r in steps]}")
    assert val["samples"] == 2 * 20 and val["skipped"] == 0
    assert val["top1"] >= 3 * chance
    assert val["pair_ranking_acc"] >= 0.65  # chance: 0.5
    assert (steps[-1]["rank_loss"] + steps[-2]["rank_loss"]) / 2 < 0.6 * steps[0]["rank_loss"]
    assert summary["best_acc"] >= val["top1"]
    assert [r["step"] for r in steps] == list(range(25, 201, 25))
    assert (steps[-1]["loss"] + steps[-2]["loss"]) / 2 < steps[0]["loss"]
    assert all(r["images_per_s"] > 0 and r["skipped"] == 0 for r in steps)
    assert summary["steps_per_epoch"] == 3
    assert [r["step"] for r in _metrics(out) if r["kind"] == "epoch"] == [200]
    with Image.open(out / "confusion.png") as im:
        assert im.size[0] == im.size[1] > 20 * 2
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "step", "epoch", "rng", "best_acc",
                "config"} <= set(state)
        assert state["config"]["class_table"][1] == {"id": 11, "name": "white_noise",
                                                     "class_base": 5}
        assert state["config"]["normalisation"]["mean"] == [0.448, 0.483, 0.491]
        assert set(state["quality_head"]) == {"weight", "bias"}
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 200
    model, config = load_dpm(out / "best.pt")
    assert config["arch"] == "tiny" and model.num_classes == 20
    assert not any(p.name.startswith(".") or p.name.endswith(".partial")
                   for p in out.iterdir())  # no temp files left


def test_brace_pattern_selects_shards_and_their_counts(shards):
    whole = open_shards(str(shards["train"]))
    part = open_shards(str(shards["train"] / "shard-{000001..000002}.tar"))
    assert part.urls == whole.urls[1:] and part.counts == [35, 30]
    assert part.class_table == whole.class_table and part.num_classes == 20
    url = open_shards(f"file://{shards['train']}/shard-{{000001..000002}}.tar")  # via gopen
    assert url.counts == [35, 30] and url.class_table == whole.class_table


def test_pairs_share_reference_and_type_at_two_levels(shards):
    stream = ShardStream(open_shards(str(shards["val"])), (32, 32), 8, train=True, pairs=True)
    stream.set_epoch(0)
    parts = list(stream)
    assert len(parts) == stream.steps_per_epoch()
    for part in parts:
        assert part["image"].shape == (8, 2, 32, 32, 3) and part["image"].dtype == torch.uint8
        for labels, levels in zip(part["label"].tolist(), part["level"].tolist()):
            assert labels[0] // 5 == labels[1] // 5 and levels[0] != levels[1]


def _set_manifest_sha(folder: Path, shard: str) -> None:
    """Record a shard's current sha256 in the manifest, as if biqa-gen had written it so."""
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256((folder / shard).read_bytes()).hexdigest()
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["sha256"] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _read_all(stream: ShardStream) -> tuple[int, int, list[str]]:
    """(samples, skipped samples, warnings) of one pass of an evaluation stream."""
    parts = list(stream)
    return (sum(len(p["label"]) for p in parts), sum(p["skipped"] for p in parts),
            [w for p in parts for w in p["warnings"]])


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    ref = sample_reference_paths()[0]
    data = make_shards(tmp_path / "bad", [ref], 10, image_format="png")  # 2 shards of 10
    corrupt_member(data / "shard-000000.tar", f"{ref.stem}_11_03")
    corrupt_member(data / "shard-000001.tar", f"{ref.stem}_18_05")
    # the manifest's sha256 no longer matches: both shards are refused whole, and said so
    samples, skipped, warnings = _read_all(ShardStream(open_shards(str(data)), (64, 64), 4,
                                                       train=False))
    assert (samples, skipped) == (0, 20)
    assert len(warnings) == 2 and all("sha256 differs" in w for w in warnings)
    # a corrupt image in a shard whose hash is as recorded: that one sample is skipped
    _set_manifest_sha(data, "shard-000000.tar")
    samples, skipped, warnings = _read_all(ShardStream(open_shards(str(data)), (64, 64), 4,
                                                       train=False))
    assert (samples, skipped) == (9, 11)
    assert any("does not decode" in w and "shard-000000" in w for w in warnings)
    # training fills its quota from the readable samples and counts every skip
    _set_manifest_sha(data, "shard-000001.tar")
    train_stream = ShardStream(open_shards(str(data)), (64, 64), 4, train=True)
    train_stream.set_epoch(0)
    parts = list(train_stream)
    assert len(parts) == train_stream.steps_per_epoch() == 5
    assert all(len(p["label"]) == 4 for p in parts)
    assert sum(p["skipped"] for p in parts) >= 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_fills_whole_batches_from_disjoint_shards(world):
    """Each rank's workers' shares add up to the batch, every epoch; the shards are dealt
    to exactly one (rank, worker); the number of steps is the same on every rank."""
    counts = [50, 7, 130, 64, 64, 3, 99]  # uneven, odd count
    assert steps_per_epoch(counts, world, 8) == sum(counts) // (world * 8)
    for workers in (1, 2, 3):
        for epoch in range(3):
            dealt = []
            for rank in range(world):
                plans = [worker_plan(counts, world, rank, workers, w, 8,
                                     np.random.default_rng([0, epoch])) for w in range(workers)]
                assert sum(share for _, share in plans) == 8
                for ids, share in plans:  # a share in proportion to what the worker holds
                    load = sum(counts[i] for i in ids)
                    assert abs(share - 8 * load / sum(counts[i] for p in plans for i in p[0])) < 1
                dealt += [s for ids, _ in plans for s in ids]
            assert sorted(dealt) == list(range(len(counts)))


def test_dealing_balances_loads():
    counts = [10, 10, 10, 9, 1, 1, 1]
    bins = deal_balanced(counts, 2)
    loads = sorted(sum(counts[i] for i in b) for b in bins)
    assert loads == [21, 21]
    assert split_quota(10, [3, 1, 0]) == [8, 2, 0]


def test_pixels_ycbcr_and_padding():
    """dpm_input against Pillow's YCbCr on every one of the 2^24 colours.  Pillow truncates
    (up to 1 grey level below the exact value, 1 included: RGB (77, 87, 122) has Y exactly 88
    and Pillow gives 87) and its fixed-point coefficient tables are off by up to 0.05 either
    way, so the exact difference lies in (-0.05, 1.05); measured: [-0.047, 1.007]."""
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    pil = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    for rows in range(0, 4096, 1024):
        part = torch.from_numpy(rgb[rows:rows + 1024].transpose(2, 0, 1)[None].copy())
        ours = dpm_input(part, (0, 0, 0), (1, 1, 1))[0].numpy().transpose(1, 2, 0) * 255.0
        diff = ours - pil[rows:rows + 1024]
        assert diff.min() > -0.05 and diff.max() < 1.05
    edge = torch.tensor([77, 87, 122], dtype=torch.uint8).view(1, 3, 1, 1)
    assert abs(float(dpm_input(edge, (0, 0, 0), (1, 1, 1))[0, 0]) * 255.0 - 88.0) < 1e-3
    assert pil[77 * 16 + 87 // 16, (87 % 16) * 256 + 122, 0] == 87
    rgb = rgb[:20, :30]
    padded = crop_or_pad(rgb, (24, 40), 0, 0)
    assert padded.shape == (24, 40, 3)
    assert np.array_equal(padded[2:22, 5:35], rgb)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    """A script running the CLI entry point (what the installed ``biqa-train-dpm`` does)."""
    path = tmp_path_factory.mktemp("bin") / "biqa_train_dpm.py"
    path.write_text("import sys\nfrom biqa.cli import train_dpm_main\n"
                    "sys.exit(train_dpm_main())\n")
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_checkpoint_that_cannot_be_written_is_reported_and_not_torn(shards, tmp_path,
                                                                       launcher):
    """A file-size limit (as a full disk) makes saving last.pt fail mid-write."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "full"
    done = subprocess.run([sys.executable, str(launcher), "--shards", str(shards["val"]),
                           "--out", str(out), "--arch", "tiny", "--batch-size", "8",
                           "--input-size", "32x32", "--workers", "0", "--max-steps", "2"],
                          env=_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=limited)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "last.pt").exists()
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # no torn or temp file


def test_kill_and_resume_continues_from_saved_step(shards, tmp_path, launcher):
    out = tmp_path / "resume"
    args = [sys.executable, str(launcher), "--shards", str(shards["train"]), "--out", str(out),
            "--arch", "tiny", "--batch-size", "16", "--input-size", "48x48", "--workers", "0",
            "--save-every", "5", "--log-every", "5", "--epochs", "1000"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "last.pt").exists() and \
                    torch.load(out / "last.pt", weights_only=True)["step"] >= 10:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at step 10 within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved_step = torch.load(out / "last.pt", weights_only=True)["step"]
    lines_before = len(_metrics(out))
    target = saved_step + 7
    done = subprocess.run(args + ["--resume", "--max-steps", str(target)], env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at step {saved_step}" in done.stderr
    final = torch.load(out / "last.pt", weights_only=True)
    assert final["step"] == target and final["optimizer"]["state"]  # momentum kept
    # the schedule continued: lr is the cosine value at epoch target / steps_per_epoch
    steps_per_epoch = 100 // 16
    t = target / steps_per_epoch  # below the first restart (8 epochs)
    expected_lr = 1e-4 + (0.05 - 1e-4) * (1 + math.cos(math.pi * t / 8)) / 2
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected_lr)
    resumed = [r["step"] for r in _metrics(out)[lines_before:] if r["kind"] == "step"]
    assert resumed and resumed[0] > saved_step and resumed[-1] == target


def test_two_process_torchrun_with_uneven_shards(shards, tmp_path, launcher):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
        str(launcher), "--shards", str(shards["train"]), "--out", str(out),
        "--arch", "tiny", "--batch-size", "16", "--input-size", "48x48", "--workers", "2",
        "--epochs", "2", "--log-every", "10", "--val-shards", str(shards["val"])]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    steps_per_epoch = 100 // (2 * 16)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2 * steps_per_epoch
    assert state["config"]["num_classes"] == 20
    records = _metrics(out)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert records[-1]["val"]["samples"] == 40


def test_kadid_folder_evaluation(shards, tmp_path):
    root = tmp_path / "kadid"
    (root / "images").mkdir(parents=True)
    ref = np.asarray(Image.open(sample_reference_paths()[6]).convert("RGB"))[:96, :96]
    rows = ["dist_img,ref_img,dmos,var"]
    for kind in (1, 11, 13, 18, 2):  # type 2 is not in the class table: left out
        for level in range(1, 6):
            name = f"I01_{kind:02d}_{level:02d}.png"
            image = distort(ref, kind, level, rng=level) if kind != 2 else ref
            Image.fromarray(image).save(root / "images" / name)
            rows.append(f"{name},I01.png,3.0,0.1")
    (root / "dmos.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "k"
    summary = train(TrainConfig(shards=str(shards["val"]), out=str(out), arch="tiny",
                                max_steps=3, batch_size=8, workers=0, input_size=(64, 64),
                                kadid_root=str(root)))
    kadid = summary["last"]["kadid10k"]
    assert kadid["samples"] == 20 and set(kadid["per_type"]) == {n for _, n in TYPES}
    assert (out / "confusion_kadid10k.png").is_file()


@pytest.mark.parametrize("bad, message", [
    (["--input-size", "64"], "expected WxH"),
    (["--input-size", "16x16"], "at least 32"),
    (["--shards", "/nonexistent/x-{0..3}.tar"], "no such shard"),
    (["--shards", "file:///nonexistent/x-{0..3}.tar"], "no such shard"),
    (["--shards", "http://127.0.0.1:9/x-{0..3}.tar"], "cannot read the manifest"),
    (["--ranking-weight", "1", "--batch-size", "7"], "even"),
])
def test_cli_rejects_bad_input(shards, tmp_path, launcher, bad, message):
    args = ["--shards", str(shards["val"]), "--out", str(tmp_path / "o"), "--arch", "tiny",
            "--device", "cpu"]
    for i in range(0, len(bad), 2):
        if bad[i] in args:
            args[args.index(bad[i]) + 1] = bad[i + 1]
        else:
            args += bad[i:i + 2]
    done = subprocess.run([sys.executable, str(launcher), *args], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1500:]
    assert not (tmp_path / "o" / "last.pt").exists()
