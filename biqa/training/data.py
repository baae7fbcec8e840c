"""Streaming input pipeline for DPM pre-training: shards -> (pairs) -> shuffle -> decode ->
crop/flip -> YCbCr, in DataLoader workers; normalisation happens on the device.

Balanced ranks: one epoch is ``steps_per_epoch = total // (world * batch)`` steps on every
rank.  Shards are dealt to ranks (and within a rank to workers) largest-first onto the least
loaded part; each worker gets a quota of whole batches in proportion to what it holds and
wraps around its shards if the quota asks for a few more samples than it has.  Every rank
therefore yields exactly the same number of batches, whatever the shard sizes, so DDP never
waits on a rank that ran dry.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import tarfile_samples

from biqa.shards import reader

# VIPNet's pre-training normalisation, applied to full-range YCbCr / 255 (``dpm_input``).
YCBCR_MEAN = (0.448, 0.483, 0.491)
YCBCR_STD = (0.248, 0.114, 0.106)
NORMALISATION = {"colour": "ycbcr", "mean": list(YCBCR_MEAN), "std": list(YCBCR_STD)}
LEVELS = 5


# ----------------------------------------------------------------------------- shard sets
@dataclass(frozen=True)
class ShardSet:
    """The shard URLs of one run, their sample counts (from the manifest) and class table."""
    urls: list[str]
    counts: list[int]
    class_table: list[dict]

    @property
    def num_classes(self) -> int:
        return LEVELS * len(self.class_table)


def class_table_from_manifest(manifest: dict) -> list[dict]:
    """[{id, name, class_base}] in class order, from the manifest's type list."""
    types = manifest.get("types")
    if not types:
        raise ValueError("manifest has no 'types' table")
    table = [{"id": int(t["id"]), "name": str(t["name"]), "class_base": int(t["class_base"])}
             for t in types]
    return sorted(table, key=lambda t: t["class_base"])


def _shard_counts(manifest: dict) -> dict[str, int]:
    """Basename of each shard -> its sample count."""
    return {os.path.basename(s["name"]): int(s["samples"]) for s in manifest.get("shards", [])}


def _expand_pattern(pattern: str) -> list[str]:
    from braceexpand import braceexpand
    return list(braceexpand(pattern))


def open_shards(spec: str) -> ShardSet:
    """A shard directory (``DIR/*.tar`` + ``DIR/manifest.json``) or a brace URL pattern
    (``shards/train-{000..009}.tar``) whose manifest sits beside the shards."""
    if os.path.isdir(spec):
        manifest = reader.load_manifest(spec)
        urls = reader.shard_paths(spec)
    elif ":" not in spec and not any(os.path.exists(u) for u in _expand_pattern(spec)):
        raise ValueError(f"{spec!r}: no such shard folder, and no shard file matches it")
    else:
        urls = _expand_pattern(spec)
        manifest = _load_remote_manifest(urls[0]) if urls else {}
    if not urls:
        raise ValueError(f"no shards found at {spec!r}")
    counts_by_name = _shard_counts(manifest)
    missing = [u for u in urls if os.path.basename(u) not in counts_by_name]
    if missing:
        raise ValueError(f"{len(missing)} shards are not in the manifest of {spec!r}, "
                         f"e.g. {missing[0]}")
    return ShardSet(urls=urls, counts=[counts_by_name[os.path.basename(u)] for u in urls],
                    class_table=class_table_from_manifest(manifest))


def _load_remote_manifest(first_url: str) -> dict:
    """The manifest next to a shard given by URL or path (local files go through the reader)."""
    base = first_url.rsplit("/", 1)[0] if "/" in first_url else "."
    if os.path.isdir(base):
        return reader.load_manifest(base)
    try:
        with gopen(f"{base}/manifest.json") as stream:
            return json.load(stream)
    except Exception as exc:  # any transport error: say which manifest we could not get
        raise ValueError(f"cannot read the manifest beside {first_url!r}: {exc}") from exc


# ------------------------------------------------------------------------- rank balance
def deal_balanced(counts: list[int], parts: int, order: np.ndarray | None = None
                  ) -> list[list[int]]:
    """Indices of ``counts`` dealt to ``parts`` bins: largest first onto the lightest bin (ties
    by ``order``, so a shuffled order gives a different deal each epoch)."""
    order = np.arange(len(counts)) if order is None else np.asarray(order)
    ranked = sorted(order.tolist(), key=lambda i: -counts[i])  # stable: keeps shuffled ties
    bins: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in ranked:
        lightest = min(range(parts), key=lambda p: (loads[p], len(bins[p]), p))
        bins[lightest].append(i)
        loads[lightest] += counts[i]
    return bins


def split_quota(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders)."""
    weight_sum = sum(weights)
    if weight_sum == 0:
        return [0] * len(weights)
    exact = [total * w / weight_sum for w in weights]
    quota = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: quota[i] - exact[i])[:total - sum(quota)]:
        quota[i] += 1
    return quota


def steps_per_epoch(units: list[int], world: int, batch: int) -> int:
    """Steps every rank takes per epoch: all units once, split evenly, whole batches."""
    if len(units) < world:
        raise ValueError(f"{len(units)} shards cannot feed {world} ranks: need at least one "
                         "shard per rank")
    steps = sum(units) // (world * batch)
    if steps == 0:
        raise ValueError(f"{sum(units)} samples are fewer than one batch of {batch} per rank "
                         f"({world} ranks)")
    return steps


def worker_plan(units: list[int], world: int, rank: int, workers: int, worker: int,
                batch: int, epoch_rng: np.random.Generator) -> tuple[list[int], int]:
    """(shard indices, number of batches) for one DataLoader worker of one rank this epoch.
    ``epoch_rng`` must be seeded identically on all ranks (it only shuffles the deal)."""
    order = epoch_rng.permutation(len(units))
    rank_shards = deal_balanced(units, world, order)[rank]
    worker_bins = deal_balanced([units[i] for i in rank_shards], workers)
    loads = [sum(units[rank_shards[j]] for j in b) for b in worker_bins]
    quotas = split_quota(steps_per_epoch(units, world, batch), loads)
    return [rank_shards[j] for j in worker_bins[worker]], quotas[worker]


# ------------------------------------------------------------------------- pixels
def crop_box(height: int, width: int, out_hw: tuple[int, int],
             rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left corner of a crop of ``out_hw``: uniform with ``rng``, centred without."""
    spare_h, spare_w = max(height - out_hw[0], 0), max(width - out_hw[1], 0)
    if rng is None:
        return spare_h // 2, spare_w // 2
    return int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1))


def crop_or_pad(image: np.ndarray, out_hw: tuple[int, int], top: int, left: int) -> np.ndarray:
    """Crop to ``out_hw`` at (top, left); an image smaller than that is first reflect-padded
    (mirroring keeps the distortion's texture; a constant border would be a new artefact)."""
    h, w = image.shape[:2]
    pad_h, pad_w = max(out_hw[0] - h, 0), max(out_hw[1] - w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                               (0, 0)), mode="symmetric")
    return image[top:top + out_hw[0], left:left + out_hw[1]]


def prepare(images: list[np.ndarray], out_hw: tuple[int, int],
            rng: np.random.Generator | None) -> torch.Tensor:
    """Crop (random with ``rng``, else centre) and flip (p=0.5 with ``rng``) to RGB uint8
    (n, 3, H, W); ``dpm_input`` converts on the device.  Images of one pair share the crop
    and flip so they show the same content."""
    top, left = crop_box(*images[0].shape[:2], out_hw, rng)
    flip = rng is not None and rng.random() < 0.5
    out = []
    for image in images:
        patch = crop_or_pad(image, out_hw, top, left)
        if flip:
            patch = patch[:, ::-1]
        out.append(np.ascontiguousarray(patch).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


# JPEG/JFIF full-range BT.601 (Pillow's convert('YCbCr'), which VIPNet's loader used).
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114),
                 (-0.168736, -0.331264, 0.5),
                 (0.5, -0.418688, -0.081312))
_YCBCR_OFFSET = (0.0, 128.0, 128.0)


def dpm_input(rgb_uint8: torch.Tensor, mean=YCBCR_MEAN, std=YCBCR_STD) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) -> the DPM's input: YCbCr / 255 with VIPNet's mean/std.

    The one conversion used in pre-training, validation, fine-tuning and scoring, done
    on the device (a quarter of the bytes cross the bus); in float, so it differs from
    Pillow's integer YCbCr, which truncates, by less than one grey level."""
    device = rgb_uint8.device
    matrix = torch.tensor(_RGB_TO_YCBCR, device=device)
    offset = torch.tensor(_YCBCR_OFFSET, device=device).view(1, 3, 1, 1)
    ycbcr = torch.einsum("ij,bjhw->bihw", matrix, rgb_uint8.float()) + offset
    mean = torch.as_tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return (ycbcr / 255.0 - mean) / std


# ------------------------------------------------------------------------- stream stages
def _group_key(sample: dict) -> tuple[str, int] | None:
    """(ref, type) of a raw sample, None if its JSON is unreadable."""
    try:
        meta = json.loads(sample["json"])
        return str(meta["ref"]), int(meta["type"])
    except (KeyError, ValueError, TypeError):
        return None


def level_groups(samples: Iterator[dict], on_skip) -> Iterator[list[dict]]:
    """Runs of adjacent samples of the same (ref, type): the generator writes the five levels
    of one (ref, type) next to each other, so a group is complete without any index."""
    group: list[dict] = []
    current = None
    for sample in samples:
        key = _group_key(sample)
        if key is None:
            on_skip()
            continue
        if key != current and group:
            yield group
            group = []
        current = key
        group.append(sample)
    if group:
        yield group


def pairs_from_group(group: list[dict], rng: np.random.Generator) -> list[tuple[dict, dict]]:
    """Pair the levels of one group at random: a group of n gives ceil(n/2) pairs, every image
    in at least one (with n odd the last one is paired with a random other member)."""
    if len(group) < 2:
        return []
    order = rng.permutation(len(group)).tolist()
    pairs = [(group[order[i]], group[order[i + 1]]) for i in range(0, len(order) - 1, 2)]
    if len(order) % 2:
        pairs.append((group[order[-1]], group[order[int(rng.integers(len(order) - 1))]]))
    return pairs


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Streaming shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class SkipCounter:
    """Counts unreadable samples and shards in one worker; handed to webdataset as handler."""

    def __init__(self):
        self.count = 0

    def __call__(self, exc: Exception | None = None) -> bool:
        self.count += 1
        return True  # continue the stream

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


# ------------------------------------------------------------------------- datasets
def _decode(sample: dict, num_classes: int) -> tuple[np.ndarray, int, int]:
    """(image, class, level) of a raw sample; ValueError if it is corrupt."""
    image, meta = reader.decode_sample(sample)
    label = int(meta["class"])
    if not 0 <= label < num_classes:
        raise ValueError(f"{sample.get('__key__')}: class {label} outside 0..{num_classes - 1}")
    return image, label, int(meta["level"])


class ShardStream(IterableDataset):
    """Training (``train=True``: balanced quotas, shuffling, random crops/flips) or evaluation
    stream (every sample once, centre crops) over a ShardSet.  Yields dicts of ``image``
    (uint8 3xHxW, or 2x3xHxW for pairs), ``label``, ``level`` and ``skipped`` (unreadable
    samples met since the previous item, so the main process can sum them)."""

    def __init__(self, shards: ShardSet, input_hw: tuple[int, int], batch_size: int,
                 train: bool, pairs: bool = False, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle_size: int = 256):
        super().__init__()
        self.shards = shards
        self.input_hw = input_hw
        self.batch_size = batch_size
        self.train = train
        self.pairs = pairs
        self.seed = seed
        self.rank = rank
        self.world = world
        self.shuffle_size = shuffle_size
        # (epoch, restart token) in shared memory: persistent workers see set_epoch.
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def units(self) -> list[int]:
        """Per shard: samples, or pairs (a lower bound: half the samples) in pair mode."""
        return [c // 2 if self.pairs else c for c in self.shards.counts]

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.units, self.world, self.batch_size)

    def set_epoch(self, epoch: int, restart: int = 0) -> None:
        """Select the epoch's deal and shuffle; ``restart`` (the step resumed at) gives a
        resumed epoch a fresh shuffle instead of replaying the interrupted one."""
        self._epoch[0], self._epoch[1] = epoch, restart

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        epoch, restart = (int(v) for v in self._epoch)
        if self.train:
            deal_rng = np.random.default_rng([self.seed, epoch])  # same on every rank
            shard_ids, batches = worker_plan(self.units, self.world, self.rank, workers,
                                             worker, self.batch_size, deal_rng)
            quota = batches * self.batch_size
            rng = np.random.default_rng([self.seed, epoch, restart, self.rank, worker])
            pair_rng = rng
        else:
            shard_ids, quota, rng = list(range(worker, len(self.shards.urls), workers)), None, None
            pair_rng = np.random.default_rng([self.seed, worker])  # fixed held-out pairs
        if not shard_ids or quota == 0:
            return
        skips = SkipCounter()
        produced = 0
        while quota is None or produced < quota:
            produced_before = produced
            for item in self._one_pass(shard_ids, rng, pair_rng, skips):
                item["skipped"] = skips.take()
                yield item
                produced += 1
                if quota is not None and produced >= quota:
                    return
            if quota is None:
                return
            if produced == produced_before:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in "
                                   f"{len(shard_ids)} shards")

    def _one_pass(self, shard_ids: list[int], rng: np.random.Generator | None,
                  pair_rng: np.random.Generator, skips: SkipCounter) -> Iterator[dict]:
        """Read the shards once and yield decoded items; ``rng`` (training only) shuffles the
        shard order and the stream and draws the crops and flips."""
        order = shard_ids if rng is None else [shard_ids[i] for i in rng.permutation(len(shard_ids))]
        raw = tarfile_samples(({"url": self.shards.urls[i]} for i in order), handler=skips)
        if self.pairs:
            units = (p for g in level_groups(raw, skips) for p in pairs_from_group(g, pair_rng))
        else:
            units = ((s,) for s in raw)
        if rng is not None:
            units = shuffle_buffer(units, self.shuffle_size, rng)
        num_classes = self.shards.num_classes
        for unit in units:
            try:
                decoded = [_decode(s, num_classes) for s in unit]
            except ValueError:
                skips()
                continue
            images = prepare([d[0] for d in decoded], self.input_hw, rng)
            labels = torch.tensor([d[1] for d in decoded])
            levels = torch.tensor([d[2] for d in decoded])
            if self.pairs:
                yield {"image": images, "label": labels, "level": levels}
            else:
                yield {"image": images[0], "label": labels[0], "level": levels[0]}


def make_loader(dataset, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """Batches collated in the workers; workers persist across epochs (their shard deal is
    switched through ``ShardStream.set_epoch``); ``pin`` for asynchronous copies to a GPU."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None)


# ------------------------------------------------------------------------- KADID-10k
_KADID_NAME = re.compile(r"^I(\d+)_(\d+)_(\d+)\.\w+$")


class KadidDataset(Dataset):
    """The real KADID-10k images (``dmos.csv`` + ``images/Iii_TT_LL.png``) labelled through the
    class table: type TT at level LL -> class_base(TT) + LL - 1.  Types not in the table are
    left out (``self.left_out`` counts them)."""

    def __init__(self, root: str | Path, class_table: list[dict], input_hw: tuple[int, int]):
        from .iqa_datasets import load_kadid10k  # one reader of the KADID-10k layout

        root = Path(root)
        base_by_type = {t["id"]: t["class_base"] for t in class_table}
        self.items: list[tuple[Path, int]] = []
        self.left_out = 0
        for path in load_kadid10k(root).paths:
            match = _KADID_NAME.match(path.name)  # the loader has checked the names
            kind, level = int(match[2]), int(match[3])
            if kind not in base_by_type:
                self.left_out += 1
                continue
            self.items.append((path, base_by_type[kind] + level - 1))
        if not self.items:
            raise ValueError(f"{root}: no image of a type in the class table")
        self.input_hw = input_hw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        image = prepare([rgb], self.input_hw, None)[0]
        return {"image": image, "label": torch.tensor(label),
                "level": torch.tensor(label % LEVELS + 1), "skipped": 0}
