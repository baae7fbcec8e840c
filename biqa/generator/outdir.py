"""The output folder: resume an equal job, refuse or replace a different one, and delete
only what biqa-gen can prove it wrote.

A file is biqa's to delete only if all of these hold:

* its name was recorded by biqa-gen -- in ``stats/<shard>.json`` (a task records
  the files it is about to write *before* writing them, so a killed task's files
  are recorded too) or in ``manifest.json`` -- or it is a temporary file carrying
  biqa's mark (``<final>.biqa-tmp-<pid>-<hex>.partial``);
* the name is a plain name of one of biqa's shapes (``shard-NNNNNN.tar``,
  ``<key>.png``/``.webp``/``.npy.zst``, ``stats/shard-NNNNNN.json``, ``manifest.json``):
  no ``/``, no ``..``, nothing absolute;
* the folder it is in really is ``--out`` (or ``--out/stats``) once symlinks are
  resolved, and the file itself is a regular file, not a symlink.

The records live in ``--out`` and anyone may write there, so they are read as
claims to check, never as paths to follow.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from typing import Callable

from biqa.shards.writer import MEMBER_EXTENSIONS, temp_final_name

from .manifest import MANIFEST_NAME, UnreadableManifest, job_config, load_existing, \
    manifest_path
from .plan import Plan

STATS_DIR = "stats"
SHARD_TAR = re.compile(r"shard-\d{6,}\.tar")
SAMPLE_IMAGE = re.compile(r"[A-Za-z0-9_-]+_\d{2,}_\d{2}\.(?:%s)"
                          % "|".join(map(re.escape, MEMBER_EXTENSIONS.values())))
STATS_FILE = re.compile(r"shard-\d{6,}\.json")


def _is_output_name(name: str) -> bool:
    return bool(SHARD_TAR.fullmatch(name) or SAMPLE_IMAGE.fullmatch(name))


def _has_own_shape(name, in_stats: bool) -> bool:
    if not isinstance(name, str):
        return False
    if in_stats:
        return bool(STATS_FILE.fullmatch(name))
    return _is_output_name(name) or name == MANIFEST_NAME


def _regular_file_in(out_dir: str, name: str, in_stats: bool) -> str | None:
    """``out_dir/[stats/]name`` if that folder really is there (no symlink leads elsewhere)
    and the entry is a regular file, not a symlink; None otherwise.  ``name`` is plain."""
    real_out = os.path.realpath(out_dir)
    folder = os.path.join(out_dir, STATS_DIR) if in_stats else out_dir
    expected = os.path.join(real_out, STATS_DIR) if in_stats else real_out
    if os.path.realpath(folder) != expected:
        return None
    path = os.path.join(folder, name)
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None


def owned_file(out_dir: str, name, in_stats: bool = False) -> str | None:
    """The path of ``name`` in ``out_dir`` (or its ``stats/``) if it is a regular file of
    one of biqa's shapes in the real folder; None for anything else."""
    return _regular_file_in(out_dir, name, in_stats) if _has_own_shape(name, in_stats) else None


def recorded_output(out_dir: str, name) -> str | None:
    """``owned_file`` for a shard or image name read from a record (so never manifest.json)."""
    if not isinstance(name, str) or not _is_output_name(name):
        return None
    return owned_file(out_dir, name)


def _unlink(paths) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_recorded(out_dir: str, names) -> None:
    """Delete the recorded output files ``names`` that pass ``recorded_output``."""
    _unlink(p for p in (recorded_output(out_dir, n) for n in names) if p)


def remove_shard(out_dir: str, name: str, own_names) -> None:
    """Delete a shard this job wrote and no longer wants (a walk's chunk beyond the last
    one needed): the outputs its stats record names -- only among ``own_names``, the
    names that shard may write -- then the record itself."""
    record = owned_file(out_dir, f"{name}.json", in_stats=True)
    if record is None:
        return
    remove_recorded(out_dir, set(record_names(_read_json(record))).intersection(own_names))
    _unlink([record])  # last: a kill before this leaves the record of what remains


def stats_records(out_dir: str) -> list[str]:
    """Paths of biqa's own ``stats/shard-*.json`` files."""
    found = (owned_file(out_dir, os.path.basename(p), in_stats=True)
             for p in glob.glob(os.path.join(out_dir, STATS_DIR, "shard-*.json")))
    return sorted(p for p in found if p)


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def record_names(record) -> list:
    """Names in a stats record's ``files`` (whatever they are: callers check them)."""
    files = record.get("files") if isinstance(record, dict) else None
    return [e.get("name") for e in files if isinstance(e, dict)] \
        if isinstance(files, list) else []


def _manifest_names(manifest) -> list:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    names = []
    for entry in shards if isinstance(shards, list) else []:
        if isinstance(entry, dict):
            names.append(entry.get("name"))
            names += record_names(entry)
    return names


def recorded_outputs(out_dir: str, manifest: dict | None, records: list[str]) -> list[str]:
    """Shards and images that the manifest or the stats records name and biqa may delete."""
    names = _manifest_names(manifest)
    for record in records:
        names += record_names(_read_json(record))
    return sorted({p for p in (recorded_output(out_dir, n) for n in names) if p})


def remove_partials(out_dir: str) -> None:
    """Delete temp files of killed runs: biqa's marked names standing for biqa's own files."""
    for in_stats in (False, True):
        pattern = os.path.join(out_dir, STATS_DIR if in_stats else "", "*.partial")
        for name in map(os.path.basename, glob.glob(pattern)):
            if _has_own_shape(temp_final_name(name), in_stats):
                _unlink([p for p in [_regular_file_in(out_dir, name, in_stats)] if p])


def _config_difference(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


WHAT_OVERWRITE_DELETES = ("--overwrite deletes only the shards, images and stats that biqa-gen "
                          "recorded there and replaces manifest.json; nothing else in the "
                          "folder is touched")


def prepare_out_dir(plan: Plan, overwrite: bool, say: Callable[[str], None]) -> None:
    """Make ``--out`` ready for ``plan``: resume an equal job; refuse anything else there
    (a different job, an unreadable manifest) unless ``overwrite``, which deletes what
    the previous job recorded -- and only that -- first."""
    out_dir, config = plan.settings.out_dir, job_config(plan)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    problem = None
    try:
        existing = load_existing(out_dir)
    except UnreadableManifest as exc:
        existing, problem = None, exc
    records = stats_records(out_dir)
    outputs = recorded_outputs(out_dir, existing, records)
    tars = glob.glob(os.path.join(out_dir, "shard-*.tar"))
    same_job = existing is not None and existing["config"] == config
    if not same_job and (problem or existing or records or outputs or tars):
        if problem:
            why = f"{problem}. Use another --out, or {WHAT_OVERWRITE_DELETES}."
        elif existing:
            diff = "; ".join(_config_difference(existing["config"], config))
            why = (f"{out_dir} holds the output of a different biqa-gen job ({diff}). Use "
                   f"another --out, or --overwrite to start again: {WHAT_OVERWRITE_DELETES}.")
        else:
            why = (f"{out_dir} holds biqa-gen shards or stats without a manifest.json. Use "
                   f"another --out, or --overwrite to start again: {WHAT_OVERWRITE_DELETES}.")
        if not overwrite:
            raise ValueError(why)
        if problem and os.path.isdir(manifest_path(out_dir)):
            raise ValueError(f"{manifest_path(out_dir)} is a folder; biqa-gen never deletes "
                             "folders: move it away or use another --out")
        _unlink(outputs)  # data first: a kill now leaves the records that name the rest
        _unlink(records)
        _unlink([p for p in [owned_file(out_dir, MANIFEST_NAME)] if p])
        _warn_unrecorded_tars(plan, say)
    os.makedirs(os.path.join(out_dir, STATS_DIR), exist_ok=True)
    remove_partials(out_dir)


def _warn_unrecorded_tars(plan: Plan, say: Callable[[str], None]) -> None:
    """Shard-like tars biqa has no record of stay; say so if this job will not replace them."""
    out_dir = plan.settings.out_dir
    planned = ({f"{name}.tar" for name in plan.all_shard_names()}
               if plan.settings.out_format == "webdataset" else set())
    left = sorted(n for n in map(os.path.basename, glob.glob(os.path.join(out_dir, "shard-*.tar")))
                  if n not in planned)
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        say(f"warning: {len(left)} shard-*.tar files in {out_dir} were not recorded by "
            f"biqa-gen and are left in place ({shown}); a loader that globs *.tar would read "
            "them, the manifest does not list them")
