"""biqa-gen end to end: real tars read back with webdataset, byte-identical output for
workers=1, loky and a real Dask LocalCluster, resume, refusal, failure, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from biqa.cli import gen
from biqa.distortions import distort, get
from biqa.generator import generate
from biqa.generator.refs import load_reference, resolve_refs
from biqa.shards.reader import iter_groups, iter_samples, load_manifest, shard_paths
from biqa.shards.writer import file_digest

# Small but real: the 7 bundled references at 128x96, a blur, two noises, a
# deterministic type and chromatic aberration (whose search finds nothing for some
# levels of such small images: the not-applicable path).
JOB = dict(distortions="21,11,3,27", levels="1-5", resize="128x96", per_shard=10, seed=7)
N_REFS, N_TYPES = 7, 4
GEN_CMD = [sys.executable, "-c", "from biqa.cli import gen_main; gen_main()"]


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def _without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def _complete_shards(out) -> int:
    """Shards whose stats say complete (a task records ``started`` before it writes)."""
    count = 0
    for path in Path(out).glob("stats/*.json"):
        try:
            count += json.loads(path.read_bytes())["status"] == "complete"
        except (OSError, ValueError):
            pass
    return count


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    manifest = generate(out=str(out), workers=1, progress=False, **JOB)
    return out, manifest


def test_shards_hold_every_planned_sample_readable_with_webdataset(baseline):
    out, manifest = baseline
    assert manifest["status"] == "complete" and manifest["failed"] == []
    t = manifest["totals"]
    assert t["samples_planned"] == N_REFS * N_TYPES * 5 and t["shards_planned"] == 14
    assert t["samples"] + t["not_applicable"] == t["samples_planned"]
    assert t["not_applicable"] > 0  # type 27 finds no candidate for some levels
    assert [s["name"] for s in manifest["types"]] == [
        "pixelate", "white_noise", "motion_blur", "chromatic_aberration"]
    assert [s["class_base"] for s in manifest["types"]] == [0, 5, 10, 15]

    samples = list(iter_samples(out))
    assert len(samples) == t["samples"]
    keys = [f"{m['ref']}_{m['type']:02d}_{m['level']:02d}" for _, m in samples]
    assert len(set(keys)) == len(keys)
    dropped = {(n["ref"], n["type"]) for n in manifest["not_applicable"]}
    assert dropped and all(n["samples"] == 5 for n in manifest["not_applicable"])
    assert not {(m["ref"], m["type"]) for _, m in samples} & dropped  # whole groups go
    base = {s["id"]: s["class_base"] for s in manifest["types"]}
    for img, meta in samples:
        assert img.shape == (96, 128, 3) and img.dtype == np.uint8
        assert set(meta) == {"ref", "type", "name", "level", "param", "seed", "psnr", "class",
                             "draws"}
        assert meta["class"] == base[meta["type"]] + meta["level"] - 1
        assert meta["draws"] or not get(meta["type"]).stochastic  # what explains it

    # every shard is listed with its true size and hash, and holds whole groups
    for entry, path in zip(manifest["shards"], shard_paths(out)):
        assert Path(path).name == entry["name"]
        assert file_digest(path) == (entry["size"], entry["sha256"])
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert names == sorted(names)
        assert {n.rsplit(".", 1)[1] for n in names} == {"webp", "json", "cls"}  # the default
        assert entry["planned"] % 5 == 0
    for group in iter_groups(out):
        levels = [m["level"] for _, m in group]
        assert levels == sorted(levels) and len({m["ref"] for _, m in group}) == 1


def test_each_sample_replays_from_its_recorded_seed(baseline):
    out, _ = baseline
    refs = resolve_refs(None)
    path_of = dict(zip(refs.ids, refs.paths))
    checked = 0
    for img, meta in iter_samples(out):
        if meta["type"] in (3, 11) and meta["level"] in (1, 5):
            ref = load_reference(path_of[meta["ref"]], (128, 96))
            assert np.array_equal(distort(ref, meta["type"], meta["level"], rng=meta["seed"]), img)
            checked += 1
    assert checked == N_REFS * 2 * 2


def test_loky_and_dask_output_is_byte_identical_to_one_worker(baseline, tmp_path):
    from dask.distributed import LocalCluster
    out, manifest = baseline
    generate(out=str(tmp_path / "loky"), workers=2, backend="loky", progress=False, **JOB)
    assert _tars(tmp_path / "loky") == _tars(out)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        dask_manifest = generate(out=str(tmp_path / "dask"), backend="dask",
                                 scheduler=cluster.scheduler_address, progress=False, **JOB)
    assert _tars(tmp_path / "dask") == _tars(out)
    assert _without_run(dask_manifest) == _without_run(manifest)
    assert _without_run(load_manifest(tmp_path / "loky")) == _without_run(manifest)


def test_resume_skips_intact_shards_and_redoes_damaged_ones(baseline, tmp_path):
    out, manifest = baseline
    first = generate(out=str(tmp_path), workers=1, progress=False, **JOB)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    again = generate(out=str(tmp_path), workers=1, progress=False, **JOB)
    assert again["run"]["shards_resumed"] == first["totals"]["shards"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == mtimes

    damaged = tmp_path / "shard-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")  # same size, other hash
    (tmp_path / "shard-000005.tar").unlink()
    fixed = generate(out=str(tmp_path), workers=1, progress=False, **JOB)
    assert fixed["run"]["shards_resumed"] == first["totals"]["shards"] - 2
    assert _tars(tmp_path) == _tars(out)
    assert _without_run(fixed) == _without_run(manifest)


def test_changed_configuration_is_refused_unless_overwrite(tmp_path):
    runner = CliRunner()
    args = ["--out", str(tmp_path), "--distortions", "21", "--resize", "128x96",
            "--per-shard", "5", "--workers", "1", "--quiet"]
    assert runner.invoke(gen, args + ["--seed", "7"]).exit_code == 0
    old = _tars(tmp_path)
    refused = runner.invoke(gen, args + ["--seed", "8"])
    assert refused.exit_code == 2
    assert "different biqa-gen job" in refused.output and "seed: 7 -> 8" in refused.output
    assert _tars(tmp_path) == old
    replaced = runner.invoke(gen, args + ["--seed", "8", "--overwrite", "--levels", "1,3"])
    assert replaced.exit_code == 0, replaced.output
    manifest = load_manifest(tmp_path)
    assert manifest["config"]["seed"] == 8 and manifest["levels"] == [1, 3]
    assert {m["level"] for _, m in iter_samples(tmp_path)} == {1, 3}
    assert manifest["totals"]["samples"] == N_REFS * 2


@pytest.mark.parametrize("args, message", [
    (["--levels", "0-3"], "levels run from 1 to 5"),
    (["--resize", "32x32"], "smaller than the selected distortions need"),
    (["--resize", "big"], "expected WxH"),
    (["--distortions", "nope"], "unknown distortion name"),
    (["--refs", "/no/such/folder"], "no such folder"),
    (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --backend dask"),
])
def test_bad_arguments_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(gen, ["--out", str(tmp_path / "o"), "--quiet", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_failing_shard_is_retried_recorded_and_exits_nonzero(tmp_path):
    (tmp_path / "stats" / "shard-000001.json").mkdir(parents=True)  # its stats cannot be written
    args = ["--out", str(tmp_path), "--distortions", "21", "--resize", "128x96",
            "--per-shard", "5", "--workers", "1"]
    result = CliRunner().invoke(gen, args)
    assert result.exit_code == 1
    assert "shard-000001 failed after 3 attempts" in result.output
    assert "biqa-gen: failed: 30 images in 6 shards" in result.output  # summary line
    manifest = load_manifest(tmp_path)
    assert manifest["status"] == "failed" and manifest["totals"]["shards_failed"] == 1
    assert [f["shard"] for f in manifest["failed"]] == ["shard-000001"]
    assert "IsADirectoryError" in manifest["failed"][0]["error"]
    assert len(manifest["shards"]) == 6  # the others are kept
    (tmp_path / "stats" / "shard-000001.json").rmdir()
    resumed = CliRunner().invoke(gen, args + ["--quiet"])
    assert resumed.exit_code == 0 and "(6 already done)" in resumed.output


def test_kill_9_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    job = ["--distortions", "19", "--resize", "128x96", "--per-shard", "5", "--seed", "3",
           "--workers", "1"]
    expected = generate(out=str(tmp_path / "clean"), distortions="19", resize="128x96",
                        per_shard=5, seed=3, workers=1, progress=False)
    clean = _tars(tmp_path / "clean")
    out = tmp_path / "killed"
    proc = subprocess.Popen(GEN_CMD + job + ["--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _complete_shards(out) and time.monotonic() < deadline:
        assert proc.poll() is None, "biqa-gen ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _complete_shards(out)
    assert 1 <= done < len(clean)
    assert load_manifest(out)["status"] == "incomplete"
    for name, data in _tars(out).items():  # whatever carries a final name is complete
        assert data == clean[name]

    rerun = subprocess.run(GEN_CMD + job + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({done} already done)" in rerun.stdout
    assert _tars(out) == clean
    assert _without_run(load_manifest(out)) == _without_run(expected)
    assert not list(out.rglob("*.partial"))
    assert "already done" in rerun.stderr  # plain log lines when not on a terminal


def test_ctrl_c_keeps_complete_shards_and_says_how_to_resume(tmp_path):
    job = ["--distortions", "19", "--resize", "128x96", "--per-shard", "5", "--workers", "1",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(GEN_CMD + job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not _complete_shards(tmp_path) and time.monotonic() < deadline:
        assert proc.poll() is None, "biqa-gen ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "re-run the same command" in err
    rerun = subprocess.run(GEN_CMD + job, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout and not list(tmp_path.rglob("*.partial"))


def test_failed_writes_leave_no_partial_files_and_a_rerun_completes(tmp_path):
    """A file-size limit makes every shard write fail (EFBIG), as a full disk would."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    job = GEN_CMD + ["--distortions", "1", "--per-shard", "5", "--workers", "1",
                     "--out", str(tmp_path)]
    failed = subprocess.run(job, capture_output=True, text=True, preexec_fn=limited)
    assert failed.returncode == 1
    assert "failed after" in failed.stderr and "File too large" in failed.stderr
    manifest = load_manifest(tmp_path)
    assert manifest["status"] != "complete" and len(manifest["failed"]) == 7
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.glob("*.tar"))
    rerun = subprocess.run(job, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert load_manifest(tmp_path)["totals"]["samples"] == 35
    assert not list(tmp_path.rglob("*.partial"))


def test_folder_format_writes_loose_images(tmp_path):
    manifest = generate(out=str(tmp_path), distortions="21", levels="2", resize="128x96",
                        out_format="folder", workers=1, progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    refs = resolve_refs(None)
    assert files == sorted(f"{r}_21_02.png" for r in refs.ids)
    entries = [f for s in manifest["shards"] for f in s["files"]]
    assert sorted(e["name"] for e in entries) == files
    for e in entries:
        assert file_digest(str(tmp_path / e["name"])) == (e["size"], e["sha256"])
        assert e["meta"]["class"] == 1
    with pytest.raises(ValueError, match="--format folder"):
        shard_paths(tmp_path)


def test_folder_format_in_zstd_resumes_and_overwrites_its_own_files(tmp_path):
    """Loose zstd samples are planned, written and recognised under one name (.npy.zst):
    the same job again resumes every shard; another job with --overwrite removes them."""
    args = dict(out=str(tmp_path), levels="2", resize="128x96", out_format="folder",
                image_format="zstd", workers=1, progress=False)
    first = generate(distortions="21", **args)
    names = sorted(p.name for p in tmp_path.glob("*.npy.zst"))
    assert names and len(names) == first["totals"]["samples"]
    again = generate(distortions="21", **args)
    assert again["run"]["shards_resumed"] == first["totals"]["shards"]
    generate(distortions="1", overwrite=True, **args)
    assert not list(tmp_path.glob("*_21_02.npy.zst")) and list(tmp_path.glob("*_01_02.npy.zst"))


def test_generator_does_not_import_torch():
    code = ("import sys, biqa.generator, biqa.generator.preview, biqa.shards.reader, biqa.cli; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_contact_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    ref = resolve_refs(None).paths[0]
    result = CliRunner().invoke(gen, ["--preview", str(out), "--refs", ref,
                                      "--distortions", "21,11", "--resize", "256x192"])
    assert result.exit_code == 0, result.output
    from PIL import Image
    sheet = np.asarray(Image.open(out).convert("RGB"))
    # label column + 5 thumbnails of 192 px; header + reference row + 2 type rows
    assert sheet.shape[1] == 190 + 5 * 192
    assert sheet.shape[0] == 22 + 3 * (144 + 14)
    row = 22 + 2 * (144 + 14)  # white_noise row: its thumbnails differ across levels
    cells = [sheet[row:row + 144, 190 + c * 192:190 + (c + 1) * 192] for c in range(5)]
    assert all(c.std() > 10 for c in cells)
    assert not np.array_equal(cells[0], cells[4])


def test_progress_counts_written_skipped_and_not_applicable_as_a_bar_or_log_lines():
    """Running counts from workers move the bar; a finished shard's stats replace them;
    shards found already done leave the count (and the rate) of this run's work."""
    import io
    from biqa.generator.progress import Progress
    results = [  # 10 planned each: 5 written + 5 of a skipped reference; failed; resumed;
        # 5 written + 5 not applicable
        {"shard": "shard-000000", "index": 0, "status": "complete", "planned": 10,
         "samples": 5, "samples_skipped": 5, "resumed": False},
        {"shard": "shard-000001", "index": 1, "status": "failed", "planned": 10,
         "samples": 0, "resumed": False},
        {"shard": "shard-000002", "index": 2, "status": "complete", "planned": 10,
         "samples": 10, "samples_skipped": 0, "resumed": True},
        {"shard": "shard-000003", "index": 3, "status": "complete", "planned": 10,
         "samples": 5, "samples_skipped": 0, "resumed": False},
    ]
    for tty in (True, False):
        stream = io.StringIO()
        progress = Progress(40, 4, stream=stream, tty=tty, log_every=0)
        progress.advance(0, 2, 0, 0)
        progress.advance(3, 5, 0, 0)
        assert progress.processed == 7 and (tty or "7/40 samples processed" in stream.getvalue())
        progress.advance(0, 1, 0, 0)  # a retried attempt starts its counts afresh
        assert progress.processed == 6
        for r in results:
            progress.update(r)
        progress.advance(0, 4, 0, 0)  # arrived after the shard's result: ignored
        assert (progress.written, progress.skipped, progress.not_applicable,
                progress.failed_samples) == (10, 5, 5, 10)
        assert progress.processed == 30 and progress.to_do == 30
        progress.close()
        text = stream.getvalue()
        if tty:
            assert "30/30" in text and "img/s" in text
            assert ("4/4 shards, 10 written, 5 skipped, 5 n/a, 1 shards already done, "
                    "1 shards failed") in text
        else:
            lines = text.splitlines()
            assert len(lines) == 3 + 4  # three running updates, four finished shards
            assert "shard-000001 failed" in lines[4] and "shard-000002 already done" in lines[5]
            assert lines[-1].endswith(
                "4/4 shards (1 already done, 1 failed), 30/30 samples processed (10 written, "
                "5 skipped, 5 not applicable); " + lines[-1].split("); ")[-1])
            assert "images/s, ETA" in lines[-1]


def test_log_records_and_warnings_print_above_the_bar_not_inside_it():
    """In a fresh process, as in biqa-gen: a logger with its own console handler, one with
    none (logging's last resort), a warning and biqa's own message, while a bar shows."""
    code = """if True:
        import logging, sys, warnings
        from biqa.generator.progress import Progress
        logging.getLogger("distributed").addHandler(logging.StreamHandler(sys.stderr))
        progress = Progress(10, 1, stream=sys.stderr, tty=True)
        with progress.redirect_logging():
            progress.advance(0, 5, 0, 0)
            logging.getLogger("distributed.worker").warning("a log record")
            logging.getLogger("elsewhere").warning("no handler at all")
            warnings.warn("a warning", UserWarning)
            progress.write("a message")
            progress.advance(0, 7, 0, 0)
        progress.close()
        logging.getLogger("distributed").warning("after the bar")
    """
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    lines = err.replace("\r", "\n").splitlines()
    for text in ("a log record", "no handler at all", "UserWarning: a warning",
                 "biqa-gen: a message", "after the bar"):
        [line] = [ln for ln in lines if text in ln]
        assert "img" not in line  # on a line of its own, not glued to the bar
    assert "7/10" in err
