"""Noise types (11 white, 12 white in YCbCr, 13 impulse, 14 multiplicative).

MATLAB's ``imnoise`` clips its double output to [0, 1]; so do these.  Each type
draws its noise in a ``sample_*`` function and applies it in a deterministic one.
"""

from __future__ import annotations

import numpy as np

from ._matlab import rgb2ycbcr, ycbcr2rgb
from ._random import (float32_threshold_word, normal, uniform_float32_words,
                      words_to_float32)


def sample_gaussian(img: np.ndarray, variance: float, rng: np.random.Generator) -> dict:
    """Types 11, 12 and 15: N(0, var) for every element (``_random.normal``)."""
    return {"noise": normal(rng, img.shape, float(np.sqrt(variance)))}


def white_noise(img: np.ndarray, variance: float, noise: np.ndarray) -> np.ndarray:
    """Type 11: add the noise to every element, clip."""
    y = np.add(img, noise, dtype=np.float32)
    return np.clip(y, 0.0, 1.0, out=y)


def white_noise_color(img: np.ndarray, variance: float, noise: np.ndarray) -> np.ndarray:
    """Type 12: the noise on Y, Cb and Cr (BT.601), clipped there and after the way back
    (in float32, like the other noise types: 1e-7 of the double result)."""
    ycc = rgb2ycbcr(np.asarray(img, dtype=np.float32))
    ycc += noise
    return ycbcr2rgb(np.clip(ycc, 0.0, 1.0, out=ycc))


def sample_impulse(img: np.ndarray, density: float, rng: np.random.Generator) -> dict:
    """Type 13: u ~ U(0,1) per element (``rng.random`` float32); u < d/2 -> pepper,
    d/2 <= u < d -> salt.  Returns the elements hit, as flat index arrays (the
    comparisons are made on u's integer words: the same outcome, cheaper)."""
    words = uniform_float32_words(rng, img.shape).ravel()
    hit = np.flatnonzero(words < float32_threshold_word(density))
    pepper = words[hit] < float32_threshold_word(density / 2)
    return {"pepper": hit[pepper], "salt": hit[~pepper]}


def impulse_noise(img: np.ndarray, density: float, pepper, salt):
    """Type 13: black (0) at ``pepper``, white (1) at ``salt`` (flat element indices).

    Returned as paints over the unchanged image, so the type runs on the 8-bit
    levels with the stretch as a lookup table (``pixels="levels"``).
    """
    shape = img.shape
    return img, [(np.unravel_index(np.asarray(pepper, dtype=np.intp), shape), 0.0),
                 (np.unravel_index(np.asarray(salt, dtype=np.intp), shape), 1.0)]


def summarize_impulse(draws: dict) -> dict:
    """The counts: the positions are replayable from the seed."""
    return {"pepper": int(np.size(draws["pepper"])), "salt": int(np.size(draws["salt"]))}


def sample_speckle(img: np.ndarray, variance: float, rng: np.random.Generator) -> dict:
    """Type 14: n uniform with zero mean and the given variance, per element."""
    n = words_to_float32(uniform_float32_words(rng, img.shape))  # rng.random, float32
    n -= np.float32(0.5)
    n *= np.float32(np.sqrt(12.0 * variance))
    return {"noise": n}


def multiplicative_noise(img: np.ndarray, variance: float, noise: np.ndarray) -> np.ndarray:
    """Type 14: speckle J = I + n*I, clipped."""
    y = np.multiply(noise, img, dtype=np.float32)
    y += img
    return np.clip(y, 0.0, 1.0, out=y)
