"""Normal deviates that are fast and the same on every machine.

NumPy's ``standard_normal`` (a ziggurat) costs ~9 ns a float32 value, more than
the whole pixel work of the noise types.  Box-Muller with NumPy's float32
``log``/``sin``/``cos`` is 4x faster but not portable: those functions are
SIMD code whose last bits differ between AVX2 and AVX-512 builds, so a seed
would not give the same bytes everywhere.  Here a deviate is a lookup instead:
16 random bits pick one of 65536 equally likely bins of N(0, 1) and the bin's
mean is the value (a table built once, in double precision); the two outer
bins (|z| > 4.17, p = 2^-15 together) are resolved exactly from 53 further bits.
Only integer operations and a gather are involved, so the values are
bit-identical on any CPU, and the distribution differs from N(0, 1) only by
the 2^-16 quantisation of its probability in the body -- 4e-5 sd between
neighbouring values, far below an 8-bit step at every noise level used here.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.special import ndtri

_BITS = 16
_BINS = 1 << _BITS
_CHUNK = 1 << 16


@functools.lru_cache(maxsize=1)
def _bin_means() -> np.ndarray:
    """E[Z | Z in bin i] for the 65536 equal-probability bins of N(0, 1):
    (phi(a_i) - phi(a_{i+1})) / P(bin), with a_i = Phi^-1(i / 65536)."""
    edges = ndtri(np.arange(_BINS + 1, dtype=np.float64) / _BINS)  # -inf .. inf
    pdf = np.exp(-0.5 * edges * edges) / math.sqrt(2.0 * math.pi)
    pdf[[0, -1]] = 0.0
    means = (pdf[:-1] - pdf[1:]) * _BINS
    means.setflags(write=False)
    return means


@functools.lru_cache(maxsize=64)
def _scaled_table(sigma: float) -> np.ndarray:
    table = (_bin_means() * sigma).astype(np.float32)
    table.setflags(write=False)
    return table


def normal(rng: np.random.Generator, shape, sigma: float = 1.0) -> np.ndarray:
    """float32 N(0, sigma^2) deviates of ``shape``, drawn from ``rng``'s bit stream.

    Consumes ceil(n / 4) 64-bit words, then one word per outer-bin value.
    """
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    n = math.prod(shape)
    words = rng.bit_generator.random_raw((n + 3) // 4)
    index = words.view(np.uint16)[:n]
    out = np.empty(n, dtype=np.float32)
    table = _scaled_table(float(sigma))
    for start in range(0, n, _CHUNK):  # take() widens indices to intp: keep that temporary small
        np.take(table, index[start:start + _CHUNK], out=out[start:start + _CHUNK])
    # Outer bins: index 0 or 65535, i.e. index - 1 wraps to >= 65534.
    outer = np.flatnonzero(np.subtract(index, 1, dtype=np.uint16) >= _BINS - 2)
    if outer.size:
        # p uniform within the bin, 53 bits: p = (k + 1/2) 2^-53 2^-16 (lower tail).
        extra = rng.bit_generator.random_raw(outer.size) >> np.uint64(11)
        p = (extra.astype(np.float64) + 0.5) * 2.0 ** -53 / _BINS
        z = ndtri(p) * sigma
        upper = index[outer] == _BINS - 1
        out[outer] = np.where(upper, -z, z).astype(np.float32)
    return out.reshape(shape)


def uniform_float32_words(rng: np.random.Generator, shape) -> np.ndarray:
    """The 32-bit words behind ``rng.random(shape, dtype=np.float32)``: that call
    returns (word >> 8) * 2^-24 of these, consuming the generator identically.

    Uniform deviates compared with a threshold can then be compared as integers
    (``float32_threshold_word``), and the words come straight from the bit
    generator, at 60 % of the cost.  NumPy's PCG64 hands out 32-bit words as the
    low then the high half of each 64-bit output; where that cannot be used
    as is (another bit generator, a half-word left over from an earlier draw, an
    odd count) the words are taken from ``rng.integers`` the slow way -- which
    ``tests/test_distortions_api.py`` checks gives the same words.
    """
    n = math.prod(shape)
    bitgen = rng.bit_generator
    if (n % 2 == 0 and type(bitgen) in (np.random.PCG64, np.random.PCG64DXSM)
            and not bitgen.state["has_uint32"]):
        return bitgen.random_raw(n // 2).view(np.uint32).reshape(shape)
    # rng.random's words one by one: next_uint32, as rng.integers over the full range.
    return rng.integers(0, 2 ** 32, size=shape, dtype=np.uint32)


def float32_threshold_word(threshold: float) -> int:
    """The word w such that, for the words of ``uniform_float32_words``,
    (word >> 8) * 2^-24 < float32(threshold)  <=>  word < w."""
    return math.ceil(float(np.float32(threshold)) * 2 ** 24) * 256  # float32 * 2^24 is exact


def words_to_float32(words: np.ndarray) -> np.ndarray:
    """``rng.random(..., dtype=np.float32)`` from its words (which are overwritten)."""
    u = np.right_shift(words, np.uint32(8), out=words).astype(np.float32)
    u *= np.float32(2.0 ** -24)
    return u
