"""One shard task, run inside a worker: load references, distort, encode, write, report.

``run_task`` never raises: it returns the shard's stats, written last to
``stats/<shard>.json`` as the success marker for resume, or a failure record
after a bounded number of attempts (joblib's dask backend does not retry
exceptions, and a lost shard must not cost the other shards).

Before writing anything a task records in ``stats/<shard>.json`` every file it
may write (``status: "started"``), so that even a killed task's files are known
to ``--overwrite``.  The stats of a complete shard hold the sha256 of each of
its references: a shard is resumed only if its references still have those
bytes and its outputs their recorded hashes.  The worker reads each reference
anyway, so hashing it costs little next to distorting it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import traceback

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from biqa.distortions import DistortionNotApplicable, get
from biqa.distortions._matlab import psnr
from biqa.distortions.api import apply_spec_with_draws
from biqa.fr_metrics import compute_fr_metrics
from biqa.shards.writer import (MEMBER_EXTENSIONS, ShardWriter, atomic_write_bytes,
                                encode_image, file_digest)

from .outdir import record_names, recorded_output, remove_recorded
from .plan import ShardTask
from .progress import Report, TaskProgress
from .refs import ReferenceSkipped, load_reference, reference_digest, resolves_outside
from .seeding import sample_seed

DEFAULT_ATTEMPTS = 3


def shard_tar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}.tar")


def stats_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "stats", f"{name}.json")


def sample_key(ref_id: str, type_id: int, level: int) -> str:
    return f"{ref_id}_{type_id:02d}_{level:02d}"


@functools.cache
def limit_threads() -> None:
    """One thread per worker process for OpenCV and BLAS: parallelism comes from
    processes, and nested pools would oversubscribe the cores."""
    cv2.setNumThreads(1)
    threadpool_limits(1)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def read_stats(out_dir: str, name: str) -> dict | None:
    try:
        with open(stats_path(out_dir, name), "rb") as f:
            stats = json.loads(f.read())
    except (OSError, ValueError):  # missing, unreadable or half-garbage: not done
        return None
    return stats if isinstance(stats, dict) else None


def planned_names(task: ShardTask) -> list[str]:
    """Every file the task may write in ``--out``: its tar, or one image per planned sample."""
    s = task.settings
    if s.out_format == "webdataset":
        return [f"{task.name}.tar"]
    return [sample_file_name(sample_key(task.ref_ids[ref], type_id, level), s.image_format)
            for ref, type_id in task.owned_groups() for level in s.levels]


def sample_file_name(key: str, image_format: str) -> str:
    """A loose sample's file name (``--format folder``): the key and the format's extension."""
    return f"{key}.{MEMBER_EXTENSIONS[image_format]}"


def reference_digests(task: ShardTask) -> dict[str, str | None]:
    """sha256 of the bytes of each reference the task uses; None where it cannot be read
    or leads outside its root (such a reference is skipped unread)."""
    used = sorted({ref for ref, _ in task.groups()})
    return {task.ref_ids[i]: None if task.ref_roots[i] is not None
            and resolves_outside(task.ref_paths[i], task.ref_roots[i])
            else reference_digest(task.ref_paths[i]) for i in used}


def _damaged_output(task: ShardTask, stats: dict) -> str | None:
    """The first recorded output that is not this task's or lacks its recorded size and
    hash (None: all intact).  Records are claims: a name this task would not write
    counts as damage, so a crafted record cannot make the manifest list another file."""
    out_dir = task.settings.out_dir
    files = stats.get("files")
    if not isinstance(files, list) or (task.settings.out_format == "webdataset" and not files):
        return "no files recorded"
    own = set(planned_names(task))
    for entry in files:
        name = entry.get("name") if isinstance(entry, dict) else None
        path = recorded_output(out_dir, name) if name in own else None
        try:
            if path is None or os.path.getsize(path) != entry.get("size") or \
                    file_digest(path)[1] != entry.get("sha256"):
                return str(name)
        except OSError:
            return str(name)
    return None


def _well_formed(task: ShardTask, stats: dict) -> bool:
    """Whether a complete record holds what the manifest is built from, for this very task,
    and its counts add up."""
    skipped, na = stats.get("skipped"), stats.get("not_applicable")
    if not (stats.get("shard") == task.name and stats.get("index") == task.index
            and isinstance(skipped, list) and isinstance(na, list)
            and all(isinstance(e, dict) and isinstance(e.get("ref"), str) for e in skipped)
            and all(isinstance(e, dict) and type(e.get("samples")) is int for e in na)):
        return False
    counts = [stats.get(k) for k in ("samples", "samples_skipped")] + [e["samples"] for e in na]
    return all(type(c) is int and c >= 0 for c in counts) \
        and stats.get("planned") == task.planned_samples == sum(counts) \
        and (task.rows is None or _walk_record_fits(task, stats))


def _walk_record_fits(task: ShardTask, stats: dict) -> bool:
    """A walk chunk's record covers the task's rows and names as successes distinct rows of
    them, one per written group."""
    successes = stats.get("successes")
    first, stop = task.rows
    return isinstance(successes, list) and all(type(r) is int for r in successes) \
        and successes == sorted(set(successes)) and all(first <= r < stop for r in successes) \
        and len(successes) * len(task.settings.levels) == stats["samples"]


def resume_check(task: ShardTask, stats: dict | None,
                 digests: dict[str, str | None]) -> tuple[bool, str | None]:
    """(whether the shard is done, why a shard recorded complete must be redone)."""
    if not stats or stats.get("status") != "complete":
        return False, None  # never finished: nothing to explain
    if task.rows is not None and stats.get("rows") != list(task.rows):
        return False, None  # the walk cut this chunk elsewhere: its own doing, not damage
    recorded = stats.get("references")
    if not isinstance(recorded, dict) or not _well_formed(task, stats):
        return False, "its stats are from an older biqa-gen or malformed"
    changed = [r for r in digests if recorded.get(r, "") != digests[r]]
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return False, f"references changed: {', '.join(changed[:5])}{more}"
    damaged = _damaged_output(task, stats)
    if damaged is not None:
        return False, f"output damaged or missing: {damaged}"
    return True, None


def _distort_one(img: np.ndarray, ref_id: str, type_id: int, level: int, task: ShardTask):
    """(encoded image, metadata) of one sample; raises DistortionNotApplicable."""
    s = task.settings
    spec = get(type_id)
    seed = sample_seed(s.seed, ref_id, type_id, level)
    out, draws = apply_spec_with_draws(spec, img, level, np.random.default_rng(seed))
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == img.shape):
        raise RuntimeError(f"type {type_id} returned {getattr(out, 'dtype', type(out))} "
                           f"{getattr(out, 'shape', '')}, expected uint8 {img.shape}")
    quality = psnr(img, out)
    meta = {"ref": ref_id, "type": type_id, "name": spec.name, "level": level,
            "param": _jsonable(spec.params[level - 1]), "seed": seed,
            "psnr": quality if np.isfinite(quality) else None,
            "class": s.class_of(type_id, level), "draws": _jsonable(draws)}
    if s.fr_metrics:
        meta["fr"] = compute_fr_metrics(img, out, s.fr_metrics)
    return encode_image(out, s.image_format), meta


def _generate(task: ShardTask, digests: dict[str, str | None], previous_stats: dict | None,
              progress: TaskProgress) -> dict:
    """Produce the shard's outputs under their final names; returns its stats
    (``previous_stats``: what an earlier attempt recorded, if anything)."""
    s = task.settings
    wds = s.out_format == "webdataset"
    previous = set(record_names(previous_stats))
    planned = planned_names(task)
    atomic_write_bytes(stats_path(s.out_dir, task.name), _dumps({
        "shard": task.name, "index": task.index, "status": "started",
        "files": [{"name": n} for n in planned]}))
    writer = ShardWriter(shard_tar_path(s.out_dir, task.name)) if wds else None
    skipped, not_applicable, files, successes = [], [], [], []
    samples = samples_skipped = samples_na = 0
    fr_sums = {name: [0, 0.0, 0.0] for name in s.fr_metrics}  # count, sum, sum of squares
    loaded_ref, img = -1, None
    try:
        for ref, type_id in task.groups():
            if ref != loaded_ref:
                loaded_ref, img = ref, None
                try:
                    img = load_reference(task.ref_paths[ref], s.resize, s.min_size,
                                         s.max_pixels, s.allow_upscale, task.ref_roots[ref])
                except ReferenceSkipped as exc:
                    skipped.append({"ref": task.ref_ids[ref], "path": task.ref_rel[ref],
                                    "reason": str(exc)})
            if img is None:
                samples_skipped += len(s.levels)
                progress(samples, samples_skipped, samples_na)
                continue
            ref_id = task.ref_ids[ref]
            try:  # all levels of a (ref, type) or none, as the original keeps CA images
                group = [(sample_key(ref_id, type_id, level),
                          *_distort_one(img, ref_id, type_id, level, task))
                         for level in s.levels]
            except DistortionNotApplicable as exc:
                not_applicable.append({"ref": ref_id, "type": type_id,
                                       "samples": len(s.levels),
                                       "reason": str(exc) or "not applicable"})
                samples_na += len(s.levels)
                progress(samples, samples_skipped, samples_na)
                continue
            if task.rows is not None:
                successes.append(task.ref_rows[ref])
            for key, encoded, meta in group:
                if wds:
                    writer.add(key, {MEMBER_EXTENSIONS[s.image_format]: encoded,
                                     "json": _dumps(meta), "cls": str(meta["class"]).encode()})
                else:
                    name = sample_file_name(key, s.image_format)
                    atomic_write_bytes(os.path.join(s.out_dir, name), encoded)
                    files.append({"name": name, "size": len(encoded),
                                  "sha256": hashlib.sha256(encoded).hexdigest(), "meta": meta})
                samples += 1
                for name, value in meta.get("fr", {}).items():
                    if value is not None:
                        sums = fr_sums[name]
                        sums[0], sums[1], sums[2] = sums[0] + 1, sums[1] + value, \
                            sums[2] + value * value
            progress(samples, samples_skipped, samples_na)
        if wds:
            size, sha256 = writer.commit()
            files = [{"name": f"{task.name}.tar", "size": size, "sha256": sha256}]
    finally:
        if writer is not None:
            writer.abort()
    # images an earlier attempt of this very task wrote and this one did not (a reference
    # that changed and is now skipped): only names this task plans, so no record can point
    # it at another shard's files
    remove_recorded(s.out_dir, previous.intersection(planned) - {f["name"] for f in files})
    stats = {"shard": task.name, "index": task.index, "status": "complete",
             "planned": task.planned_samples, "samples": samples,
             "samples_skipped": samples_skipped, "files": files, "references": digests,
             "skipped": skipped, "not_applicable": not_applicable, "fr_sums": fr_sums}
    if task.rows is not None:  # what the walk needs: the rows made and those that succeeded
        stats.update(rows=list(task.rows), successes=sorted(successes))
    return stats


def run_task(task: ShardTask, attempts: int = DEFAULT_ATTEMPTS,
             report: Report | None = None) -> dict:
    """Run (or confirm) one shard; never raises.  Returns its stats plus ``seconds``,
    ``resumed`` and, for a shard recorded complete but redone, ``regenerated`` (why); on
    failure ``status == "failed"`` with the last error's traceback.  ``report`` receives
    running counts (see ``progress``)."""
    start = time.perf_counter()
    errors, regenerated = [], None
    for _ in range(attempts):
        try:
            limit_threads()
            digests = reference_digests(task)
            stats = read_stats(task.settings.out_dir, task.name)
            done, why = resume_check(task, stats, digests)
            if done:
                return {**stats, "resumed": True, "seconds": time.perf_counter() - start}
            regenerated = regenerated or why
            stats = _generate(task, digests, stats, TaskProgress(report, task.index))
            atomic_write_bytes(stats_path(task.settings.out_dir, task.name), _dumps(stats))
            result = {**stats, "resumed": False, "seconds": time.perf_counter() - start}
            return {**result, "regenerated": regenerated} if regenerated else result
        except Exception:  # any bug or I/O error: retry, then report, never kill the job
            errors.append(traceback.format_exc())
    return {"shard": task.name, "index": task.index, "status": "failed", "attempts": attempts,
            "planned": task.planned_samples, "samples": 0, "error": errors[-1],
            "resumed": False, "seconds": time.perf_counter() - start}
