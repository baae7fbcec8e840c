"""``generate()``: the whole biqa-gen job as one Python call (the CLI only parses flags).

resolve references -> plan shard tasks -> check the output folder (resume or
refuse) -> run the tasks -> write the manifest.
"""

from __future__ import annotations

import os
import re
import time

from biqa.distortions import resolve_distortions

from .distribute import Progress, check_backend, default_workers, run_plan
from .manifest import build_manifest, prepare_out_dir, write_manifest, job_config
from .plan import DEFAULT_IMAGE_FORMAT, DEFAULT_PER_SHARD, JobSettings, Plan
from .refs import resolve_refs


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1-5"``, ``"1,3,5"`` or ``"2"`` -> sorted distinct levels in 1..5."""
    levels: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--levels {text!r}: expected e.g. 1-5 or 1,3,5")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if not 1 <= lo <= hi <= 5:
            raise ValueError(f"--levels {text!r}: levels run from 1 to 5")
        levels.update(range(lo, hi + 1))
    return tuple(sorted(levels))


def parse_size(text: str, min_side: int = 1) -> tuple[int, int]:
    """``"WxH"`` -> (W, H): every size flag in biqa is width×height."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"size {text!r}: expected WxH with integers, e.g. 384x288")
    if int(m[1]) < min_side or int(m[2]) < min_side:
        raise ValueError(f"size {text!r}: width and height must be at least {min_side}")
    return int(m[1]), int(m[2])


def make_plan(refs=None, refs_root=None, distortions="all", levels="1-5", out="shards",
              seed=0, per_shard=DEFAULT_PER_SHARD, image_format=None, out_format="webdataset",
              resize=None) -> Plan:
    """Resolve the inputs and plan the job, without touching the output folder.

    ``image_format=None`` means WebP in shards and PNG for ``out_format="folder"``,
    the loose layout older loaders read.
    """
    specs = resolve_distortions(distortions)
    if image_format is None:
        image_format = "png" if out_format == "folder" else DEFAULT_IMAGE_FORMAT
    settings = JobSettings(
        out_dir=os.path.abspath(out), type_ids=tuple(s.id for s in specs),
        levels=parse_levels(levels) if isinstance(levels, str) else tuple(levels),
        seed=seed, per_shard=per_shard, image_format=image_format, out_format=out_format,
        resize=parse_size(resize) if isinstance(resize, str) else resize,
        min_size=max(s.min_size for s in specs))
    return Plan(resolve_refs(refs, refs_root), settings)


def generate(refs=None, refs_root=None, distortions="all", levels="1-5", out="shards",
             seed=0, per_shard=DEFAULT_PER_SHARD, image_format=None, out_format="webdataset",
             resize=None, workers=None, backend="loky", scheduler=None, overwrite=False,
             progress=True) -> dict:
    """Generate (or finish) a distorted-image dataset in ``out``; returns the manifest.

    Re-running with equal arguments resumes; different arguments against the
    same ``out`` raise ValueError unless ``overwrite``.  Check
    ``manifest["failed"]``: failed shards are recorded, not raised.
    """
    plan = make_plan(refs, refs_root, distortions, levels, out, seed, per_shard,
                     image_format, out_format, resize)
    workers = workers or default_workers()
    check_backend(workers, backend, scheduler)
    out_dir = plan.settings.out_dir
    prepare_out_dir(out_dir, job_config(plan), overwrite)
    write_manifest(out_dir, build_manifest(plan, [], "incomplete", run={}))
    start = time.perf_counter()
    bar = Progress(plan.n_samples, plan.n_shards, enabled=progress)
    try:
        results = run_plan(plan, workers, backend, scheduler, on_result=bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    fresh = [r for r in results if r["status"] == "complete" and not r["resumed"]]
    new_samples = sum(r["samples"] for r in fresh)
    run = {"workers": workers, "backend": backend, "seconds": round(seconds, 3),
           "shards_resumed": sum(r["resumed"] for r in results),
           "images_per_second": round(new_samples / seconds, 2) if seconds > 0 else None}
    status = "failed" if any(r["status"] == "failed" for r in results) else "complete"
    manifest = build_manifest(plan, results, status, run)
    write_manifest(out_dir, manifest)
    return manifest


def summary_line(manifest: dict) -> str:
    t, run = manifest["totals"], manifest["run"]
    return (f"biqa-gen: {manifest['status']}: {t['samples']} images in {t['shards']} shards "
            f"({run['shards_resumed']} already done), {t['references_skipped']} references "
            f"skipped, {t['not_applicable']} not applicable, {t['shards_failed']} shards "
            f"failed; {run['seconds']:.1f} s, {run['images_per_second']} images/s")
