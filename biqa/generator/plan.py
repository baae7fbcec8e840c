"""The job, planned up front: (reference, type) groups × levels cut into independent shard tasks.

Samples are ordered reference-major over the sorted reference table, then type
(by id), then level, so the levels of one (reference, type) -- a *group* -- are
adjacent, and so are a reference's groups.  Which types a reference gets is a
rule, evaluated on demand: every selected type, ``types_per_ref`` of them drawn
per reference, or the types its list row names (``--recipe kadis700k``).  A
shard holds a fixed range of whole groups, so the plan is a few integers (plus,
for listed types, one offset per reference): task ``i`` is computed on demand,
and planning 6 M samples allocates nothing per sample.

``--recipe vipnet`` adds a *walk*: chromatic aberration (27) made from a second
list in list order until ``walk_count`` references have all five levels.  Its
chunk ``k`` is rows ``[k·c, (k+1)·c)`` of that list (``c`` groups per shard), a
shard of its own after the others; ``walk.py`` decides which chunks the job keeps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from biqa.fr_metrics import parse_fr_metrics
from biqa.shards.writer import MEMBER_EXTENSIONS

from .refs import DEFAULT_MAX_PIXELS, RefTable
from .seeding import drawn_types

OUT_FORMATS = ("webdataset", "folder")
IMAGE_FORMATS = tuple(MEMBER_EXTENSIONS)
# Lossless WebP (fastest method) costs less CPU to encode and decode than PNG and is
# ~6 % smaller on the bundled refs: see docs/generator.md for the numbers.
DEFAULT_IMAGE_FORMAT = "webp"
# 200 samples of 512x384 are ~55 MB of WebP: big enough for streaming, small enough
# that even the default 7-reference job splits into 7 parallel tasks.
DEFAULT_PER_SHARD = 200
MAX_RESIZE_SIDE = 16384  # WebP's limit; PNG readers commonly refuse more too
RECIPES = ("kadis700k", "vipnet")
# VIPNet made chromatic aberration from a second, longer list, walked in order until
# 40 000 references had all five levels (additional_dataset_generator.m).
WALK_TYPE = 27
DEFAULT_WALK_COUNT = 40_000


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
    recipe: str | None = None  # None, or one of RECIPES
    types_per_ref: int = 0  # K types drawn per reference from the selection; 0: all of them
    walk_count: int = 0  # vipnet: references the walk must give type 27; 0: no walk

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
        self._check_recipe()

    def _check_recipe(self) -> None:
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.types_per_ref < 0:
            raise ValueError(f"--types-per-ref must be positive, got {self.types_per_ref}")
        if self.types_per_ref and self.recipe:
            raise ValueError(f"--types-per-ref draws the types of each reference, --recipe "
                             f"{self.recipe} fixes them: use one or the other")
        if self.types_per_ref > len(self.ref_types):
            raise ValueError(f"--types-per-ref {self.types_per_ref} is more than the "
                             f"{len(self.ref_types)} selected distortion types")
        if self.walk_count < 0:
            raise ValueError(f"--walk-count must be positive, got {self.walk_count}")
        if self.walk_count and (self.recipe != "vipnet" or WALK_TYPE not in self.type_ids):
            raise ValueError("a walk (--walk-refs, --walk-count) belongs to --recipe vipnet "
                             f"with type {WALK_TYPE} selected")

    @property
    def walk_type(self) -> int | None:
        """The type the walk makes (27), None for a job without a walk."""
        return WALK_TYPE if self.walk_count else None

    @functools.cached_property
    def ref_types(self) -> tuple[int, ...]:
        """The types references may get, by id (so keys ``<ref>_<TT>_<LL>`` come out
        byte-sorted): the selection less the walk's type."""
        return tuple(t for t in sorted(self.type_ids) if t != self.walk_type)

    def types_for(self, ref_id: str) -> tuple[int, ...]:
        """The types of one reference, by id, unless its list row names them."""
        if self.types_per_ref:
            return drawn_types(self.seed, ref_id, self.ref_types, self.types_per_ref)
        return self.ref_types

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
        for key, unset in (("recipe", None), ("types_per_ref", 0), ("walk_count", 0)):
            if cfg[key] == unset:  # so a job without them resumes output made before them
                del cfg[key]
        return cfg


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``n_groups`` groups from the ``skip``-th group of its first
    reference on; or, for a walk chunk (``rows``), type 27 of the references of list
    rows ``[rows[0], rows[1])``.

    It carries only the references it touches (ids, paths, listed names) and
    the job settings -- never pixels -- so it is cheap to send to any worker.
    """

    index: int
    name: str
    ref_ids: tuple[str, ...]
    ref_paths: tuple[str, ...]
    ref_rel: tuple[str, ...]
    ref_roots: tuple[str | None, ...]  # where each must resolve inside (None: anywhere)
    settings: JobSettings
    n_groups: int = 0
    skip: int = 0
    ref_types: tuple[tuple[int, ...], ...] | None = None  # listed types; None: settings'
    rows: tuple[int, int] | None = None  # a walk chunk: the list rows it makes
    ref_rows: tuple[int, ...] | None = None  # a walk chunk: each reference's list row

    @property
    def planned_samples(self) -> int:
        if self.rows is not None:
            return sum(row < self.rows[1] for row in self.ref_rows) * len(self.settings.levels)
        return self.n_groups * len(self.settings.levels)

    def types_of(self, ref: int) -> tuple[int, ...]:
        if self.ref_types is not None:
            return self.ref_types[ref]
        return self.settings.types_for(self.ref_ids[ref])

    def groups(self) -> Iterator[tuple[int, int]]:
        """(local reference index, type id) of each group, in sample order."""
        if self.rows is not None:
            yield from ((ref, self.settings.walk_type) for ref, row in enumerate(self.ref_rows)
                        if row < self.rows[1])
            return
        left, skip = self.n_groups, self.skip
        for ref in range(len(self.ref_ids)):
            for type_id in self.types_of(ref)[skip:]:
                if not left:
                    return
                yield ref, type_id
                left -= 1
            skip = 0

    def owned_groups(self) -> Iterator[tuple[int, int]]:
        """Every group whose files carry this shard's names: a walk chunk cut short
        still owns the images of its later rows (an earlier, uncut run wrote them)."""
        if self.rows is not None:
            return ((ref, self.settings.walk_type) for ref in range(len(self.ref_ids)))
        return self.groups()


@dataclass(frozen=True)
class Plan:
    refs: RefTable
    settings: JobSettings
    walk_refs: RefTable | None = None  # the walk's references, in list order

    @functools.cached_property
    def _group_starts(self) -> np.ndarray | None:
        """With listed types: the first group of each reference, then the total."""
        if self.refs.types is None:
            return None
        counts = np.fromiter(map(len, self.refs.types), dtype=np.int64, count=len(self.refs))
        return np.concatenate([[0], np.cumsum(counts)])

    @property
    def groups_per_ref(self) -> int:
        s = self.settings
        return s.types_per_ref or len(s.ref_types)

    @property
    def n_groups(self) -> int:
        """Groups outside the walk."""
        starts = self._group_starts
        return int(starts[-1]) if starts is not None else len(self.refs) * self.groups_per_ref

    @property
    def n_samples(self) -> int:
        """Samples planned: outside the walk, plus the walk's target."""
        return (self.n_groups + self.settings.walk_count) * len(self.settings.levels)

    @property
    def n_shards(self) -> int:
        """Shards outside the walk (the walk's chunks are numbered after them)."""
        return math.ceil(self.n_groups / self.settings.groups_per_shard)

    @property
    def n_chunks(self) -> int:
        if self.walk_refs is None or not self.settings.walk_count:
            return 0
        return math.ceil(len(self.walk_refs) / self.settings.groups_per_shard)

    def shard_name(self, index: int) -> str:
        width = max(6, len(str(self.n_shards + self.n_chunks - 1)))
        return f"shard-{index:0{width}d}"

    def all_shard_names(self) -> Iterator[str]:
        return (self.shard_name(i) for i in range(self.n_shards + self.n_chunks))

    def _ref_of_group(self, group: int) -> int:
        starts = self._group_starts
        if starts is None:
            return group // self.groups_per_ref
        return int(np.searchsorted(starts, group, side="right")) - 1

    def _first_group(self, ref: int) -> int:
        starts = self._group_starts
        return int(starts[ref]) if starts is not None else ref * self.groups_per_ref

    def task(self, index: int) -> ShardTask:
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} out of range 0..{self.n_shards - 1}")
        gps = self.settings.groups_per_shard
        first, stop = index * gps, min((index + 1) * gps, self.n_groups)
        r0, r1 = self._ref_of_group(first), self._ref_of_group(stop - 1) + 1
        refs = self.refs
        return ShardTask(index=index, name=self.shard_name(index), ref_ids=refs.ids[r0:r1],
                         ref_paths=refs.paths[r0:r1], ref_rel=refs.rel[r0:r1],
                         ref_roots=refs.roots[r0:r1], settings=self.settings,
                         n_groups=stop - first, skip=first - self._first_group(r0),
                         ref_types=None if refs.types is None else refs.types[r0:r1])

    def tasks(self) -> Iterator[ShardTask]:
        """The tasks outside the walk, lazily: a distributor pulls them as workers free up."""
        return (self.task(i) for i in range(self.n_shards))

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        """The list rows ``[first, stop)`` of walk chunk ``chunk``."""
        c = self.settings.groups_per_shard
        return chunk * c, min((chunk + 1) * c, len(self.walk_refs))

    def chunk_task(self, chunk: int, stop_row: int | None = None) -> ShardTask:
        """Walk chunk ``chunk``, whole or cut after list row ``stop_row − 1``; shard
        ``n_shards + chunk``.  Its references are written in id order, like any shard's."""
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"walk chunk {chunk} out of range 0..{self.n_chunks - 1}")
        first, stop = self.chunk_rows(chunk)
        if stop_row is not None and not first < stop_row <= stop:
            raise ValueError(f"walk chunk {chunk} holds rows {first}..{stop - 1}, not a cut "
                             f"at {stop_row}")
        walk = self.walk_refs
        order = sorted(range(first, stop), key=lambda row: walk.ids[row] + "_")
        index = self.n_shards + chunk
        return ShardTask(index=index, name=self.shard_name(index),
                         ref_ids=tuple(walk.ids[r] for r in order),
                         ref_paths=tuple(walk.paths[r] for r in order),
                         ref_rel=tuple(walk.rel[r] for r in order),
                         ref_roots=tuple(walk.roots[r] for r in order), settings=self.settings,
                         rows=(first, stop if stop_row is None else stop_row),
                         ref_rows=tuple(order))
