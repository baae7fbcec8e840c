"""``generate()``: the whole biqa-gen job as one Python call (the CLI only parses flags).

resolve references -> plan shard tasks -> check the output folder (resume or
refuse) -> run the tasks (and a recipe's walk, in rounds) -> write the manifest.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

from biqa.distortions import resolve_distortions
from biqa.fr_metrics import parse_fr_metrics

from .distribute import effective_workers, task_runner
from .manifest import build_manifest, write_manifest
from .outdir import prepare_out_dir
from .plan import (DEFAULT_IMAGE_FORMAT, DEFAULT_PER_SHARD, DEFAULT_WALK_COUNT, WALK_TYPE,
                   JobSettings, Plan)
from .progress import Progress, progress_channel
from .refs import DEFAULT_MAX_PIXELS, resolve_refs, resolve_refs_and_walk
from .walk import Walk, run_walk

# What --distortions means when a recipe is given without it.
RECIPE_DISTORTIONS = {None: "all", "kadis700k": "kadid", "vipnet": "vipnet"}


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


def _metric_names(fr_metrics) -> tuple[str, ...]:
    if not fr_metrics:
        return ()
    return parse_fr_metrics(fr_metrics if isinstance(fr_metrics, str) else ",".join(fr_metrics))


def make_plan(refs=None, refs_root=None, distortions=None, levels="1-5", out="shards",
              seed=0, per_shard=DEFAULT_PER_SHARD, image_format=None, out_format="webdataset",
              resize=None, *, max_pixels=DEFAULT_MAX_PIXELS, allow_upscale=False,
              refs_outside_root=False, fr_metrics=None, recipe=None, types_per_ref=0,
              walk_refs=None, walk_count=None) -> Plan:
    """Resolve the inputs and plan the job, without touching the output folder.

    ``distortions=None`` means the recipe's types (kadid for kadis700k, vipnet for
    vipnet), else all.  ``image_format=None`` means WebP in shards and PNG for
    ``out_format="folder"``, the loose layout older loaders read.  ``fr_metrics``:
    full-reference scores to record per sample ("ssim,ms_ssim" or names; see
    ``biqa.fr_metrics``).  Recipes (docs/generator.md): ``recipe="kadis700k"`` makes the
    (reference, type) groups a list names; ``recipe="vipnet"`` makes type 27 from the
    ``walk_refs`` list until ``walk_count`` (default 40 000) references have all five
    levels; ``types_per_ref=K`` draws K of the types for each reference.
    """
    if recipe not in RECIPE_DISTORTIONS:
        raise ValueError(f"--recipe must be one of {', '.join(filter(None, RECIPE_DISTORTIONS))}"
                         f", got {recipe!r}")
    specs = resolve_distortions(distortions or RECIPE_DISTORTIONS[recipe])
    type_ids = tuple(s.id for s in specs)
    walks = recipe == "vipnet" and WALK_TYPE in type_ids
    if walks and not walk_refs:
        raise ValueError(f"--recipe vipnet makes chromatic aberration ({WALK_TYPE}) from a "
                         "second list, walked in order: name it with --walk-refs (VIPNet: "
                         f"dataset_ref_img_140k.csv), or leave {WALK_TYPE} out of --distortions")
    if (walk_refs or walk_count is not None) and not walks:
        raise ValueError(f"--walk-refs and --walk-count belong to --recipe vipnet with type "
                         f"{WALK_TYPE} selected")
    if image_format is None:
        image_format = "png" if out_format == "folder" else DEFAULT_IMAGE_FORMAT
    settings = JobSettings(
        out_dir=os.path.abspath(out), type_ids=type_ids,
        levels=parse_levels(levels) if isinstance(levels, str) else tuple(levels),
        seed=seed, per_shard=per_shard, image_format=image_format, out_format=out_format,
        resize=parse_size(resize) if isinstance(resize, str) else resize,
        min_size=max(s.min_size for s in specs), max_pixels=max_pixels,
        allow_upscale=allow_upscale, refs_outside_root=refs_outside_root,
        fr_metrics=_metric_names(fr_metrics), recipe=recipe, types_per_ref=types_per_ref,
        walk_count=(DEFAULT_WALK_COUNT if walk_count is None else walk_count) if walks else 0)
    if walks:
        table, walk_table = resolve_refs_and_walk(refs, walk_refs, refs_root, refs_outside_root)
        return Plan(table, settings, walk_table)
    listed = type_ids if recipe == "kadis700k" else None
    return Plan(resolve_refs(refs, refs_root, refs_outside_root, listed), settings)


def generate(refs=None, refs_root=None, distortions=None, levels="1-5", out="shards",
             seed=0, per_shard=DEFAULT_PER_SHARD, image_format=None, out_format="webdataset",
             resize=None, workers=None, backend="loky", scheduler=None, overwrite=False,
             progress=True, *, max_pixels=DEFAULT_MAX_PIXELS, allow_upscale=False,
             refs_outside_root=False, fr_metrics=None, recipe=None, types_per_ref=0,
             walk_refs=None, walk_count=None, say=None) -> dict:
    """Generate (or finish) a distorted-image dataset in ``out``; returns the manifest.

    Re-running with equal arguments resumes; different arguments against the
    same ``out`` raise ValueError unless ``overwrite``, which deletes only what
    the previous job recorded (see ``outdir``).  Check ``manifest["failed"]``:
    failed shards are recorded, not raised.  ``say`` receives warnings (default:
    printed to stderr, above the progress bar).  Recipes: see ``make_plan``.
    """
    plan = make_plan(refs, refs_root, distortions, levels, out, seed, per_shard,
                     image_format, out_format, resize, max_pixels=max_pixels,
                     allow_upscale=allow_upscale, refs_outside_root=refs_outside_root,
                     fr_metrics=fr_metrics, recipe=recipe, types_per_ref=types_per_ref,
                     walk_refs=walk_refs, walk_count=walk_count)
    bar = Progress(plan.n_groups * len(plan.settings.levels), plan.n_shards, enabled=progress)
    say = say or bar.write
    executed, walk = [], None

    def on_result(result: dict) -> None:
        executed.append(result)
        bar.update(result)

    try:
        workers = effective_workers(workers, backend, scheduler, plan.n_shards + plan.n_chunks,
                                    say)
        out_dir = plan.settings.out_dir
        prepare_out_dir(plan, overwrite, say)
        write_manifest(out_dir, build_manifest(plan, [], "incomplete", run={}))
        start = time.perf_counter()
        if not progress:
            channel = contextlib.nullcontext(None)
        elif backend == "loky" and workers == 1:  # in-process: the bar is the reporter
            channel = contextlib.nullcontext(bar.advance)
        else:
            channel = progress_channel(bar.advance)
        with channel as report, bar.redirect_logging(), \
                task_runner(workers, backend, scheduler, report=report) as run:
            if plan.n_chunks:
                walk = Walk(plan, workers)
                results = run_walk(walk, run, plan.tasks(), bar.add_tasks, on_result)
            else:
                results = []
                for result in run(plan.tasks()):
                    on_result(result)
                    results.append(result)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary = walk_run = None
    if walk is not None:
        walk_run = {"rounds": walk.rounds, "chunks_run": walk.chunks_run,
                    "chunks_deleted": walk.drop_beyond()}
        results = results + walk.manifest_results()
        summary = walk.summary()
        if summary["complete"] and summary["found"] < summary["wanted"]:
            say(f"warning: the --walk-refs list holds only {summary['found']} references with "
                f"all five levels of type {summary['type']}, fewer than --walk-count "
                f"{summary['wanted']}; all of them are kept (manifest: walk)")
    fresh = [r for r in executed if r["status"] == "complete" and not r["resumed"]]
    new_samples = sum(r["samples"] for r in fresh)
    run = {"workers": workers, "backend": backend, "seconds": round(seconds, 3),
           "shards_resumed": sum(r["resumed"] for r in results),
           "samples_new": new_samples,
           "images_per_second": round(new_samples / seconds, 2) if new_samples else None,
           "regenerated": [{"shard": r["shard"], "reason": r["regenerated"]}
                           for r in sorted(executed, key=lambda r: r["index"])
                           if r.get("regenerated")]}
    if walk_run is not None:
        run["walk"] = walk_run
    failed = any(r["status"] == "failed" for r in results)
    manifest = build_manifest(plan, results, "failed" if failed else "complete", run, summary)
    write_manifest(out_dir, manifest)
    return manifest


def summary_line(manifest: dict) -> str:
    t, run = manifest["totals"], manifest["run"]
    new = (f"{run['samples_new']} new images in {run['seconds']:.1f} s "
           f"({run['images_per_second']} images/s)" if run["samples_new"]
           else f"no new images ({run['seconds']:.1f} s)")
    regenerated = (f", {len(run['regenerated'])} shards redone (manifest: run.regenerated)"
                   if run["regenerated"] else "")
    walk = manifest.get("walk")
    walked = (f"; walk: type {walk['type']} for {walk['found']} of {walk['wanted']} references "
              f"wanted, {walk['rows_walked']} list rows ({run['walk']['rounds']} rounds, "
              f"{run['walk']['chunks_deleted']} chunks made ahead and deleted)"
              if walk and "walk" in run else "")
    return (f"biqa-gen: {manifest['status']}: {t['samples']} images in {t['shards']} shards "
            f"({run['shards_resumed']} already done{regenerated}); {new}; "
            f"{t['references_skipped']} references skipped ({t['samples_skipped']} samples), "
            f"{t['not_applicable']} samples not applicable, {t['shards_failed']} shards "
            f"failed{walked}")
