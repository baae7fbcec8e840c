"""``manifest.json``: the run's configuration, type table, shards and what was left out.

It is written at the start (``status: "incomplete"``, so a killed run can be
recognised and resumed) and again at the end from the shards' stats.  All of it
but the ``run`` section is a function of the configuration and the inputs, so
equal jobs have equal manifests however they were run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from biqa.distortions import get
from biqa.shards.writer import PARTIAL_SUFFIX, atomic_write_bytes

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
    return {**plan.settings.as_config(), "biqa_version": __version__,
            "references": {"count": len(plan.refs), "sha256": plan.refs.digest()}}


def load_existing(out_dir: str) -> dict | None:
    try:
        with open(manifest_path(out_dir), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _previous_outputs(out_dir: str) -> list[str]:
    """Files a previous biqa-gen run left in ``out_dir`` (shards, loose images, stats)."""
    found = glob.glob(os.path.join(out_dir, "shard-*.tar"))
    for stats_file in glob.glob(os.path.join(out_dir, "stats", "*.json")):
        try:
            with open(stats_file, encoding="utf-8") as f:
                found += [os.path.join(out_dir, e["name"]) for e in json.load(f).get("files", [])]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(set(found))


def _config_difference(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_out_dir(out_dir: str, config: dict, overwrite: bool) -> None:
    """Make ``out_dir`` ready for this job: resume an equal job, refuse a different one
    (unless ``overwrite``, which deletes the previous run's outputs first)."""
    existing = load_existing(out_dir)
    leftovers = _previous_outputs(out_dir) if os.path.isdir(out_dir) else []
    if existing is not None or leftovers:
        old_config = (existing or {}).get("config")
        if old_config != config and not overwrite:
            why = ("; ".join(_config_difference(old_config, config)) if old_config
                   else "it holds shards without a readable manifest.json")
            raise ValueError(f"{out_dir} holds the output of a different biqa-gen job ({why}). "
                             "Use another --out, or --overwrite to delete it and start again.")
        if old_config != config:
            remove_previous_run(out_dir)
    os.makedirs(os.path.join(out_dir, "stats"), exist_ok=True)
    remove_partials(out_dir)


def remove_previous_run(out_dir: str) -> None:
    for path in _previous_outputs(out_dir):
        os.unlink(path)
    shutil.rmtree(os.path.join(out_dir, "stats"), ignore_errors=True)
    if os.path.exists(manifest_path(out_dir)):
        os.unlink(manifest_path(out_dir))


def remove_partials(out_dir: str) -> None:
    """Delete temp files of killed runs (they never carry a final name)."""
    for pattern in (f"*{PARTIAL_SUFFIX}", f"stats/*{PARTIAL_SUFFIX}"):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _shard_entry(stats: dict, out_format: str) -> dict:
    entry = {"name": stats["shard"], "samples": stats["samples"], "planned": stats["planned"]}
    if out_format == "webdataset":
        tar = stats["files"][0]
        entry.update(name=tar["name"], size=tar["size"], sha256=tar["sha256"])
    else:
        entry["files"] = stats["files"]
    return entry


def build_manifest(plan: Plan, results: list[dict], status: str, run: dict) -> dict:
    """The manifest from the tasks' results (in any order)."""
    results = sorted(results, key=lambda r: r["index"])
    complete = [r for r in results if r["status"] == "complete"]
    failed = [{"shard": r["shard"], "attempts": r["attempts"], "error": r["error"]}
              for r in results if r["status"] == "failed"]
    skipped = {s["ref"]: s for r in complete for s in r["skipped"]}
    not_applicable = [n for r in complete for n in r["not_applicable"]]
    return {
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
            "samples_planned": plan.n_samples,
            "samples": sum(r["samples"] for r in complete),
            "not_applicable": sum(n["samples"] for n in not_applicable),
            "shards_planned": plan.n_shards,
            "shards": len(complete),
            "shards_failed": len(failed),
        },
        "skipped_references": [skipped[k] for k in sorted(skipped)],
        "not_applicable": not_applicable,
        "failed": failed,
        "run": run,
    }


def write_manifest(out_dir: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False).encode()
    atomic_write_bytes(manifest_path(out_dir), data + b"\n")
