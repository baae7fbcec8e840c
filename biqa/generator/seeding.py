"""Per-sample seeds: a pure function of (global seed, reference id, type, level); and the
types drawn for a reference (``--types-per-ref``), a function of (global seed, reference id).

Seeds never depend on list positions, worker counts or shard layout, so a
sample is the same bytes whichever run, machine or shard produced it, and the
JSON's ``seed`` replays it: ``distort(ref, type, level, rng=seed)``.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _ref_entropy(ref_id: str) -> int:
    """128 bits of the reference id, stable across machines (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(ref_id.encode("utf-8")).digest()[:16], "little")


def sample_seed(global_seed: int, ref_id: str, type_id: int, level: int) -> int:
    """A 64-bit seed for ``numpy.random.default_rng`` from a SeedSequence over the four parts."""
    seq = np.random.SeedSequence([global_seed, _ref_entropy(ref_id), type_id, level])
    return int(seq.generate_state(1, np.uint64)[0])


def sample_rng(global_seed: int, ref_id: str, type_id: int, level: int) -> np.random.Generator:
    """The Generator a sample's distortion draws from."""
    return np.random.default_rng(sample_seed(global_seed, ref_id, type_id, level))


# Type ids start at 1, so a SeedSequence over (seed, reference, 0) never equals a sample's.
_TYPE_DRAW = 0


def drawn_types(global_seed: int, ref_id: str, pool: tuple[int, ...], k: int) -> tuple[int, ...]:
    """``k`` types of ``pool`` for one reference, by id: a function of (global seed,
    reference id, pool) only, so independent of list order, shards and workers."""
    seq = np.random.SeedSequence([global_seed, _ref_entropy(ref_id), _TYPE_DRAW])
    chosen = np.random.default_rng(seq).choice(len(pool), size=k, replace=False)
    return tuple(sorted(pool[i] for i in chosen))
