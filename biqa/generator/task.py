"""One shard task, run inside a worker: load references, distort, encode, write, report.

``run_task`` never raises: it returns the shard's stats, written last to
``stats/<shard>.json`` as the success marker for resume, or a failure record
after a bounded number of attempts (joblib's dask backend does not retry
exceptions, and a lost shard must not cost the other shards).
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
from biqa.distortions.api import apply_spec
from biqa.shards.writer import (MEMBER_EXTENSIONS, ShardWriter, atomic_write_bytes,
                                encode_image, file_digest)

from .plan import ShardTask
from .refs import ReferenceSkipped, load_reference
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
            return json.loads(f.read())
    except (OSError, ValueError):  # missing, unreadable or half-garbage: not done
        return None


def _outputs_intact(task: ShardTask, stats: dict) -> bool:
    """A shard counts as done only if every file it wrote still has its recorded size and hash."""
    out_dir = task.settings.out_dir
    files = stats.get("files") or []
    if task.settings.out_format == "webdataset" and not files:
        return False
    for entry in files:
        path = os.path.join(out_dir, entry["name"])
        try:
            if os.path.getsize(path) != entry["size"] or file_digest(path)[1] != entry["sha256"]:
                return False
        except FileNotFoundError:
            return False
    return True


def completed_stats(task: ShardTask) -> dict | None:
    """The stats of a previous complete run of this task, if its outputs are intact."""
    stats = read_stats(task.settings.out_dir, task.name)
    if stats and stats.get("status") == "complete" and _outputs_intact(task, stats):
        return stats
    return None


def _distort_one(img: np.ndarray, ref_id: str, type_id: int, level: int, task: ShardTask):
    """(encoded image, metadata) of one sample; raises DistortionNotApplicable."""
    s = task.settings
    spec = get(type_id)
    seed = sample_seed(s.seed, ref_id, type_id, level)
    out = apply_spec(spec, img, level, np.random.default_rng(seed))
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == img.shape):
        raise RuntimeError(f"type {type_id} returned {getattr(out, 'dtype', type(out))} "
                           f"{getattr(out, 'shape', '')}, expected uint8 {img.shape}")
    quality = psnr(img, out)
    meta = {"ref": ref_id, "type": type_id, "name": spec.name, "level": level,
            "param": _jsonable(spec.params[level - 1]), "seed": seed,
            "psnr": quality if np.isfinite(quality) else None,
            "class": s.class_of(type_id, level)}
    return encode_image(out, s.image_format), meta


def _generate(task: ShardTask) -> dict:
    """Produce the shard's outputs under their final names; returns its stats."""
    s = task.settings
    wds = s.out_format == "webdataset"
    writer = ShardWriter(shard_tar_path(s.out_dir, task.name)) if wds else None
    skipped, not_applicable, files = [], [], []
    samples = 0
    loaded_ref, img = -1, None
    try:
        for ref, type_id in task.groups():
            if ref != loaded_ref:
                loaded_ref, img = ref, None
                try:
                    img = load_reference(task.ref_paths[ref], s.resize, s.min_size)
                except ReferenceSkipped as exc:
                    skipped.append({"ref": task.ref_ids[ref], "path": task.ref_rel[ref],
                                    "reason": str(exc)})
            if img is None:
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
                continue
            for key, encoded, meta in group:
                if wds:
                    writer.add(key, {MEMBER_EXTENSIONS[s.image_format]: encoded,
                                     "json": _dumps(meta), "cls": str(meta["class"]).encode()})
                else:
                    name = f"{key}.{MEMBER_EXTENSIONS[s.image_format]}"
                    atomic_write_bytes(os.path.join(s.out_dir, name), encoded)
                    files.append({"name": name, "size": len(encoded),
                                  "sha256": hashlib.sha256(encoded).hexdigest(), "meta": meta})
                samples += 1
        if wds:
            size, sha256 = writer.commit()
            files = [{"name": f"{task.name}.tar", "size": size, "sha256": sha256}]
    finally:
        if writer is not None:
            writer.abort()
    return {"shard": task.name, "index": task.index, "status": "complete",
            "planned": task.planned_samples, "samples": samples, "files": files,
            "skipped": skipped, "not_applicable": not_applicable}


def run_task(task: ShardTask, attempts: int = DEFAULT_ATTEMPTS) -> dict:
    """Run (or confirm) one shard; never raises.  Returns its stats plus ``seconds`` and
    ``resumed``; on failure ``status == "failed"`` with the last error's traceback."""
    start = time.perf_counter()
    errors = []
    for _ in range(attempts):
        try:
            limit_threads()
            done = completed_stats(task)
            if done is not None:
                return {**done, "resumed": True, "seconds": time.perf_counter() - start}
            stats = _generate(task)
            atomic_write_bytes(stats_path(task.settings.out_dir, task.name), _dumps(stats))
            return {**stats, "resumed": False, "seconds": time.perf_counter() - start}
        except Exception:  # any bug or I/O error: retry, then report, never kill the job
            errors.append(traceback.format_exc())
    return {"shard": task.name, "index": task.index, "status": "failed", "attempts": attempts,
            "planned": task.planned_samples, "samples": 0, "error": errors[-1],
            "resumed": False, "seconds": time.perf_counter() - start}
