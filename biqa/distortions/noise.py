"""Noise types (11 white, 12 white in YCbCr, 13 impulse, 14 multiplicative).

MATLAB's ``imnoise`` clips its double output to [0, 1]; so do these.
"""

from __future__ import annotations

import numpy as np

from ._matlab import rgb2ycbcr, ycbcr2rgb


def _gaussian(shape, variance: float, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(variance))


def white_noise(img: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Type 11: add N(0, var) to every element."""
    return np.clip(img + _gaussian(img.shape, variance, rng), 0.0, 1.0)


def white_noise_color(img: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Type 12: N(0, var) on Y, Cb and Cr (BT.601), clipped there and after the way back."""
    ycc = rgb2ycbcr(img.astype(np.float64))
    ycc = np.clip(ycc + _gaussian(img.shape, variance, rng), 0.0, 1.0)
    return ycbcr2rgb(ycc)


def impulse_noise(img: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Type 13: salt & pepper per element, MATLAB's rule u<d/2 -> 0, d/2<=u<d -> 1."""
    u = rng.random(img.shape, dtype=np.float32)
    out = img.copy()
    out[u < density / 2] = 0.0
    out[(u >= density / 2) & (u < density)] = 1.0
    return out


def multiplicative_noise(img: np.ndarray, variance: float,
                         rng: np.random.Generator) -> np.ndarray:
    """Type 14: speckle J = I + n*I with n uniform, zero mean, the given variance."""
    n = (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(
        np.sqrt(12.0 * variance))
    return np.clip(img + n * img, 0.0, 1.0)
