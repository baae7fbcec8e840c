"""DPM pre-training at scale, on CPU: batch mixing, sharded validation and rank-0 resume
under a 2-process gloo torchrun, integrity refusals and counts, partial checkpoints,
metrics de-duplication, the CPU precision paths, and the CLI's first seconds."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.generator import generate
from biqa.shards.reader import open_shards
from biqa.shards.writer import temp_name
from biqa.training.data import (ShardStream, batch_mixing, full_shuffle_mixing, make_loader,
                                training_batches)
from biqa.training.pretrain import (TrainConfig, model_input, evaluate_checkpoint, load_dpm,
                                    train)

from conftest import make_shards

torch.set_num_threads(1)
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def many_refs(tmp_path_factory) -> Path:
    """120 references of 64x64 (smooth random colour fields), two cheap types, five levels:
    1200 samples in 24 shards of 50 -- about two references per shard, as in real runs."""
    root = tmp_path_factory.mktemp("many")
    refs = root / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(
            refs / f"r{i:03d}.png")
    manifest = generate(refs=[str(refs)], distortions="18,21", out=str(root / "shards"),
                        per_shard=50, workers=1, progress=False, image_format="zstd")
    assert manifest["totals"]["samples"] == 1200
    return root / "shards"


# ------------------------------------------------------------------------------ mixing
@pytest.mark.parametrize("workers", [1, 4])
def test_batches_mix_references_like_a_full_shuffle(many_refs, workers):
    shards = open_shards(str(many_refs))
    stream = ShardStream(shards, (32, 32), 32, train=True)
    loader = make_loader(stream, workers, pin=False)
    batches = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        for batch in training_batches(loader, stream):
            assert len(batch["label"]) == len(batch["ref"]) == 32
            batches.append(batch["ref"])
    assert len(batches) == 2 * stream.steps_per_epoch() == 2 * (1200 // 32)
    refs = [f"r{i:03d}" for i in range(120) for _ in range(10)]
    ours, full = batch_mixing(batches), full_shuffle_mixing(refs, 32)
    print(f"workers {workers}: {ours} vs full shuffle {full}")
    assert ours["distinct_refs"] >= 0.8 * full["distinct_refs"]
    assert ours["largest_share"] <= 1.5 * full["largest_share"]


def test_pairs_come_from_one_group_and_batches_assemble_across_workers(many_refs):
    shards = open_shards(str(many_refs))
    stream = ShardStream(shards, (32, 32), 8, train=True, pairs=True)
    loader = make_loader(stream, 3, pin=False)
    stream.set_epoch(0)
    batches = list(training_batches(loader, stream))
    assert len(batches) == stream.steps_per_epoch()
    for batch in batches:
        images = torch.cat(batch["image"])
        assert images.shape == (8, 2, 32, 32, 3)
        labels, levels = batch["label"], batch["level"]
        assert (labels[:, 0] // 5 == labels[:, 1] // 5).all() and (levels[:, 0] != levels[:, 1]).all()
        assert len(batch["image"]) == 3  # a part from every worker


# ------------------------------------------------------------------------------ DDP
RANK_CWD_LAUNCHER = """import os, sys
os.chdir(os.environ["BIQA_TEST_CWD_" + os.environ.get("RANK", "0")])
from biqa.cli import train_dpm_main
sys.exit(train_dpm_main())
"""


def test_two_ranks_validate_sharded_and_resume_from_rank0_alone(shards, tmp_path):
    """Each rank runs in its own folder with a relative --out, as on machines without a
    shared file system: only rank 0's folder ever has a checkpoint."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(RANK_CWD_LAUNCHER)
    cwd = [tmp_path / "rank0", tmp_path / "rank1"]
    for folder in cwd:
        folder.mkdir()
    env = _env(BIQA_TEST_CWD_0=str(cwd[0]), BIQA_TEST_CWD_1=str(cwd[1]))
    base = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(launcher),
            "--shards", str(shards["train"]), "--val-shards", str(shards["val"]),
            "--out", "run", "--arch", "tiny", "--device", "cpu", "--batch-size", "8",
            "--input-size", "48x48", "--workers", "1", "--epochs", "1000", "--log-every", "2",
            "--save-every", "2", "--val-every", "1000"]
    done = subprocess.run(base + ["--max-steps", "4"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run0 = cwd[0] / "run"
    assert (run0 / "last.pt").is_file() and not (cwd[1] / "run" / "last.pt").exists()
    sharded = np.asarray(json.loads((run0 / "confusion.json").read_text())["confusion"])
    assert sharded.sum() == 40  # every validation sample once, over both ranks
    alone = evaluate_checkpoint(run0 / "last.pt", str(shards["val"]), batch_size=8,
                                device="cpu")
    assert np.array_equal(sharded, alone)

    done = subprocess.run(base + ["--max-steps", "7", "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} resumed from run/last.pt at step 4" in done.stderr
    assert torch.load(run0 / "last.pt", weights_only=True)["step"] == 7
    steps = [r["step"] for r in _metrics(run0) if r["kind"] == "step"]
    assert steps == [2, 4, 6, 7]  # no step written twice across the resume


def test_resume_drops_metric_lines_past_the_checkpoint_and_torn_lines(shards, tmp_path):
    out = tmp_path / "run"
    common = dict(shards=str(shards["val"]), out=str(out), arch="tiny", batch_size=8,
                  workers=0, input_size=(32, 32), log_every=1, save_every=2, epochs=1000)
    train(TrainConfig(max_steps=4, **common))
    with open(out / "metrics.jsonl", "a") as f:  # a killed run logged step 5, then tore 6
        f.write(json.dumps({"kind": "step", "step": 5}) + "\n" + '{"kind": "st')
    train(TrainConfig(max_steps=6, resume=True, **common))
    steps = [r["step"] for r in _metrics(out) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _metrics(out) if r["kind"] == "epoch"] == [4, 5, 6]  # 5: epoch end


# ------------------------------------------------------------------------------ integrity
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _eval_pass(folder: Path) -> tuple[int, int, list[str]]:
    parts = list(ShardStream(open_shards(str(folder)), (32, 32), 8, train=False))
    return (sum(len(p["label"]) for p in parts), sum(p["skipped"] for p in parts),
            [w for p in parts for w in p["warnings"]])


def test_a_shard_with_another_class_table_is_refused(tmp_path):
    ref = [sample_reference_paths()[0]]
    ours = make_shards(tmp_path / "ours", ref, 10)
    theirs = tmp_path / "theirs"  # the same types in another order: classes swapped
    generate(refs=[str(r) for r in ref], distortions="11,1,13,18", out=str(theirs),
             per_shard=10, resize="96x72", workers=1, progress=False)
    shutil.copy(theirs / "shard-000000.tar", ours / "shard-000000.tar")  # types 1 and 11
    manifest = _manifest(ours)
    manifest["shards"][0]["sha256"] = _manifest(theirs)["shards"][0]["sha256"]
    _write_manifest(ours, manifest)  # the hash matches: only the class check can catch it
    samples, skipped, warnings = _eval_pass(ours)
    assert (samples, skipped) == (10, 10)
    assert len(warnings) == 1 and "class table differs" in warnings[0]


def test_incomplete_manifest_missing_and_unreadable_shards(shards, tmp_path, capsys):
    data = _copy(shards["val"], tmp_path / "val")
    manifest = _manifest(data)
    manifest["status"] = "failed"
    _write_manifest(data, manifest)
    with pytest.raises(ValueError, match="allow-incomplete"):
        open_shards(str(data))
    assert open_shards(str(data), allow_incomplete=True).samples == 40
    manifest["status"] = "complete"
    _write_manifest(data, manifest)
    (data / "shard-000000.tar").unlink()
    left = open_shards(str(data))
    assert left.samples == 20 and left.missing_samples == 20 and len(left.missing) == 1
    summary = train(TrainConfig(shards=str(data), out=str(tmp_path / "o"), arch="tiny",
                                max_steps=2, batch_size=8, workers=0, input_size=(32, 32)))
    assert summary["skipped"] == 20
    (data / "shard-000001.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="none of its 1 shards has a usable sample.*sha256"):
        train(TrainConfig(shards=str(data), out=str(tmp_path / "o2"), arch="tiny",
                          max_steps=2, batch_size=8, workers=0, input_size=(32, 32)))
    (data / "shard-000001.tar").unlink()
    with pytest.raises(ValueError, match="none of the 2 shards"):
        open_shards(str(data))


def test_partial_checkpoints_of_a_killed_run_are_removed_and_nothing_else(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    own = Path(temp_name(str(out / "last.pt")))
    own.write_bytes(b"torn")
    foreign = [out / "big.iso.partial", out / "last.pt.partial", out / "last.pt.1-x.partial",
               out / "last.pt.123-deadbeef.partial"]  # no biqa-tmp mark: not ours
    for path in foreign:
        path.write_bytes(b"not biqa's")
    train(TrainConfig(shards=str(shards["val"]), out=str(out), arch="tiny", max_steps=1,
                      batch_size=8, workers=0, input_size=(32, 32)))
    assert not own.exists() and all(p.read_bytes() == b"not biqa's" for p in foreign)


class _Payload:
    """Stands for any object a file may carry besides tensors."""


def test_weights_only_refusal_does_not_advise_unsafe_loading(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "config": {}}, path, pickle_module=pickle)
    with pytest.raises(ValueError) as info:
        load_dpm(path)
    assert "never unpickles" in str(info.value) and "weights_only=False" not in str(info.value)


# ------------------------------------------------------------------------------ precision
def test_to_input_is_channels_last_without_a_transposing_copy():
    parts = [torch.randint(0, 256, (3, 20, 30, 3), dtype=torch.uint8) for _ in range(2)]
    x = model_input(parts, torch.device("cpu"), channels_last=True)
    assert x.shape == (6, 3, 20, 30) and x.is_contiguous(memory_format=torch.channels_last)
    assert model_input(parts, torch.device("cpu"), channels_last=False).is_contiguous()


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_cpu_autocast_with_channels_last_trains(shards, tmp_path, amp_dtype):
    out = tmp_path / amp_dtype
    summary = train(TrainConfig(shards=str(shards["train"]), out=str(out), arch="tiny",
                                max_steps=6, batch_size=16, workers=0, input_size=(48, 48),
                                log_every=3, amp=True, amp_dtype=amp_dtype, channels_last=True,
                                ranking_weight=1.0))
    assert summary["steps"] == 6
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["amp_dtype"] == amp_dtype
    if amp_dtype == "fp16":  # fp16 trains through a grad scaler, saved for resuming
        assert state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] == {}  # bf16 needs none
    assert all(np.isfinite(r["loss"]) for r in _metrics(out) if r["kind"] == "step")


def test_compiled_tiny_model_trains(shards, tmp_path):
    out = tmp_path / "compiled"
    summary = train(TrainConfig(shards=str(shards["val"]), out=str(out), arch="tiny",
                                max_steps=2, batch_size=8, workers=0, input_size=(32, 32),
                                compile=True))
    assert summary["steps"] == 2 and load_dpm(out / "last.pt")[1]["compile"] is True


# ------------------------------------------------------------------------------ CLI
TORCH_REPORTING_LAUNCHER = """import atexit, sys
atexit.register(lambda: sys.stderr.write("\\ntorch imported: %s\\n" % ("torch" in sys.modules)))
from biqa.cli import train_dpm_main
sys.exit(train_dpm_main())
"""


@pytest.fixture(scope="module")
def reporting_launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bin") / "launch.py"
    path.write_text(TORCH_REPORTING_LAUNCHER)
    return path


@pytest.mark.parametrize("bad, message", [
    (["--bogus"], "No such option"),
    (["--input-size", "16x16"], "at least 32"),
    (["--arch", "vgg"], "'vgg' is not one of"),
    (["--shards", "/nonexistent"], "no such shard folder"),
    (["--ranking-weight", "1", "--batch-size", "7"], "even"),
])
def test_flag_errors_come_before_torch_is_imported(shards, reporting_launcher, bad, message):
    args = ["--shards", str(shards["val"]), "--out", "/nonexistent/o", *bad]
    if bad[0] == "--shards":
        args = [*bad, "--out", "/nonexistent/o"]
    done = subprocess.run([sys.executable, str(reporting_launcher), *args], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1500:]
    assert "torch imported: False" in done.stderr and "Traceback" not in done.stderr


def test_cpu_defaults_are_refused_with_the_smoke_command(shards, reporting_launcher):
    # no GPU visible, so the test runs on GPU machines too
    done = subprocess.run([sys.executable, str(reporting_launcher), "--shards",
                           str(shards["val"])], env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1500:]
    first = done.stderr.splitlines()[0]
    assert first.startswith("biqa-train-dpm: 40 samples in 2 shards, 4 types (20 classes)")
    assert f"biqa-train-dpm --shards {shards['val']} --smoke" in done.stderr
    assert "Traceback" not in done.stderr


def test_smoke_recipe_finishes(shards, tmp_path, reporting_launcher):
    out = tmp_path / "smoke"
    done = subprocess.run([sys.executable, str(reporting_launcher), "--shards",
                           str(shards["train"]), "--val-shards", str(shards["val"]), "--smoke",
                           "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny at 128x96, batch 32" in done.stderr.splitlines()[0]
    assert "done: 150 steps, best validation accuracy" in done.stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 150 and state["config"]["arch"] == "tiny"
    assert state["best_acc"] > 1 / 20  # above chance on references it never saw


# ------------------------------------------------------------------------------ protocol
def test_paper_protocol_changes_exactly_the_published_settings(many_refs, tmp_path):
    ours = TrainConfig(shards=str(many_refs))
    paper = TrainConfig(shards=str(many_refs), protocol="paper")
    changed = {k for k, v in paper.for_world(2).as_dict().items() if ours.as_dict()[k] != v}
    assert changed == {"protocol", "batch_size", "schedule_every"}  # the rest agrees already
    assert paper.for_world(2).batch_size == 160 and paper.for_world(3).batch_size == 106
    out = tmp_path / "paper"
    train(TrainConfig(shards=str(many_refs), out=str(out), protocol="paper", arch="tiny",
                      input_size=(32, 32), max_steps=5, workers=0, device="cpu"))
    state = torch.load(out / "last.pt", weights_only=True)
    saved = state["config"]
    assert (saved["protocol"], saved["batch_size"], saved["schedule_every"], saved["epochs"],
            saved["lr"]) == ("paper", 320, "epoch", 40, 0.05)
    # 1200 samples / 320 = 3 steps per epoch; after step 5 the schedule is at epoch 1 exactly
    expected = 1e-4 + (0.05 - 1e-4) * (1 + math.cos(math.pi * 1 / 8)) / 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)


def test_paper_protocol_refuses_flags_it_fixes(many_refs, reporting_launcher):
    done = subprocess.run([sys.executable, str(reporting_launcher), "--shards", str(many_refs),
                           "--protocol", "paper", "--batch-size", "64", "--arch", "tiny"],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--protocol paper fixes batch_size" in done.stderr


def test_init_weights_from_a_biqa_dpm_checkpoint(shards, tmp_path):
    common = dict(shards=str(shards["val"]), arch="tiny", batch_size=8, workers=0,
                  input_size=(32, 32), max_steps=2)
    train(TrainConfig(out=str(tmp_path / "first"), **common))
    source = torch.load(tmp_path / "first" / "last.pt", weights_only=True)["model"]
    train(TrainConfig(out=str(tmp_path / "second"), init_weights=str(tmp_path / "first" /
                                                                     "last.pt"),
                      lr=1e-12, **{**common, "max_steps": 1}))
    started = torch.load(tmp_path / "second" / "last.pt", weights_only=True)["model"]
    for key, value in source.items():
        if value.is_floating_point() and "running" not in key:
            assert torch.allclose(started[key], value, atol=1e-6), key
