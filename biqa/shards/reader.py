"""Read what biqa-gen wrote: manifest, shard list, decoded samples, level groups.

The training code imports these names; they depend on numpy, OpenCV and
webdataset only (no torch).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import cv2
import numpy as np

MANIFEST_NAME = "manifest.json"
IMAGE_KEYS = ("png", "webp")


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


def decode_image(data: bytes) -> np.ndarray:
    """PNG/WebP bytes -> uint8 H×W×3 RGB; ValueError if they do not decode."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("image bytes do not decode")
    return np.ascontiguousarray(img[:, :, ::-1])


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
