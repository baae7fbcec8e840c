"""biqa-gen recipes on tiny real images: KADIS-700k's (reference, type) list, K types per
reference, and VIPNet's chromatic-aberration walk (until N references have all five
levels) with its resume, worker-count and backend independence; planning them at full
size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from biqa.cli import gen
from biqa.distortions import registry, resolve_distortions
from biqa.distortions.extras import chromatic_aberration_choice
from biqa.generator import generate, make_plan
from biqa.generator.distribute import task_runner
from biqa.generator.manifest import build_manifest, write_manifest
from biqa.generator.outdir import prepare_out_dir
from biqa.generator.refs import load_reference
from biqa.generator.walk import Walk
from biqa.shards.reader import iter_groups, iter_samples, load_manifest

GEN_CMD = [sys.executable, "-c", "from biqa.cli import gen_main; gen_main()"]
SIZE = 64


def _tars(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def _without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def _keys(out) -> list[tuple[str, int, int]]:
    return [(m["ref"], m["type"], m["level"]) for _, m in iter_samples(out)]


def _texture(i: int) -> np.ndarray:
    """A colourful sine grating: chromatic aberration's search finds all five levels for
    most of these (phase and period vary with ``i``)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    period = 8 + (i * 5) % 24
    wave = np.sin(2 * np.pi * (xx + 0.5 * yy + i) / period)[..., None]
    return np.clip(128 + 40 * wave * np.array([1, 0.6, -0.8]), 0, 255).astype(np.uint8)


def _flat(i: int) -> np.ndarray:
    """A flat grey: the search finds no candidate past level 1, so type 27 drops it."""
    return np.full((SIZE, SIZE, 3), 60 + 7 * i, np.uint8)


# g: a grating, f: a flat image, in the walk list's order
WALK_PATTERN = "gffgggfgffggfgfffggfggfg"


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """ref_imgs/ and three lists in the published formats (headers included): the walk
    list (like dataset_ref_img_140k.csv), the main list = its first 8 rows (like
    dataset_ref_img.csv) and a KADIS-700k list (kadis700k_ref_imgs.csv: name, type)."""
    root = tmp_path_factory.mktemp("recipes")
    (root / "ref_imgs").mkdir()
    names = []
    for i, kind in enumerate(WALK_PATTERN):
        name = f"img-{i:02d}{kind}.png"
        Image.fromarray(_texture(i) if kind == "g" else _flat(i)).save(root / "ref_imgs" / name)
        names.append(name)
    (root / "walk.csv").write_text("img_ref\n" + "".join(f"{n}\n" for n in names))
    (root / "main.csv").write_text("img_ref\n" + "".join(f"{n}\n" for n in names[:8]))
    rows = list(zip(names[:8], [21, 11, 3, 18, 17, 23, 21, 3]))
    (root / "kadis.csv").write_text("ref_im,dist_type\n" + "".join(f"{n},{t}\n" for n, t in rows))
    return root, names, rows


# ------------------------------------------------------------------ kadis700k

def test_kadis700k_makes_exactly_the_listed_groups(lists, tmp_path):
    root, _, rows = lists
    job = dict(refs=[str(root / "kadis.csv")], refs_root=str(root / "ref_imgs"),
               recipe="kadis700k", per_shard=10, progress=False)
    manifest = generate(out=str(tmp_path / "a"), workers=1, **job)
    assert manifest["status"] == "complete"
    assert manifest["config"]["recipe"] == "kadis700k"
    expected = sorted((Path(n).stem, t, level) for n, t in rows for level in range(1, 6))
    assert sorted(_keys(tmp_path / "a")) == expected
    members = []
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        with tarfile.open(tar) as f:
            names = f.getnames()
        assert names == sorted(names)  # byte-sorted in each shard
        members += [n for n in names if n.endswith(".webp")]
    assert sorted(members) == [f"{r}_{t:02d}_{lv:02d}.webp" for r, t, lv in expected]
    assert manifest["totals"]["samples"] == manifest["totals"]["samples_planned"] == 40
    # the class table is the run's (kadid, 1..25 in order), whatever types the list uses
    assert [t["id"] for t in manifest["types"]] == list(range(1, 26))
    for _, meta in iter_samples(tmp_path / "a"):
        assert meta["class"] == (meta["type"] - 1) * 5 + meta["level"] - 1
    for group in iter_groups(tmp_path / "a"):  # a group's five levels are adjacent
        assert [m["level"] for _, m in group] == [1, 2, 3, 4, 5]

    # the list's order decides nothing; the worker count neither
    shuffled = root / "kadis_shuffled.csv"
    lines = (root / "kadis.csv").read_text().splitlines()
    shuffled.write_text("\n".join([lines[0]] + lines[:0:-1]) + "\n")
    generate(out=str(tmp_path / "b"), workers=2, **{**job, "refs": [str(shuffled)]})
    assert _tars(tmp_path / "b") == _tars(tmp_path / "a")


def test_a_reference_listed_with_two_types_gets_both_groups_adjacent(lists, tmp_path):
    root, names, _ = lists
    listing = tmp_path / "two.txt"  # the .txt form: name<TAB>type
    listing.write_text(f"{names[0]}\t21\n{names[1]}\t3\n{names[0]}\tmotion_blur\n"
                       f"{names[0]}\t21\n")
    plan = make_plan(refs=[str(listing)], refs_root=str(root / "ref_imgs"), recipe="kadis700k",
                     distortions="3,21", per_shard=5)
    groups = [(t.ref_ids[r], ty) for t in plan.tasks() for r, ty in t.groups()]
    assert groups == [("img-00g", 3), ("img-00g", 21), ("img-01f", 3)]


@pytest.mark.parametrize("content, distortions, message", [
    ("ref_im,dist_type\na.png,3\nb.png,21\n", "1-10",
     "line 3 (b.png): type 21 (pixelate) is not among the selected distortions"),
    ("ref_im,dist_type\na.png,3\nb.png,99\n", None,
     "line 3 (b.png): '99' in the second column is not a distortion type"),
    ("ref_im\na.png\n", None, "line 2 (a.png): no distortion type in the second column"),
])
def test_kadis700k_list_errors_name_the_row(tmp_path, content, distortions, message):
    listing = tmp_path / "list.csv"
    listing.write_text(content)
    args = ["--recipe", "kadis700k", "--refs", str(listing), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(gen, args + (["--distortions", distortions] if distortions
                                             else []))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_kadis700k_needs_a_list(tmp_path):
    result = CliRunner().invoke(gen, ["--recipe", "kadis700k", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "second column of a .csv/.txt list; this is not one" in result.output


# ------------------------------------------------------------------ K types per reference

def _types_by_ref(plan) -> dict[str, tuple[int, ...]]:
    by_ref: dict[str, list[int]] = {}
    for task in plan.tasks():
        for ref, type_id in task.groups():
            by_ref.setdefault(task.ref_ids[ref], []).append(type_id)
    return {ref: tuple(types) for ref, types in by_ref.items()}


def test_types_per_ref_are_seeded_by_reference_not_by_order_or_layout(tmp_path):
    names = [f"photos/p{i:04d}.png" for i in range(400)]
    forward, backward = tmp_path / "f.txt", tmp_path / "b.txt"
    forward.write_text("".join(f"{n}\n" for n in names))
    backward.write_text("".join(f"{n}\n" for n in reversed(names)))
    job = dict(distortions="kadid", types_per_ref=3, seed=5)
    types = _types_by_ref(make_plan(refs=[str(forward)], per_shard=10, **job))
    assert len(types) == 400
    assert all(len(set(t)) == 3 and t == tuple(sorted(t)) and set(t) <= set(range(1, 26))
               for t in types.values())
    # independent of list order, shard layout and the class order of --distortions
    assert _types_by_ref(make_plan(refs=[str(backward)], per_shard=35, **job)) == types
    reordered = {**job, "distortions": ",".join(map(str, range(25, 0, -1)))}
    assert _types_by_ref(make_plan(refs=[str(forward)], **reordered)) == types
    # another seed draws other types; every type is drawn about equally often
    other = _types_by_ref(make_plan(refs=[str(forward)], **{**job, "seed": 6}))
    assert sum(other[r] != types[r] for r in types) > 300
    counts = Counter(t for ts in types.values() for t in ts)
    assert len(counts) == 25 and 20 <= min(counts.values()) and max(counts.values()) <= 80


def test_types_per_ref_output_is_the_same_for_any_worker_count(tmp_path):
    job = dict(distortions="21,17,18,23,11", types_per_ref=2, resize="96x64", per_shard=10,
               seed=3, progress=False)
    one = generate(out=str(tmp_path / "one"), workers=1, **job)
    two = generate(out=str(tmp_path / "two"), workers=2, **job)
    assert _tars(tmp_path / "one") == _tars(tmp_path / "two")
    assert _without_run(one) == _without_run(two) and one["config"]["types_per_ref"] == 2
    per_ref = Counter(m["ref"] for _, m in iter_samples(tmp_path / "one"))
    assert set(per_ref.values()) == {2 * 5} and len(per_ref) == 7


@pytest.mark.parametrize("args, message", [
    (["--types-per-ref", "6", "--distortions", "1-5"],
     "--types-per-ref 6 is more than the 5 selected distortion types"),
    (["--types-per-ref", "2", "--recipe", "kadis700k"], "use one or the other"),
    (["--recipe", "vipnet"], "name it with --walk-refs"),
    (["--walk-count", "5"], "belong to --recipe vipnet with type 27 selected"),
    (["--recipe", "vipnet", "--distortions", "1-26", "--walk-refs", "x.csv"],
     "belong to --recipe vipnet with type 27 selected"),
])
def test_recipe_flag_mistakes_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(gen, ["--out", str(tmp_path / "o"), "--quiet", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the vipnet walk

WALK_JOB = dict(recipe="vipnet", distortions="21,27", walk_count=5, per_shard=15, seed=1)


def _walk_job(root) -> dict:
    return dict(refs=[str(root / "main.csv")], walk_refs=[str(root / "walk.csv")],
                refs_root=str(root / "ref_imgs"), progress=False, **WALK_JOB)


def _successes(root, names) -> list[bool]:
    """The oracle: whether the search finds all five levels for each walk row."""
    return [all(p is not None for p in chromatic_aberration_choice(
        load_reference(str(root / "ref_imgs" / n)))) for n in names]


@pytest.fixture(scope="module")
def walked(lists, tmp_path_factory):
    root, names, _ = lists
    out = tmp_path_factory.mktemp("walk")
    return out, generate(out=str(out), workers=1, **_walk_job(root))


def test_the_walk_keeps_the_first_n_successes_in_list_order(lists, walked):
    root, names, _ = lists
    out, manifest = walked
    ok = _successes(root, names)
    assert 5 < sum(ok) < len(ok) and not all(ok[:8])  # both kinds, and more than needed
    first = [i for i, good in enumerate(ok) if good][:5]
    assert (first[-1] + 1) % 3  # the last success needed is inside its chunk: a cut
    samples = _keys(out)
    made_27 = sorted({ref for ref, t, _ in samples if t == 27})
    assert made_27 == sorted(Path(names[i]).stem for i in first)
    assert sorted(k for k in samples if k[1] == 21) == sorted(
        (Path(n).stem, 21, level) for n in names[:8] for level in range(1, 6))
    walk = manifest["walk"]
    assert walk == {"type": 27, "wanted": 5, "found": 5, "rows_walked": first[-1] + 1,
                    "chunks": first[-1] // 3 + 1, "complete": True,
                    "samples_planned": (first[-1] + 1) * 5}
    # the rows walked that failed are listed as not applicable, and nothing beyond
    failed_rows = [Path(names[i]).stem for i in range(first[-1] + 1) if not ok[i]]
    assert sorted(n["ref"] for n in manifest["not_applicable"]) == sorted(failed_rows)
    assert manifest["config"]["walk_count"] == 5 and manifest["config"]["recipe"] == "vipnet"
    assert manifest["config"]["walk_references"]["count"] == len(names)
    # the manifest lists every tar there is, and only those: the speculative chunks are gone
    listed = [s["name"] for s in manifest["shards"]]
    assert listed == sorted(_tars(out)) and len(listed) == 3 + walk["chunks"]
    assert sorted(p.name for p in (out / "stats").iterdir()) == [
        n.replace(".tar", ".json") for n in listed]
    t = manifest["totals"]
    assert t["samples"] + t["not_applicable"] == t["samples_planned"] == 8 * 5 + walk[
        "samples_planned"]
    # keys in a shard are byte-sorted, a reference's levels adjacent
    for group in iter_groups(out):
        assert [m["level"] for _, m in group] == [1, 2, 3, 4, 5]


def test_the_walk_is_the_same_for_any_worker_count_and_backend(lists, walked, tmp_path):
    from dask.distributed import LocalCluster
    root, _, _ = lists
    out, manifest = walked
    two = generate(out=str(tmp_path / "loky"), workers=2, **_walk_job(root))
    assert _tars(tmp_path / "loky") == _tars(out)
    assert _without_run(two) == _without_run(manifest)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        dask = generate(out=str(tmp_path / "dask"), backend="dask",
                        scheduler=cluster.scheduler_address, workers=3, **_walk_job(root))
    assert _tars(tmp_path / "dask") == _tars(out)
    assert _without_run(dask) == _without_run(manifest)


def test_a_walk_stopped_after_its_first_round_resumes_to_the_same_bytes(lists, walked, tmp_path):
    """Round one of a walk planned for 8 workers makes every chunk of the list (most of
    them beyond the cut); the run then stops.  Re-running reuses them all, cuts the last
    chunk needed, deletes the rest: the bytes of an uninterrupted run.  A further re-run
    makes nothing (the cut chunk resumes from its recorded cut)."""
    root, names, _ = lists
    out, manifest = walked
    plan = make_plan(out=str(tmp_path), **{k: v for k, v in _walk_job(root).items()
                                           if k != "progress"})
    prepare_out_dir(plan, False, print)  # as generate() starts
    write_manifest(str(tmp_path), build_manifest(plan, [], "incomplete", run={}))
    walk = Walk(plan, workers=8)
    with task_runner(1) as run:
        first = list(run(walk.first_round()))
    assert len(first) == plan.n_chunks == 8 and all(r["status"] == "complete" for r in first)

    resumed = generate(out=str(tmp_path), workers=1, **_walk_job(root))
    assert resumed["run"]["walk"]["chunks_run"] == 1  # only the cut
    assert resumed["run"]["walk"]["chunks_deleted"] == 8 - manifest["walk"]["chunks"]
    assert _tars(tmp_path) == _tars(out)
    assert _without_run(resumed) == _without_run(manifest)

    again = generate(out=str(tmp_path), workers=2, **_walk_job(root))
    assert again["run"]["samples_new"] == 0 and again["run"]["walk"]["chunks_run"] == 0
    assert again["run"]["shards_resumed"] == len(manifest["shards"])
    assert _tars(tmp_path) == _tars(out)


def test_a_folder_walk_leaves_only_the_images_it_keeps(lists, walked, tmp_path):
    """Loose images: the chunks beyond the cut and the rows after it in the cut chunk,
    made by a first round for 8 workers, are deleted -- and nothing else is."""
    root, names, _ = lists
    _, manifest = walked
    job = {**_walk_job(root), "out_format": "folder"}
    plan = make_plan(out=str(tmp_path), **{k: v for k, v in job.items() if k != "progress"})
    prepare_out_dir(plan, False, print)
    write_manifest(str(tmp_path), build_manifest(plan, [], "incomplete", run={}))
    with task_runner(1) as run:
        made = {f["name"] for r in run(Walk(plan, workers=8).first_round()) for f in r["files"]}
    (tmp_path / "mine.png").write_bytes(b"not biqa's")
    folder = generate(out=str(tmp_path), workers=1, **job)
    kept = {f["name"] for s in folder["shards"] for f in s["files"]}
    on_disk = {p.name for p in tmp_path.glob("*.png")}
    assert on_disk == kept | {"mine.png"} and made - kept  # some were made, then deleted
    wanted = {(r, t) for r, t, _ in _keys(walked[0])}
    assert {tuple(n[:-len("_00.png")].rsplit("_", 1)) for n in kept} == {
        (r, f"{t:02d}") for r, t in wanted}
    assert folder["walk"] == manifest["walk"]


def test_a_walk_killed_anywhere_resumes_to_the_same_bytes(lists, walked, tmp_path):
    root, names, _ = lists
    out, manifest = walked
    # one row per chunk (per-shard 5): many small shards, so the kill lands mid-walk
    job = ["--recipe", "vipnet", "--distortions", "21,27", "--walk-count", "5", "--seed", "1",
           "--refs", str(root / "main.csv"), "--walk-refs", str(root / "walk.csv"),
           "--refs-root", str(root / "ref_imgs"), "--per-shard", "5", "--workers", "1"]
    clean = generate(out=str(tmp_path / "clean"), workers=2, **{**_walk_job(root),
                                                                "per_shard": 5})
    assert {r for r, t, _ in _keys(tmp_path / "clean") if t == 27} == \
        {r for r, t, _ in _keys(out) if t == 27}  # the same set, however it is chunked
    killed = tmp_path / "killed"
    proc = subprocess.Popen(GEN_CMD + job + ["--out", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "stats").glob("*.json"))) < 10 and time.monotonic() < deadline:
        assert proc.poll() is None, "biqa-gen ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_manifest(killed)["status"] == "incomplete"
    rerun = subprocess.run(GEN_CMD + job + ["--out", str(killed)], capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    assert _tars(killed) == _tars(tmp_path / "clean")
    assert _without_run(load_manifest(killed)) == _without_run(clean)


def test_a_walk_list_with_too_few_successes_keeps_them_all_and_says_so(lists, tmp_path):
    root, names, _ = lists
    said = []
    manifest = generate(out=str(tmp_path), workers=1, say=said.append,
                        **{**_walk_job(root), "walk_count": 1000})
    ok = _successes(root, names)
    assert manifest["status"] == "complete"
    assert manifest["walk"]["found"] == sum(ok) and manifest["walk"]["complete"]
    assert manifest["walk"]["rows_walked"] == len(names)
    assert any("fewer than --walk-count 1000" in line for line in said)
    assert {r for r, t, _ in _keys(tmp_path) if t == 27} == {
        Path(n).stem for n, good in zip(names, ok) if good}


def test_the_vipnet_recipe_keeps_vipnets_class_table(lists):
    root, _, _ = lists
    plan = make_plan(refs=[str(root / "main.csv")], walk_refs=[str(root / "walk.csv")],
                     refs_root=str(root / "ref_imgs"), recipe="vipnet")
    assert plan.settings.type_ids == tuple(s.id for s in resolve_distortions("vipnet"))
    assert plan.settings.walk_count == 40_000 and 27 not in plan.settings.ref_types
    assert plan.n_groups == 8 * (len(plan.settings.type_ids) - 1)
    no_27 = make_plan(refs=[str(root / "main.csv")], refs_root=str(root / "ref_imgs"),
                      recipe="vipnet", distortions="1-26,28-30")
    assert no_27.n_chunks == 0 and no_27.settings.walk_count == 0


# ------------------------------------------------------------------ planning at full size

def _planned(**job):
    """(plan, planned samples of every task, seconds, peak bytes) of planning ``job``."""
    tracemalloc.start()
    start = time.perf_counter()
    plan = make_plan(**job)
    counts = [t.planned_samples for t in plan.tasks()]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return plan, counts, seconds, peak


def test_planning_kadis700k_at_full_size_is_fast(tmp_path):
    """140 000 listed (reference, type) rows -> 700 000 samples, with no file read."""
    kadid = [s.id for s in registry() if s.family == "kadid"]
    listing = tmp_path / "kadis700k_ref_imgs.csv"
    listing.write_text("ref_im,dist_type\n" + "".join(
        f"photo-{i}.png,{kadid[(i * 7) % 25]}\n" for i in range(140_000)))
    plan, counts, seconds, peak = _planned(refs=[str(listing)], recipe="kadis700k",
                                           out=str(tmp_path / "out"))
    assert plan.n_samples == sum(counts) == 700_000 and set(counts) == {200}
    assert seconds < 20, seconds
    assert peak < 150 * 2**20, peak
    last = plan.task(plan.n_shards - 1)
    i = max(range(140_000), key=lambda i: f"photo-{i}_")  # keys sort as bytes
    assert [(last.ref_ids[r], t) for r, t in last.groups()][-1] == (f"photo-{i}",
                                                                    kadid[(i * 7) % 25])
    assert not (tmp_path / "out").exists()


def test_planning_the_vipnet_recipe_at_full_size_is_fast(tmp_path):
    """40 000 references x 29 types + the 27-walk over 140 000 rows: 6 M samples."""
    names = [f"img-{i}.png" for i in range(140_000)]
    main, walk = tmp_path / "dataset_ref_img.csv", tmp_path / "dataset_ref_img_140k.csv"
    main.write_text("img_ref\n" + "".join(f"{n}\n" for n in names[:40_000]))
    walk.write_text("img_ref\n" + "".join(f"{n}\n" for n in names))
    plan, counts, seconds, peak = _planned(refs=[str(main)], walk_refs=[str(walk)],
                                           recipe="vipnet", out=str(tmp_path / "out"))
    chunk = plan.chunk_task(plan.n_chunks - 1)
    assert plan.n_samples == (40_000 * 29 + 40_000) * 5 == 6_000_000
    assert sum(counts) == 40_000 * 29 * 5 and plan.n_chunks == 3_500
    assert seconds < 20, seconds
    assert peak < 150 * 2**20, peak
    assert chunk.rows == (139_960, 140_000) and chunk.name == "shard-032499"
    assert plan.walk_refs.ids[:3] == ("img-0", "img-1", "img-2")  # list order
    assert set(plan.walk_refs.ids[:40_000]) == set(plan.refs.ids)  # a name in both: one id
    assert not (tmp_path / "out").exists()
