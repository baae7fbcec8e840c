"""Input pipeline of DPM pre-training: shards -> checked index -> shuffled units -> decode ->
crop/flip, in DataLoader workers; YCbCr conversion and normalisation happen on the device.

Mixing.  The generator writes a reference's samples next to each other (about one
reference per shard), so reading shards in order -- even through a shuffle buffer -- gives
batches from two or three references.  Here every worker indexes its local shards once and
then reads *samples* in a random permutation of everything it holds (random access by byte
offset), and every batch is assembled in the main process from a slice of each worker's
output (``assemble``), so a batch is a random draw from the whole of a rank's shards at
any worker count.  Shards behind URLs cannot be read by offset; they are held in memory
and shuffled a window of ``REMOTE_WINDOW`` shards at a time.

Balanced ranks: one epoch is ``steps_per_epoch = total // (world * batch)`` steps on every
rank.  Shards are dealt to ranks (and within a rank to workers) largest-first onto the least
loaded part; each worker contributes a fixed share of every batch, in proportion to what it
holds, and wraps around its units if the epoch asks for a few more than it has.  Every rank
therefore takes exactly the same number of steps, whatever the shard sizes, so DDP never
waits on a rank that ran dry.

Integrity: a shard is checked against the manifest's sha256 and its samples' classes
against the run's class table when a worker first opens it; a refused shard, an unusable
sample or an image that does not decode is skipped, *counted in samples* and reported once
with its reason (``warnings`` of the next item), never silently.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from biqa.shards.reader import (LEVELS, OffsetReader, ShardIndex, ShardRefused, ShardSet,
                                decode_image, index_shard, is_local, read_shard_bytes)

from .config import RANK_PAIRS

# VIPNet's pre-training normalisation, applied to full-range YCbCr / 255 (``dpm_input``).
YCBCR_MEAN = (0.448, 0.483, 0.491)
YCBCR_STD = (0.248, 0.114, 0.106)
NORMALISATION = {"colour": "ycbcr", "mean": list(YCBCR_MEAN), "std": list(YCBCR_STD)}
# Shards behind URLs are held in memory while used: this many per worker at a time.
REMOTE_WINDOW = 8


class NoReadableShards(RuntimeError):
    """A worker was given shards and none of them could be used (the message says why)."""


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
    """(shard indices, share of every batch) of one DataLoader worker of one rank this
    epoch.  ``epoch_rng`` must be seeded identically on all ranks (it only shuffles the
    deal).  The shares of a rank's workers add up to ``batch``."""
    order = epoch_rng.permutation(len(units))
    rank_shards = deal_balanced(units, world, order)[rank]
    worker_bins = deal_balanced([units[i] for i in rank_shards], workers)
    loads = [sum(units[rank_shards[j]] for j in b) for b in worker_bins]
    shares = split_quota(batch, loads)
    return [rank_shards[j] for j in worker_bins[worker]], shares[worker]


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


def crop_into(out: np.ndarray, images: list[np.ndarray], rng: np.random.Generator | None) -> None:
    """Write the crops (random with ``rng``, else centred) of ``images`` into ``out``
    (n, H, W, 3), flipped left-right with p=0.5 under ``rng``: one copy per image, no
    channel transposition (the device permutes to channels-last for free).  Images of one
    pair share the crop and flip so they show the same content."""
    out_hw = out.shape[1:3]
    top, left = crop_box(*images[0].shape[:2], out_hw, rng)
    flip = rng is not None and rng.random() < 0.5
    for i, image in enumerate(images):
        patch = crop_or_pad(image, out_hw, top, left)
        if flip:  # OpenCV's flip: 40x faster than numpy's copy of a reversed view
            cv2.flip(patch, 1, dst=out[i])
        else:
            out[i] = patch


# JPEG/JFIF full-range BT.601 (Pillow's convert('YCbCr'), which VIPNet's loader used).
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114),
                 (-0.168736, -0.331264, 0.5),
                 (0.5, -0.418688, -0.081312))
_YCBCR_OFFSET = (0.0, 128.0, 128.0)
_AFFINE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _ycbcr_affine(device: torch.device, mean: tuple, std: tuple
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) with ``normalised = rgb @ A + b``, made once per device: building tensors from
    Python values on every step would cost a host-to-device copy (and a sync) each time."""
    key = (device, tuple(mean), tuple(std))
    if key not in _AFFINE_CACHE:
        matrix = torch.tensor(_RGB_TO_YCBCR, dtype=torch.float64)
        scale = 255.0 * torch.tensor(std, dtype=torch.float64)
        a = (matrix.t() / scale).float()
        b = ((torch.tensor(_YCBCR_OFFSET, dtype=torch.float64) / 255.0
              - torch.tensor(mean, dtype=torch.float64)) / (scale / 255.0)).float()
        _AFFINE_CACHE[key] = (a.to(device), b.to(device))
    return _AFFINE_CACHE[key]


def dpm_input(rgb_uint8: torch.Tensor, mean=YCBCR_MEAN, std=YCBCR_STD) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) -> the DPM's input: YCbCr / 255 with VIPNet's mean/std.

    The one conversion used in pre-training, validation, fine-tuning and scoring, done
    on the device (a quarter of the bytes cross the bus).  It computes in the
    channels-last layout and returns a channels-last tensor, so a batch that arrives as
    NHWC (``permute(0, 3, 1, 2)`` of the loader's batch) is never transposed in memory.
    In float, so it differs from Pillow's integer YCbCr (which truncates) by at most one
    grey level."""
    a, b = _ycbcr_affine(rgb_uint8.device, tuple(map(float, mean)), tuple(map(float, std)))
    nhwc = rgb_uint8.permute(0, 2, 3, 1).float()
    return torch.addmm(b, nhwc.reshape(-1, 3), a).view(nhwc.shape).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------- datasets
def pairs_from_group(size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pair the members of a group of ``size`` at random: ceil(size/2) pairs, every member in
    at least one (with ``size`` odd the last one is paired with a random other member)."""
    if size < 2:
        return []
    order = rng.permutation(size).tolist()
    pairs = [(order[i], order[i + 1]) for i in range(0, size - 1, 2)]
    if size % 2:
        pairs.append((order[-1], order[int(rng.integers(size - 1))]))
    return pairs


class ShardStream(IterableDataset):
    """Training (``train=True``: balanced shares, whole-set shuffling, random crops/flips) or
    evaluation stream (every sample once, centre crops) over a ShardSet.

    It yields *parts of batches* (``assemble`` joins one part of every worker into a
    batch): dicts of ``image`` (uint8 n×H×W×3, or n×2×H×W×3 for pairs), ``label`` and
    ``level`` (n or n×2), ``ref`` (the reference ids), ``worker``, ``skipped`` (samples
    skipped since the previous part) and ``warnings`` (why, once per cause)."""

    def __init__(self, shards: ShardSet, input_hw: tuple[int, int], batch_size: int,
                 train: bool, pairs: bool = False, seed: int = 0, rank: int = 0,
                 world: int = 1, pair_by: str = "group", rank_metric: str | None = None,
                 regress: tuple[str, ...] = ()):
        super().__init__()
        if pair_by not in RANK_PAIRS:  # RankIQA's levels of one group, or PINet-style
            raise ValueError(f"pairs are formed by one of {RANK_PAIRS}, not {pair_by!r}")
        if pair_by == "reference" and rank_metric is None:
            raise ValueError("pairs across the types of a reference need a pseudo-MOS to "
                             "order them (rank_metric)")
        missing = [m for m in (rank_metric, *regress) if m and m not in shards.fr_metrics]
        if missing:
            raise ValueError(f"the shards hold no {', '.join(missing)} scores (they have "
                             f"{', '.join(shards.fr_metrics)}): generate them with "
                             f"biqa-gen --fr-metrics {','.join(missing)}")
        self.shards = shards
        self.input_hw = input_hw
        self.batch_size = batch_size
        self.train = train
        self.pairs = pairs
        self.seed = seed
        self.rank = rank
        self.world = world
        self.pair_by = pair_by
        self.rank_metric = rank_metric
        self.regress = tuple(regress)
        # the scores a worker keeps per sample: the ranking metric first, then the targets
        self.score_names = tuple(dict.fromkeys(
            ([rank_metric] if pair_by == "reference" else []) + list(regress)))
        self._target_columns = [self.score_names.index(name) for name in self.regress]
        # (epoch, restart token) in shared memory: persistent workers see set_epoch.
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()
        # Per shard, shared by the workers of this process: 0 unchecked, 1 checked, 2 refused
        # (a refused shard is checked again by each worker, which reports the same reason).
        self._checked = torch.zeros(len(shards.urls), dtype=torch.uint8).share_memory_()
        self._indexes: dict[int, ShardIndex | str] = {}  # per worker process
        self._reported: set[str] = set()
        self._reader: OffsetReader | None = None

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

    def active_workers(self, workers: int) -> int:
        """How many of ``workers`` deliver a part of each training batch this epoch."""
        epoch = int(self._epoch[0])
        return sum(worker_plan(self.units, self.world, self.rank, max(workers, 1), w,
                               self.batch_size, np.random.default_rng([self.seed, epoch]))[1] > 0
                   for w in range(max(workers, 1)))

    # -- opening shards -------------------------------------------------------------
    def _index(self, shard: int) -> ShardIndex | str:
        """The checked index of a shard, or the reason it was refused (cached per worker).
        The first worker of a process to open a local shard reads and hashes it whole;
        the others, seeing it marked checked, read only its headers and JSON."""
        if shard not in self._indexes:
            url = self.shards.urls[shard]
            try:
                data = None if is_local(url) and int(self._checked[shard]) == 1 \
                    else read_shard_bytes(url)
                index = index_shard(url, data, self.shards.sha256[shard],
                                    self.shards.class_bases(), self.score_names)
                self._checked[shard] = 1
            except ShardRefused as exc:
                index = f"shard {os.path.basename(url)} refused: {exc}"
                self._checked[shard] = 2
            self._indexes[shard] = index
        return self._indexes[shard]

    def _release(self, shard_ids: list[int]) -> None:
        """Drop the in-memory bytes of remote shards once their window is used."""
        for shard in shard_ids:
            index = self._indexes.get(shard)
            if isinstance(index, ShardIndex) and index.data is not None:
                del self._indexes[shard]

    def _open(self, shard_ids: list[int], skips: "_Skips") -> list[ShardIndex]:
        opened = []
        for shard in shard_ids:
            index = self._index(shard)
            if isinstance(index, str):
                skips.add(self.shards.counts[shard], index)
                continue
            if index.unusable:
                skips.add(index.unusable, f"shard {os.path.basename(index.url)}: "
                                          f"{index.unusable} samples with broken members")
            opened.append(index)
        return opened

    # -- iteration ------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        epoch, restart = (int(v) for v in self._epoch)
        if self._reader is None:
            self._reader = OffsetReader()
        skips = _Skips(self._reported)
        if self.train:
            shard_ids, share = worker_plan(self.units, self.world, self.rank, workers, worker,
                                           self.batch_size,
                                           np.random.default_rng([self.seed, epoch]))
            if share == 0:
                return
            rng = np.random.default_rng([self.seed, epoch, restart, self.rank, worker])
            yield from self._train_parts(shard_ids, share, self.steps_per_epoch(), rng, worker,
                                         skips)
        else:
            rank_shards = deal_balanced(self.shards.counts, self.world)[self.rank]
            mine = deal_balanced([self.shards.counts[i] for i in rank_shards], workers)[worker]
            yield from self._eval_parts(sorted(rank_shards[j] for j in mine), worker, skips)

    def _units(self, indexes: list[ShardIndex], rng: np.random.Generator
               ) -> list[tuple[ShardIndex, tuple[int, ...]]]:
        """(shard, sample indices) of every unit: single samples, or ranking pairs formed
        within a (reference, type) group."""
        if not self.pairs:
            return [(ix, (i,)) for ix in indexes for i in range(len(ix))]
        return [(ix, (start + a, start + b)) for ix in indexes
                for start, stop in (ix.groups if self.pair_by == "group"
                                    else ix.reference_runs())
                for a, b in pairs_from_group(stop - start, rng)]

    def _windows(self, shard_ids: list[int], rng: np.random.Generator) -> Iterator[list[int]]:
        """All local shards at once; remote shards a window at a time."""
        local = [s for s in shard_ids if is_local(self.shards.urls[s])]
        remote = [s for s in shard_ids if not is_local(self.shards.urls[s])]
        if local:
            yield local
        remote = [remote[i] for i in rng.permutation(len(remote))]
        for start in range(0, len(remote), REMOTE_WINDOW):
            yield remote[start:start + REMOTE_WINDOW]

    def _train_parts(self, shard_ids: list[int], share: int, steps: int,
                     rng: np.random.Generator, worker: int, skips: "_Skips") -> Iterator[dict]:
        """``steps`` parts of ``share`` units, drawn from a random permutation of all units of
        this worker's shards (repeated from a fresh permutation if it runs out)."""
        def unit_stream() -> Iterator[tuple[ShardIndex, tuple[int, ...]]]:
            while True:
                produced = 0
                for window in self._windows(shard_ids, rng):
                    units = self._units(self._open(window, skips), rng)
                    for i in rng.permutation(len(units)):
                        produced += 1
                        yield units[i]
                    self._release(window)
                if produced == 0:
                    raise NoReadableShards(
                        f"rank {self.rank} loader worker {worker}: none of its "
                        f"{len(shard_ids)} shards has a usable sample; "
                        + "; ".join(sorted(skips.reasons)[:3]))

        units = unit_stream()
        for _ in range(steps):
            yield self._part(units, share, rng, worker, skips)

    def _eval_parts(self, shard_ids: list[int], worker: int, skips: "_Skips") -> Iterator[dict]:
        """Every usable unit of this worker's shards once, in order, centre-cropped; pairs
        drawn with a generator fixed per shard, so they do not depend on the deal."""
        for shard in shard_ids:
            indexes = self._open([shard], skips)
            units = self._units(indexes, np.random.default_rng([self.seed, shard]))
            stream = iter(units)
            for start in range(0, len(units), self.batch_size):
                yield self._part(stream, min(self.batch_size, len(units) - start), None,
                                 worker, skips, exhaustible=True)
            self._release([shard])
        if skips.pending:  # skips after the last part: report them in an empty part
            yield self._part(iter(()), 0, None, worker, skips, exhaustible=True)

    def _part(self, units: Iterator, size: int, rng: np.random.Generator | None, worker: int,
              skips: "_Skips", exhaustible: bool = False) -> dict:
        """Read, decode and crop ``size`` units into one shared-memory batch part; a unit
        whose image does not decode is skipped and replaced by the next one."""
        per_unit = 2 if self.pairs else 1
        h, w = self.input_hw
        images = torch.empty((size, per_unit, h, w, 3), dtype=torch.uint8)
        if get_worker_info() is not None:  # filled in place: no copy on the way to the loader
            images.share_memory_()
        pixels = images.numpy()
        labels = np.empty((size, per_unit), dtype=np.int64)
        levels = np.empty((size, per_unit), dtype=np.int64)
        scores = np.empty((size, per_unit, len(self.score_names)), dtype=np.float32)
        refs = []
        filled = 0
        while filled < size:
            try:
                index, members = next(units)
            except StopIteration:
                if exhaustible:
                    break
                raise
            try:
                decoded = [decode_image(index.image_bytes(i, self._reader)) for i in members]
            except (ValueError, OSError) as exc:
                skips.add(len(members), f"shard {os.path.basename(index.url)}: an image does "
                                        f"not decode ({exc})")
                continue
            crop_into(pixels[filled], decoded, rng)
            labels[filled] = index.labels[list(members)]
            levels[filled] = index.levels[list(members)]
            scores[filled] = index.scores[list(members)]
            refs.append(index.ref(members[0]))
            filled += 1
        images, labels, levels = images[:filled], labels[:filled], levels[:filled]
        better = self._rank_key(levels, scores[:filled])
        targets = scores[:filled, :, self._target_columns]
        if not self.pairs:
            images, labels, levels, better, targets = (
                images[:, 0], labels[:, 0], levels[:, 0], better[:, 0], targets[:, 0])
        skipped, warnings = skips.take()
        return {"image": images, "label": torch.from_numpy(labels),
                "level": torch.from_numpy(levels), "better": torch.from_numpy(better),
                "targets": torch.from_numpy(np.ascontiguousarray(targets)), "ref": refs,
                "worker": worker, "skipped": skipped, "warnings": warnings}

    def _rank_key(self, levels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Per image, a value that is larger for the better image of a pair: the negated
        level within a group, or the pseudo-MOS (negated where lower is better) across a
        reference's types; NaN where unknown."""
        if self.pair_by == "group":
            return -levels.astype(np.float32)
        from biqa.fr_metrics import FR_METRICS
        key = scores[..., 0]
        return key if FR_METRICS[self.rank_metric].higher_is_better else -key


class _Skips:
    """Skipped samples of one worker since its last part, and the reasons not yet reported
    (each reason is reported once per worker process)."""

    def __init__(self, reported: set[str]):
        self.count = 0
        self.reasons: set[str] = set()
        self._new: list[str] = []
        self._reported = reported

    def add(self, samples: int, reason: str) -> None:
        self.count += samples
        self.reasons.add(reason)
        if reason not in self._reported:
            self._reported.add(reason)
            self._new.append(f"{reason} ({samples} samples skipped)")

    @property
    def pending(self) -> bool:
        return bool(self.count or self._new)

    def take(self) -> tuple[int, list[str]]:
        taken = (self.count, self._new)
        self.count, self._new = 0, []
        return taken


def make_loader(dataset: Dataset, workers: int, pin: bool, batch_size: int | None = None
                ) -> DataLoader:
    """Workers persist across epochs (a ShardStream's deal is switched through
    ``set_epoch``, and its workers keep their shard indexes); ``pin`` for asynchronous copies
    to a GPU.  A ShardStream yields ready batch parts (``batch_size=None``)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def assemble(parts: Iterator[dict], active: int) -> Iterator[dict]:
    """Training batches from the parts of ``active`` workers: one part of each (the
    DataLoader delivers them round-robin).  ``image`` stays a list of the parts' tensors,
    joined on the device (one copy, after the transfer)."""
    pending: list[dict] = []
    for part in parts:
        pending.append(part)
        if len(pending) < active:
            continue
        if len({p["worker"] for p in pending}) != active:
            raise RuntimeError(f"batch parts out of order: workers {[p['worker'] for p in pending]}")
        yield join_parts(pending)
        pending = []


def training_batches(loader: DataLoader, stream: ShardStream) -> Iterator[dict]:
    """One epoch of whole training batches of ``stream`` (call ``set_epoch`` first)."""
    return assemble(iter(loader), stream.active_workers(loader.num_workers))


def batch_mixing(batches: list[list[str]]) -> dict:
    """How mixed batches are: the mean number of distinct references in a batch and the mean
    largest share of a batch that comes from one reference."""
    distinct = [len(set(refs)) for refs in batches]
    largest = [max(Counter(refs).values()) / len(refs) for refs in batches]
    return {"batches": len(batches), "distinct_refs": float(np.mean(distinct)),
            "largest_share": float(np.mean(largest))}


def full_shuffle_mixing(refs: list[str], batch: int, trials: int = 2000, seed: int = 0) -> dict:
    """``batch_mixing`` of batches drawn from a full shuffle of ``refs`` (one per sample):
    the value a streaming loader is measured against."""
    rng = np.random.default_rng(seed)
    return batch_mixing([[refs[i] for i in rng.choice(len(refs), batch, replace=False)]
                         for _ in range(trials)])


def join_parts(parts: list[dict]) -> dict:
    return {"image": [p["image"] for p in parts],
            **{key: torch.cat([p[key] for p in parts])
               for key in ("label", "level", "better", "targets")},
            "ref": [r for p in parts for r in p["ref"]],
            "skipped": sum(int(p["skipped"]) for p in parts),
            "warnings": [w for p in parts for w in p["warnings"]]}


# ------------------------------------------------------------------------- KADID-10k
_KADID_NAME = re.compile(r"^I(\d+)_(\d+)_(\d+)\.\w+$")


class KadidDataset(Dataset):
    """The real KADID-10k images (``dmos.csv`` + ``images/Iii_TT_LL.png``) labelled through the
    class table: type TT at level LL -> class_base(TT) + LL - 1.  Types not in the table are
    left out (``self.left_out`` counts them).  Items are centre crops, uint8 H×W×3."""

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
        image = np.empty((1, *self.input_hw, 3), dtype=np.uint8)
        crop_into(image, [rgb], None)
        return {"image": torch.from_numpy(image[0]), "label": torch.tensor(label),
                "level": torch.tensor(label % LEVELS + 1)}
