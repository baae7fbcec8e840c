"""``manifest.json``: the run's configuration, type table, shards and what was left out.

It is written at the start (``status: "incomplete"``, so a killed run can be
recognised and resumed) and again at the end from the shards' stats.  All of it
but the ``run`` section is a function of the configuration and the inputs, so
equal jobs have equal manifests however they were run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from biqa.distortions import get
from biqa.shards.writer import atomic_write_bytes

from .plan import Plan

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def manifest_path(out_dir: str) -> str:
    return os.path.join(out_dir, MANIFEST_NAME)


def type_table(plan: Plan) -> list[dict]:
    """Types in run order with their class base (``class = class_base + level − 1``)."""
    return [{"id": t, "name": get(t).name, "family": get(t).family, "class_base": 5 * i}
            for i, t in enumerate(plan.settings.type_ids)]


def job_config(plan: Plan) -> dict:
    """What decides the output bytes; a different value means a different dataset."""
    from biqa import __version__
    config = {**plan.settings.as_config(), "biqa_version": __version__,
              "references": {"count": len(plan.refs), "sha256": plan.refs.digest()}}
    if plan.n_chunks:
        config["walk_references"] = {"count": len(plan.walk_refs),
                                     "sha256": plan.walk_refs.digest()}
    return config


class UnreadableManifest(ValueError):
    """``manifest.json`` exists but is not a biqa-gen manifest; the message names the file."""


def load_existing(out_dir: str) -> dict | None:
    """The manifest in ``out_dir`` (a dict with a ``config``), None if there is none;
    UnreadableManifest, naming the file and the problem, for anything else."""
    path = manifest_path(out_dir)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UnreadableManifest(f"{path} is a folder, not a biqa-gen manifest") from None
    except OSError as exc:
        raise UnreadableManifest(f"{path} cannot be read ({exc.strerror})") from None
    try:
        manifest = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UnreadableManifest(f"{path} is not a biqa-gen manifest: not JSON ({exc})") \
            from None
    if not isinstance(manifest, dict):
        raise UnreadableManifest(f"{path} is not a biqa-gen manifest: it holds a JSON "
                                 f"{type(manifest).__name__}, not an object")
    if not isinstance(manifest.get("config"), dict):
        raise UnreadableManifest(f"{path} is not a biqa-gen manifest: it has no 'config'")
    return manifest


def references_digest(digests: dict) -> str:
    """sha256 over a shard's (reference id, content sha256) pairs: equal only for equal inputs."""
    h = hashlib.sha256()
    for ref_id in sorted(digests):
        h.update(f"{ref_id}\t{digests[ref_id]}\n".encode())
    return h.hexdigest()


def _shard_entry(stats: dict, out_format: str) -> dict:
    entry = {"name": stats["shard"], "samples": stats["samples"], "planned": stats["planned"],
             "references_sha256": references_digest(stats["references"])}
    if out_format == "webdataset":
        tar = stats["files"][0]
        entry.update(name=tar["name"], size=tar["size"], sha256=tar["sha256"])
    else:
        entry["files"] = stats["files"]
    return entry


def _fr_stats(names: tuple[str, ...], complete: list[dict]) -> dict:
    """Count, mean and standard deviation of each recorded full-reference score over the
    samples where it is defined: what training standardises regression targets with."""
    stats = {}
    for name in names:
        count = sum(r.get("fr_sums", {}).get(name, [0, 0, 0])[0] for r in complete)
        total = sum(r.get("fr_sums", {}).get(name, [0, 0, 0])[1] for r in complete)
        squares = sum(r.get("fr_sums", {}).get(name, [0, 0, 0])[2] for r in complete)
        mean = total / count if count else None
        std = (max(squares / count - mean * mean, 0.0) ** 0.5) if count else None
        stats[name] = {"count": count, "mean": mean, "std": std}
    return stats


def build_manifest(plan: Plan, results: list[dict], status: str, run: dict,
                   walk: dict | None = None) -> dict:
    """The manifest from the tasks' results (in any order) -- for a job with a walk, the
    results of the chunks it keeps, and ``walk``, the walk's outcome (``walk.py``)."""
    results = sorted(results, key=lambda r: r["index"])
    complete = [r for r in results if r["status"] == "complete"]
    failed = [{"shard": r["shard"], "attempts": r["attempts"], "error": r["error"]}
              for r in results if r["status"] == "failed"]
    skipped = {s["ref"]: s for r in complete for s in r["skipped"]}
    not_applicable = [n for r in complete for n in r["not_applicable"]]
    samples_planned, shards_planned = plan.n_samples, plan.n_shards
    if plan.n_chunks:  # the walk's target until it has run, then what it made
        samples_planned = plan.n_groups * len(plan.settings.levels) + (
            walk["samples_planned"] if walk else plan.settings.walk_count
            * len(plan.settings.levels))
        shards_planned += walk["chunks"] if walk else math.ceil(
            plan.settings.walk_count / plan.settings.groups_per_shard)
    manifest = {
        "format_version": FORMAT_VERSION,
        "status": status,
        "config": job_config(plan),
        "types": type_table(plan),
        "levels": list(plan.settings.levels),
        "format": plan.settings.out_format,
        "image_format": plan.settings.image_format,
        "shards": [_shard_entry(r, plan.settings.out_format) for r in complete],
        "totals": {
            "references": len(plan.refs),
            "references_skipped": len(skipped),
            "samples_planned": samples_planned,
            "samples": sum(r["samples"] for r in complete),
            "samples_skipped": sum(r["samples_skipped"] for r in complete),
            "not_applicable": sum(n["samples"] for n in not_applicable),
            "shards_planned": shards_planned,
            "shards": len(complete),
            "shards_failed": len(failed),
        },
        "fr_stats": _fr_stats(plan.settings.fr_metrics, complete),
        "skipped_references": [skipped[k] for k in sorted(skipped)],
        "not_applicable": not_applicable,
        "failed": failed,
    }
    if plan.n_chunks:
        manifest["walk"] = walk
    manifest["run"] = run
    return manifest


def write_manifest(out_dir: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False).encode()
    atomic_write_bytes(manifest_path(out_dir), data + b"\n")
