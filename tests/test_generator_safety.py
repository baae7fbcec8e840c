"""biqa-gen against a careless user and an adversary: it deletes only what it can prove it
wrote, resumes by reference content, keeps list entries inside their root, guards its
resources, names a broken manifest, stops cleanly on SIGTERM and takes its workers along
when it dies.  Each test replays the attack itself."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from biqa.cli import gen
from biqa.generator import generate, make_plan
from biqa.generator.distribute import run_plan
from biqa.generator.outdir import prepare_out_dir
from biqa.generator.progress import progress_channel
from biqa.shards.reader import iter_samples, load_manifest

GEN_CMD = [sys.executable, "-c", "from biqa.cli import gen_main; gen_main()"]
# 7 bundled references x 1 fast type x 5 levels = 35 samples in 7 shards
SMALL = ["--distortions", "21", "--resize", "128x96", "--per-shard", "5", "--workers", "1",
         "--quiet"]


def _run(out, *extra):
    return CliRunner().invoke(gen, ["--out", str(out), *SMALL, *extra])


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def _without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def _rgb(h=96, w=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _manifest_files(out) -> set[str]:
    return {f["name"] for s in load_manifest(out)["shards"] for f in s.get("files", [])} \
        or {s["name"] for s in load_manifest(out)["shards"]}


def _complete_names(out) -> set[str]:
    """Files named by the stats of complete shards."""
    names = set()
    for path in Path(out).glob("stats/*.json"):
        try:
            stats = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if stats.get("status") == "complete":
            names |= {f["name"] for f in stats["files"]}
    return names


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _running(pids) -> set[int]:
    """Those of ``pids`` that still run (zombies waiting for a reaper do not)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            alive.add(pid)
    return alive


def _wait_until(condition, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, "biqa-gen ended before the test could act"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ------------------------------------------------------------------ deletion


def test_overwrite_ignores_crafted_records_naming_files_outside_out(tmp_path):
    shared = tmp_path / "shared"
    out = shared / "out"
    assert _run(out, "--seed", "1").exit_code == 0
    elsewhere = tmp_path / "elsewhere.txt"
    above = shared / "file"
    target = tmp_path / "target.tar"
    for victim in (elsewhere, above, target):
        victim.write_text("not biqa's")
    (out / "shard-000099.tar").symlink_to(target)
    crafted = {"shard": "shard-000000", "status": "complete", "files": [
        {"name": str(elsewhere)}, {"name": "../file"}, {"name": "stats/../../file"},
        {"name": "shard-000099.tar"}, {"name": str(out / "shard-000001.tar")}]}
    (out / "stats" / "shard-000000.json").write_text(json.dumps(crafted))
    (out / "stats" / "shard-999999.json").write_text(json.dumps(crafted))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../file"
    manifest["shards"][1]["files"] = [{"name": str(elsewhere)}]
    (out / "manifest.json").write_text(json.dumps(manifest))

    replaced = _run(out, "--seed", "2", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    for victim in (elsewhere, above, target):
        assert victim.read_text() == "not biqa's"
    assert (out / "shard-000099.tar").is_symlink()  # a symlink is never biqa's file
    assert "shard-000099.tar" in replaced.output and "left in place" in replaced.output
    assert load_manifest(out)["config"]["seed"] == 2
    assert set(_tars(out)) == _manifest_files(out) | {"shard-000099.tar"}


def test_files_biqa_did_not_write_survive_runs_and_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "stats").mkdir(parents=True)
    foreign = ["big.iso.partial", "stats/mine.txt", "stats/notes.json", "readme.md",
               "shard-000001.tar.partial",                   # no biqa mark
               "notes.txt.biqa-tmp-1-0123abcd.partial",      # the mark, but not a biqa file
               "stats/x.json.biqa-tmp-1-0123abcd.partial"]
    ours = ["shard-000001.tar.biqa-tmp-99999-0123abcd.partial",
            "good_21_01.png.biqa-tmp-99999-0123abcd.partial",
            "manifest.json.biqa-tmp-99999-0123abcd.partial",
            "stats/shard-000001.json.biqa-tmp-99999-0123abcd.partial"]
    for name in foreign + ours:
        (out / name).write_bytes(b"x")
    assert _run(out, "--seed", "1").exit_code == 0
    assert all((out / n).read_bytes() == b"x" for n in foreign)
    assert not any((out / n).exists() for n in ours)
    replaced = _run(out, "--seed", "2", "--overwrite", "--levels", "1,2")
    assert replaced.exit_code == 0, replaced.output
    assert all((out / n).read_bytes() == b"x" for n in foreign)
    assert load_manifest(out)["totals"]["samples"] == 7 * 2


def test_folder_format_overwrite_after_a_killed_run_leaves_only_the_new_images(tmp_path):
    """A killed task's images were on no record; now the task records them first."""
    out = tmp_path / "out"
    killed = ["--format", "folder", "--distortions", "19", "--per-shard", "20",
              "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(GEN_CMD + killed, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill in the middle of a shard: images on disk that no complete stats name
        _wait_until(lambda: {p.name for p in out.glob("*.png")} - _complete_names(out), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert {p.name for p in out.glob("*.png")} - _complete_names(out)
    replaced = _run(out, "--format", "folder", "--overwrite")  # type 21 instead of 19
    assert replaced.exit_code == 0, replaced.output
    on_disk = {p.name for p in out.glob("*.png")}
    assert on_disk == _manifest_files(out) and len(on_disk) == 35
    assert all(n.endswith(("_21_01.png", "_21_02.png", "_21_03.png", "_21_04.png",
                           "_21_05.png")) for n in on_disk)


# ------------------------------------------------------------------ resume by content


@pytest.mark.parametrize("out_format", ["webdataset", "folder"])
def test_resume_redoes_the_shards_whose_references_changed(tmp_path, out_format):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        Image.fromarray(_rgb(seed=i)).save(refs / f"{name}.png")
    job = dict(refs=[str(refs)], distortions="21", levels="1-5", per_shard=5, workers=1,
               out_format=out_format, progress=False)
    first = generate(out=str(tmp_path / "out"), **job)
    assert first["run"]["regenerated"] == []
    Image.fromarray(_rgb(seed=9)).save(refs / "b.png")  # new content, same name
    (refs / "c.png").write_bytes(b"corrupt")  # now unreadable: its images must go
    again = generate(out=str(tmp_path / "out"), **job)
    assert again["run"]["shards_resumed"] == 1
    assert again["run"]["regenerated"] == [
        {"shard": "shard-000001", "reason": "references changed: b"},
        {"shard": "shard-000002", "reason": "references changed: c"}]
    fresh = generate(out=str(tmp_path / "fresh"), **job)
    assert _without_run(again) == _without_run(fresh)
    assert again["shards"][1]["references_sha256"] != first["shards"][1]["references_sha256"]
    if out_format == "webdataset":
        assert _tars(tmp_path / "out") == _tars(tmp_path / "fresh")
    else:
        images = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
        assert images == {p.name: p.read_bytes() for p in (tmp_path / "fresh").glob("*.png")}
        assert set(images) == _manifest_files(tmp_path / "out")
        assert not any(n.startswith("c_") for n in images)


# ------------------------------------------------------------------ references


def test_list_entries_leading_outside_the_root_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(_rgb()).save(root / "inside.png")
    Image.fromarray(_rgb(seed=1)).save(tmp_path / "secret.png")
    listing = root / "list.txt"
    listing.write_text(f"inside.png\n../secret.png\n{tmp_path / 'secret.png'}\n"
                       "sub/../inside.png\n")
    out = tmp_path / "out"
    refused = _run(out, "--refs", str(listing), "--refs-root", str(root))
    assert refused.exit_code == 2
    assert "2 entries lead outside --refs-root" in refused.output
    assert "'../secret.png'" in refused.output and str(tmp_path / "secret.png") in refused.output
    assert "--allow-refs-outside-root" in refused.output and not out.exists()
    allowed = _run(out, "--refs", str(listing), "--refs-root", str(root),
                   "--allow-refs-outside-root")
    assert allowed.exit_code == 0, allowed.output
    assert load_manifest(out)["totals"]["references"] == 2  # the same file once

    # a symlink inside the root that leads out: found by the worker, skipped with a reason
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    listing.write_text("inside.png\nlink.png\n")
    manifest = generate(refs=[str(listing)], distortions="21", levels="1",
                        out=str(tmp_path / "linked"), workers=1, progress=False)
    assert [(s["ref"], s["path"]) for s in manifest["skipped_references"]] == [
        ("link", "link.png")]
    assert "resolves outside" in manifest["skipped_references"][0]["reason"]
    used = generate(refs=[str(listing)], distortions="21", levels="1",
                    out=str(tmp_path / "linked2"), workers=1, progress=False,
                    refs_outside_root=True)
    assert used["totals"]["samples"] == 2 and used["skipped_references"] == []


def _one_bit_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width×height pixels in a few kB (decoded: ~5 bytes a pixel)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_huge_reference_is_skipped_from_its_header_without_decoding(tmp_path):
    huge = tmp_path / "refs" / "huge.png"
    huge.parent.mkdir()
    _one_bit_png(huge, 10000, 8800)  # 88 MP: under Pillow's bomb limit, over --max-pixels
    Image.fromarray(_rgb()).save(tmp_path / "refs" / "good.png")
    # peak memory of the probe process itself (VmHWM starts afresh at exec; ru_maxrss
    # would carry over the size of this pytest process)
    code = ("import re, sys\n"
            "from biqa.generator.refs import ReferenceSkipped, load_reference\n"
            "try:\n    load_reference(sys.argv[1])\n"
            "except ReferenceSkipped as exc:\n    print(exc)\n"
            "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())[1])\n")
    probe = subprocess.run([sys.executable, "-c", code, str(huge)], capture_output=True,
                           text=True, check=True)
    reason, peak_kib = probe.stdout.splitlines()
    assert reason == "too large: 10000x8800 px = 88.0 MP, more than --max-pixels 50000000"
    assert int(peak_kib) < 250 * 1024  # decoding it would take over 400 MB
    manifest = generate(refs=[str(tmp_path / "refs")], distortions="21", levels="1",
                        out=str(tmp_path / "out"), workers=1, progress=False)
    assert [s["ref"] for s in manifest["skipped_references"]] == ["huge"]
    assert manifest["totals"]["samples"] == 1


def test_resize_does_not_upscale_a_reference_below_the_minimum_without_the_flag(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(_rgb(40, 40)).save(refs / "tiny.png")
    Image.fromarray(_rgb()).save(refs / "good.png")
    job = dict(refs=[str(refs)], distortions="21", levels="2", resize="256x192", workers=1,
               progress=False)
    refused = generate(out=str(tmp_path / "refused"), **job)
    [skipped] = refused["skipped_references"]
    assert skipped["ref"] == "tiny" and skipped["reason"] == (
        "too small: 40x40 px, the selected distortions need at least 64x64; --resize "
        "upscales it only with --allow-upscale")
    upscaled = generate(out=str(tmp_path / "upscaled"), allow_upscale=True, **job)
    assert upscaled["skipped_references"] == []
    shapes = {m["ref"]: img.shape for img, m in iter_samples(tmp_path / "upscaled")}
    assert shapes == {"good": (192, 256, 3), "tiny": (192, 256, 3)}


@pytest.mark.parametrize("resize, message", [
    ("99999999x99999999", "each side must be at most 16384 px"),
    ("16384x100000", "each side must be at most 16384 px"),
    ("10000x10000", "more than --max-pixels 50000000"),
])
def test_an_absurd_resize_is_refused_before_anything_is_written(tmp_path, resize, message):
    result = CliRunner().invoke(gen, ["--out", str(tmp_path / "o"), "--resize", resize])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()
    assert make_plan(resize="10000x10000", max_pixels=0).settings.resize == (10000, 10000)


def test_workers_are_capped_at_the_tasks_and_warned_above_the_cores(tmp_path):
    job = ["--distortions", "21", "--resize", "128x96", "--per-shard", "20",
           "--workers", "100000", "--out", str(tmp_path)]
    result = subprocess.run(GEN_CMD + job, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning: --workers 100000 is more than the" in result.stderr
    manifest = load_manifest(tmp_path)
    assert manifest["totals"]["shards"] == 2 and manifest["run"]["workers"] == 2


# ------------------------------------------------------------------ the manifest


@pytest.mark.parametrize("content, problem", [
    (b"[1, 2]", "it holds a JSON list, not an object"),
    (b"not json at all", "not JSON (Expecting value: line 1 column 1"),
    (b"\xff\xfe\x00", "not JSON ("),
    (b'{"shards": []}', "it has no 'config'"),
])
def test_a_malformed_manifest_is_named_and_overwrite_replaces_it(tmp_path, content, problem):
    (tmp_path / "manifest.json").write_bytes(content)
    (tmp_path / "keep.txt").write_text("mine")
    refused = _run(tmp_path)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    text = " ".join(refused.output.split())  # click wraps long messages
    assert f"{tmp_path / 'manifest.json'} is not a biqa-gen manifest" in text
    assert problem in text and "--overwrite deletes only the shards, images and stats" in text
    assert (tmp_path / "manifest.json").read_bytes() == content
    replaced = _run(tmp_path, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert load_manifest(tmp_path)["totals"]["samples"] == 35
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_manifest_that_is_a_folder_is_never_deleted(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    (tmp_path / "manifest.json" / "inside.txt").write_text("mine")
    result = _run(tmp_path, "--overwrite")
    assert result.exit_code == 2 and "is a folder" in result.output
    assert (tmp_path / "manifest.json" / "inside.txt").read_text() == "mine"


# ------------------------------------------------------------------ processes and progress


def _slow_job(out) -> list[str]:
    """Two shards of ~3 s each (jitter at 512x384), on two worker processes."""
    return GEN_CMD + ["--distortions", "19", "--per-shard", "20", "--workers", "2",
                      "--out", str(out)]


def test_sigterm_stops_like_ctrl_c_with_status_143(tmp_path):
    proc = subprocess.Popen(_slow_job(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: len(list(tmp_path.glob("stats/*.json"))) == 2, proc)  # both started
    workers = _descendants(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "biqa-gen: terminated; completed shards are kept, re-run the same command" in err
    deadline = time.monotonic() + 10
    while _running(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(workers)
    rerun = subprocess.run(_slow_job(tmp_path), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.rglob("*.partial"))


def test_workers_end_within_seconds_when_the_main_process_is_killed(tmp_path):
    proc = subprocess.Popen(_slow_job(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until(lambda: len(list(tmp_path.glob("stats/*.json"))) == 2, proc)
        workers = _descendants(proc.pid)
        assert workers
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, not its group
        proc.wait()
        deadline = time.monotonic() + 10
        while _running(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(workers), "workers outlived the main process"
    finally:
        for pid in _running(_descendants(proc.pid)) | _running(locals().get("workers", ())):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("backend", ["loky", "dask"])
def test_workers_report_running_counts_before_their_shard_finishes(tmp_path, backend):
    plan = make_plan(distortions="21,11", resize="128x96", per_shard=20, out=str(tmp_path))
    prepare_out_dir(plan, False, print)
    messages = []
    with progress_channel(lambda *m: messages.append(m)) as report:
        results = run_plan(plan, 2, backend, report=report)
    assert len(results) == plan.n_shards == 4
    for r in results:
        counts = [m[1:] for m in messages if m[0] == r["index"]]
        assert counts, f"no running counts from {r['shard']}"
        assert min(map(sum, counts)) < r["planned"]  # sent before the shard was done
        assert all(written <= r["samples"] for written, _, _ in counts)


def test_a_full_resume_says_there_was_nothing_left_to_do(tmp_path):
    assert _run(tmp_path).exit_code == 0
    again = _run(tmp_path)
    assert again.exit_code == 0
    assert "35 images in 7 shards (7 already done); no new images" in again.output
    assert "images/s" not in again.output
