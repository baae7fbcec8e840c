"""The job, planned up front: (references × types × levels) cut into independent shard tasks.

Samples are ordered reference-major over the sorted reference table, then type
(by id), then level, so the levels of one (reference, type) -- a *group* -- are
adjacent.  A shard holds a fixed range of whole groups, so the plan is a few
integers: task ``i`` is computed on demand, and planning 6 M samples allocates
nothing per sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

from biqa.fr_metrics import parse_fr_metrics
from biqa.shards.writer import MEMBER_EXTENSIONS

from .refs import DEFAULT_MAX_PIXELS, RefTable

OUT_FORMATS = ("webdataset", "folder")
IMAGE_FORMATS = tuple(MEMBER_EXTENSIONS)
# Lossless WebP (fastest method) costs less CPU to encode and decode than PNG and is
# ~6 % smaller on the bundled refs: see docs/generator.md for the numbers.
DEFAULT_IMAGE_FORMAT = "webp"
# 200 samples of 512x384 are ~55 MB of WebP: big enough for streaming, small enough
# that even the default 7-reference job splits into 7 parallel tasks.
DEFAULT_PER_SHARD = 200
MAX_RESIZE_SIDE = 16384  # WebP's limit; PNG readers commonly refuse more too


@dataclass(frozen=True)
class JobSettings:
    """Everything that decides the bytes of the output (and nothing that does not, like
    worker counts): two runs with equal settings and references write equal files."""

    out_dir: str
    type_ids: tuple[int, ...]  # in run order: the class index follows this order
    levels: tuple[int, ...]
    seed: int = 0
    per_shard: int = DEFAULT_PER_SHARD
    image_format: str = DEFAULT_IMAGE_FORMAT
    out_format: str = "webdataset"
    resize: tuple[int, int] | None = None
    min_size: int = 1  # the largest min_size of the selected types
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger references are skipped; 0: no limit
    allow_upscale: bool = False  # let --resize enlarge references below min_size
    refs_outside_root: bool = False  # read list entries that resolve outside their root
    fr_metrics: tuple[str, ...] = ()  # full-reference scores recorded in each sample's JSON

    def __post_init__(self):
        if not self.type_ids:
            raise ValueError("no distortion type selected")
        if len(set(self.type_ids)) != len(self.type_ids):
            raise ValueError(f"distortion types selected twice: {self.type_ids}")
        if not self.levels or any(not 1 <= lv <= 5 for lv in self.levels) \
                or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct integers 1..5, got {self.levels}")
        if self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.per_shard < 1:
            raise ValueError(f"--per-shard must be positive, got {self.per_shard}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got "
                             f"{self.image_format!r}")
        if self.out_format not in OUT_FORMATS:
            raise ValueError(f"format must be one of {OUT_FORMATS}, got {self.out_format!r}")
        if self.fr_metrics and tuple(self.fr_metrics) != parse_fr_metrics(
                ",".join(self.fr_metrics)):
            raise ValueError(f"--fr-metrics {','.join(self.fr_metrics)}: name each metric once, "
                             "as biqa.fr_metrics names it")
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be 0 (no limit) or positive, got "
                             f"{self.max_pixels}")
        if self.resize is not None:
            w, h = self.resize
            if min(self.resize) < self.min_size:
                raise ValueError(f"--resize {w}x{h} is smaller than the selected distortions "
                                 f"need ({self.min_size}x{self.min_size})")
            if max(self.resize) > MAX_RESIZE_SIDE:
                raise ValueError(f"--resize {w}x{h}: each side must be at most "
                                 f"{MAX_RESIZE_SIDE} px")
            if self.max_pixels and w * h > self.max_pixels:
                raise ValueError(f"--resize {w}x{h} is {w * h} pixels, more than --max-pixels "
                                 f"{self.max_pixels}")

    @property
    def sample_type_ids(self) -> tuple[int, ...]:
        """Types in sample order (by id), so keys ``<ref>_<TT>_<LL>`` come out byte-sorted."""
        return tuple(sorted(self.type_ids))

    @property
    def groups_per_shard(self) -> int:
        """Whole groups per shard: per-shard counts are multiples of the number of levels."""
        return max(1, self.per_shard // len(self.levels))

    def class_of(self, type_id: int, level: int) -> int:
        """``type_index·5 + (level−1)`` over the types of this run."""
        return self.type_ids.index(type_id) * 5 + level - 1

    def as_config(self) -> dict:
        cfg = asdict(self)
        cfg.pop("out_dir")
        cfg["type_ids"] = list(self.type_ids)
        cfg["levels"] = list(self.levels)
        cfg["fr_metrics"] = list(self.fr_metrics)
        cfg["resize"] = list(self.resize) if self.resize else None
        cfg["per_shard_effective"] = self.groups_per_shard * len(self.levels)
        return cfg


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: groups ``[first_group, stop_group)`` of the job.

    It carries only the references it touches (ids, paths, listed names) and
    the job settings -- never pixels -- so it is cheap to send to any worker.
    """

    index: int
    name: str
    first_group: int
    stop_group: int
    ref_offset: int  # table index of refs[0]
    ref_ids: tuple[str, ...]
    ref_paths: tuple[str, ...]
    ref_rel: tuple[str, ...]
    ref_roots: tuple[str | None, ...]  # where each must resolve inside (None: anywhere)
    settings: JobSettings

    @property
    def planned_samples(self) -> int:
        return (self.stop_group - self.first_group) * len(self.settings.levels)

    def groups(self) -> Iterator[tuple[int, int]]:
        """(local reference index, type id) of each group, in sample order."""
        types = self.settings.sample_type_ids
        for g in range(self.first_group, self.stop_group):
            ref, t = divmod(g, len(types))
            yield ref - self.ref_offset, types[t]


@dataclass(frozen=True)
class Plan:
    refs: RefTable
    settings: JobSettings

    @property
    def n_groups(self) -> int:
        return len(self.refs) * len(self.settings.type_ids)

    @property
    def n_samples(self) -> int:
        return self.n_groups * len(self.settings.levels)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_groups / self.settings.groups_per_shard)

    def shard_name(self, index: int) -> str:
        width = max(6, len(str(self.n_shards - 1)))
        return f"shard-{index:0{width}d}"

    def task(self, index: int) -> ShardTask:
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} out of range 0..{self.n_shards - 1}")
        gps, n_types = self.settings.groups_per_shard, len(self.settings.type_ids)
        first, stop = index * gps, min((index + 1) * gps, self.n_groups)
        r0, r1 = first // n_types, (stop - 1) // n_types + 1
        return ShardTask(index=index, name=self.shard_name(index), first_group=first,
                         stop_group=stop, ref_offset=r0, ref_ids=self.refs.ids[r0:r1],
                         ref_paths=self.refs.paths[r0:r1], ref_rel=self.refs.rel[r0:r1],
                         ref_roots=self.refs.roots[r0:r1], settings=self.settings)

    def tasks(self) -> Iterator[ShardTask]:
        """All tasks, lazily: a distributor pulls them as workers free up."""
        return (self.task(i) for i in range(self.n_shards))
