"""Read what biqa-gen wrote: manifest, shard set, shard index, decoded samples, level groups.

The training code builds on these; they depend on numpy, OpenCV, zstandard and webdataset
only (no torch), so a command can check its shards before paying for ``import torch``.

A shard is *opened* for training by reading it whole once: its bytes are checked against
the manifest's sha256 and indexed (member offsets, and each sample's reference, type,
level and class from its JSON).  Local shards are then read sample by sample at those
offsets (random access, which lets a loader shuffle a whole shard set instead of a
window of it); shards behind a URL keep their bytes in memory while they are used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np
import zstandard

MANIFEST_NAME = "manifest.json"
IMAGE_KEYS = ("png", "webp", "npy.zst")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEVELS = 5  # every distortion type has five levels: class = class_base + level - 1

def _manifest_file(path_or_dir) -> str:
    path = os.fspath(path_or_dir)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def load_manifest(path_or_dir) -> dict:
    """The manifest of an output folder (or the manifest file itself)."""
    path = _manifest_file(path_or_dir)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no biqa-gen manifest at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def shard_paths(path_or_dir) -> list[str]:
    """Absolute paths of the complete shards the manifest lists, sorted."""
    manifest = load_manifest(path_or_dir)
    if manifest.get("format", "webdataset") != "webdataset":
        raise ValueError(f"{path_or_dir} was written with --format {manifest['format']}, "
                         "not as tar shards")
    root = os.path.dirname(os.path.abspath(_manifest_file(path_or_dir)))
    return sorted(os.path.join(root, s["name"]) for s in manifest["shards"])


@functools.cache
def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """One per process: making one per image costs as much as a small image's decoding."""
    return zstandard.ZstdDecompressor()


def decode_image(data: bytes) -> np.ndarray:
    """PNG, WebP or zstd-compressed ``.npy`` bytes -> uint8 H×W×3 RGB; ValueError if they
    do not decode.  PNG/WebP decode straight to RGB (no BGR copy)."""
    if data[:4] == ZSTD_MAGIC:
        try:
            raw = _zstd_decompressor().decompress(data)
            image = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except (zstandard.ZstdError, ValueError, OSError) as exc:
            raise ValueError(f"zstd image bytes do not decode: {exc}") from None
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"zstd image is {image.dtype} {image.shape}, not uint8 H×W×3")
        return image
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if img is None:
        raise ValueError("image bytes do not decode")
    return img


def decode_sample(sample: dict) -> tuple[np.ndarray, dict]:
    """A raw webdataset sample (``__key__``, ``png``/``webp``, ``json``, ``cls`` as bytes)
    -> (uint8 H×W×3 RGB, metadata); ValueError naming the key if it is corrupt."""
    key = sample.get("__key__", "?")
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None or "json" not in sample:
        raise ValueError(f"sample {key}: missing members (has {sorted(sample)})")
    try:
        meta = json.loads(sample["json"])
        image = decode_image(sample[image_key])
        if "cls" in sample and int(sample["cls"]) != meta.get("class"):
            raise ValueError(f".cls {sample['cls']!r} disagrees with the JSON class "
                             f"{meta.get('class')}")
    except ValueError as exc:
        raise ValueError(f"sample {key}: {exc}") from None
    return image, meta


def iter_samples(path_or_dir) -> Iterator[tuple[np.ndarray, dict]]:
    """Every sample of the complete shards, decoded, in shard and member order."""
    import webdataset as wds
    paths = shard_paths(path_or_dir)
    if not paths:
        return
    dataset = wds.WebDataset(paths, shardshuffle=False, nodesplitter=None,
                             workersplitter=None, empty_check=False)
    for sample in dataset:
        yield decode_sample(sample)


def iter_groups(path_or_dir) -> Iterator[list[tuple[np.ndarray, dict]]]:
    """The samples of one (reference, type) together -- its levels, mildest first --
    which the generator writes adjacently; ranking pairs come from within a group."""
    group: list[tuple[np.ndarray, dict]] = []
    for image, meta in iter_samples(path_or_dir):
        if group and (group[0][1]["ref"], group[0][1]["type"]) != (meta["ref"], meta["type"]):
            yield group
            group = []
        group.append((image, meta))
    if group:
        yield group


# ----------------------------------------------------------------------------- shard sets
@dataclass(frozen=True)
class ShardSet:
    """The readable shards of one biqa-gen run for training: URLs, sample counts and sha256
    from the manifest, and its class table.  ``missing`` lists shards the manifest names
    that are not on disk (left out, their ``missing_samples`` counted as skipped)."""

    urls: list[str]
    counts: list[int]
    sha256: list[str | None]
    class_table: list[dict]
    missing: list[str] = field(default_factory=list)
    missing_samples: int = 0
    fr_metrics: tuple[str, ...] = ("psnr",)  # full-reference scores in the samples' JSON
    fr_stats: dict = field(default_factory=dict)  # name -> {count, mean, std} over the run

    @property
    def num_classes(self) -> int:
        return LEVELS * len(self.class_table)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def class_bases(self) -> dict[int, int]:
        """type id -> class base."""
        return {t["id"]: t["class_base"] for t in self.class_table}



def class_table_from_manifest(manifest: dict) -> list[dict]:
    """[{id, name, class_base}] in class order, from the manifest's type list."""
    types = manifest.get("types")
    if not types:
        raise ValueError("manifest has no 'types' table")
    table = [{"id": int(t["id"]), "name": str(t["name"]), "class_base": int(t["class_base"])}
             for t in types]
    return sorted(table, key=lambda t: t["class_base"])


def _expand_pattern(pattern: str) -> list[str]:
    from braceexpand import braceexpand
    return list(braceexpand(pattern))


def is_local(url: str) -> bool:
    """A path or ``file://`` URL (read by offset), as opposed to http(s)://, pipe: ..."""
    return url.startswith("file://") or "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _load_remote_manifest(first_url: str) -> dict:
    """The manifest next to a shard given by URL or path."""
    base = first_url.rsplit("/", 1)[0] if "/" in first_url else "."
    if is_local(base) and os.path.isdir(local_path(base)):
        return load_manifest(local_path(base))
    from webdataset.gopen import gopen
    try:
        with gopen(f"{base}/manifest.json") as stream:
            return json.load(stream)
    except Exception as exc:  # any transport error: say which manifest we could not get
        raise ValueError(f"cannot read the manifest beside {first_url!r}: {exc}") from exc


def open_shards(spec: str, allow_incomplete: bool = False) -> ShardSet:
    """A shard folder (``DIR/*.tar`` + ``DIR/manifest.json``) or a brace URL pattern
    (``shards/shard-{000000..000009}.tar``) whose manifest sits beside the shards.

    Refuses a manifest whose status is not ``complete`` (a generator run that was killed or
    had failed shards) unless ``allow_incomplete``; leaves out local shards that are gone
    (and says how many samples that costs) and refuses when none is left."""
    if os.path.isdir(spec):
        manifest_at = os.path.join(spec, MANIFEST_NAME)
        manifest = load_manifest(spec)
        urls = shard_paths(spec)
    else:
        urls = _expand_pattern(spec)
        if not any(not is_local(u) or os.path.exists(local_path(u)) for u in urls):
            raise ValueError(f"{spec!r}: no such shard folder, and no shard file matches it")
        manifest_at = f"the manifest beside {urls[0]}"
        manifest = _load_remote_manifest(urls[0])
    status = manifest.get("status", "complete")
    if status != "complete" and not allow_incomplete:
        raise ValueError(
            f"{manifest_at} has status {status!r}: the biqa-gen run that wrote these shards did "
            "not finish (killed, or some shards failed). Re-run the same biqa-gen command to "
            f"complete it, or pass --allow-incomplete to train on the "
            f"{len(manifest.get('shards', []))} complete shards.")
    by_name = {os.path.basename(s["name"]): s for s in manifest.get("shards", [])}
    unknown = [u for u in urls if os.path.basename(u) not in by_name]
    if unknown:
        raise ValueError(f"{len(unknown)} shards are not in {manifest_at}, e.g. {unknown[0]}")
    found = {u: not is_local(u) or os.path.isfile(local_path(u)) for u in urls}
    present = [u for u in urls if found[u]]
    missing = [u for u in urls if not found[u]]
    if not present:
        raise ValueError(f"none of the {len(urls)} shards of {spec!r} can be found "
                         f"(e.g. {urls[0]}): nothing to train on")
    entries = [by_name[os.path.basename(u)] for u in present]
    recorded = ("psnr", *((manifest.get("config") or {}).get("fr_metrics") or ()))
    return ShardSet(urls=present, counts=[int(e["samples"]) for e in entries],
                    sha256=[e.get("sha256") for e in entries],
                    class_table=class_table_from_manifest(manifest), missing=missing,
                    missing_samples=sum(int(by_name[os.path.basename(u)]["samples"])
                                        for u in missing),
                    fr_metrics=tuple(dict.fromkeys(recorded)),
                    fr_stats=manifest.get("fr_stats") or {})


# ----------------------------------------------------------------------------- shard index
class ShardRefused(Exception):
    """A whole shard cannot be used; the message says why (it is shown to the user)."""


@dataclass
class ShardIndex:
    """Where each usable sample of one shard is, and what it is (compact: a worker may hold
    the indexes of a million samples).

    ``groups`` are runs of samples of one (reference, type), in shard order: the generator
    writes a group's levels next to each other, so ranking pairs are formed within them.
    ``unusable`` counts samples left out because their members or JSON were broken."""

    url: str
    labels: np.ndarray  # int16 class per sample
    levels: np.ndarray  # int8 level per sample
    offsets: np.ndarray  # int64 byte offset of the image member
    sizes: np.ndarray  # int32 byte size of the image member
    sample_group: np.ndarray  # int32 group of each sample
    groups: list[tuple[int, int]]  # [start, stop) sample ranges of one (ref, type)
    group_refs: list[str]  # the reference of each group
    unusable: int
    scores: np.ndarray  # float32 (samples, metrics): the requested full-reference scores
    data: bytes | None = None  # kept for shards that cannot be re-read by offset

    def reference_runs(self) -> list[tuple[int, int]]:
        """[start, stop) ranges of one reference (all its types): the generator writes a
        reference's groups next to each other."""
        runs: list[tuple[int, int]] = []
        for index, (start, stop) in enumerate(self.groups):
            if runs and self.group_refs[index] == self.group_refs[index - 1]:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        return runs

    def __len__(self) -> int:
        return len(self.labels)

    def ref(self, i: int) -> str:
        return self.group_refs[self.sample_group[i]]

    def image_bytes(self, i: int, reader: "OffsetReader") -> bytes:
        offset, size = int(self.offsets[i]), int(self.sizes[i])
        if self.data is not None:
            return self.data[offset:offset + size]
        return reader.read(local_path(self.url), offset, size)


def read_shard_bytes(url: str) -> bytes:
    """The whole shard; ShardRefused (not an OSError traceback) when it cannot be read."""
    try:
        if is_local(url):
            with open(local_path(url), "rb") as f:
                return f.read()
        from webdataset.gopen import gopen
        with gopen(url) as stream:
            return stream.read()
    except Exception as exc:  # missing file, permissions, transport: the shard is unusable
        raise ShardRefused(f"cannot read it: {type(exc).__name__}: {exc}") from None


def _member_table(fileobj) -> tuple[list[str], dict[str, dict[str, tuple[int, int]]]]:
    """Sample keys in tar order and, per key, extension -> (data offset, size).  Reads only
    the headers when ``fileobj`` is a seekable file."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = os.path.basename(m.name).partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardRefused(f"not a readable tar file: {exc}") from None
    return order, members


def sample_score(meta: dict, name: str) -> float:
    """A sample's full-reference score ``name`` from its JSON: NaN where undefined or not
    recorded; a PSNR of None means identical images, so +inf."""
    value = (meta.get("fr") or {}).get(name, meta.get(name) if name == "psnr" else None)
    if value is None:
        return math.inf if name == "psnr" and "psnr" in meta else math.nan
    return float(value)


def index_shard(url: str, data: bytes | None, expected_sha256: str | None,
                class_bases: dict[int, int], score_names: tuple[str, ...] = ()) -> ShardIndex:
    """Check a shard against the manifest's sha256, then index its samples.

    ``data``: the whole shard, hashed and indexed in memory.  ``None`` for a local shard
    another worker has already checked: then only its headers and JSON members are read.
    A shard whose JSON classes disagree with ``class_bases`` (type -> class base of the run)
    was written by a run with another type order -- its labels would be wrong -- so the
    whole shard is refused.  ``score_names``: full-reference scores to keep per sample
    (``sample_score``).  Remote shards keep ``data``; local ones are re-read by offset."""
    if data is not None:
        if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise ShardRefused("its sha256 differs from the manifest's (truncated, modified, "
                               "or from another run)")
        order, members = _member_table(io.BytesIO(data))
        def read(offset: int, size: int) -> bytes:
            return data[offset:offset + size]
    else:
        try:
            f = open(local_path(url), "rb")
        except OSError as exc:
            raise ShardRefused(f"cannot read it: {type(exc).__name__}: {exc}") from None
        with f:
            order, members = _member_table(f)
        reader = OffsetReader(max_open=1)
        def read(offset: int, size: int) -> bytes:
            return reader.read(local_path(url), offset, size)
    labels, levels, offsets, sizes, sample_group, scores = [], [], [], [], [], []
    groups, group_refs = [], []
    unusable = 0
    current = None
    try:
        for key in order:
            parts = members[key]
            image = next((parts[k] for k in IMAGE_KEYS if k in parts), None)
            try:
                if image is None or "json" not in parts:
                    raise ValueError("missing members")
                meta = json.loads(read(*parts["json"]))
                ref, kind, level, label = (str(meta["ref"]), int(meta["type"]),
                                           int(meta["level"]), int(meta["class"]))
            except (ValueError, KeyError, TypeError):
                unusable += 1
                continue
            if kind not in class_bases or label != class_bases[kind] + level - 1:
                expected = (class_bases[kind] + level - 1 if kind in class_bases
                            else "no class (type not in the run)")
                raise ShardRefused(f"its class table differs from the run's: sample {key} "
                                   f"(type {kind}, level {level}) has class {label}, the run's "
                                   f"table gives {expected}")
            if (ref, kind) != current:
                current = (ref, kind)
                groups.append([len(labels), len(labels)])
                group_refs.append(ref)
            groups[-1][1] += 1
            sample_group.append(len(groups) - 1)
            labels.append(label)
            levels.append(level)
            offsets.append(image[0])
            sizes.append(image[1])
            scores.append([sample_score(meta, name) for name in score_names])
    except OSError as exc:
        raise ShardRefused(f"cannot read it: {type(exc).__name__}: {exc}") from None
    finally:
        if data is None:
            reader.close()
    return ShardIndex(url=url, labels=np.asarray(labels, dtype=np.int16),
                      levels=np.asarray(levels, dtype=np.int8),
                      offsets=np.asarray(offsets, dtype=np.int64),
                      sizes=np.asarray(sizes, dtype=np.int32),
                      sample_group=np.asarray(sample_group, dtype=np.int32),
                      groups=[tuple(g) for g in groups], group_refs=group_refs,
                      unusable=unusable,
                      scores=np.asarray(scores, dtype=np.float32).reshape(len(labels),
                                                                          len(score_names)),
                      data=None if is_local(url) else data)


class OffsetReader:
    """``pread`` from local shards, keeping the most recently used files open."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds: dict[str, int] = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self.max_open:
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd  # most recently used last
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{path}: short read at {offset} (file changed since it was "
                             "checked?)")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
