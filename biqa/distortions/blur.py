"""Blur and sharpening types (1 gaussian, 2 lens, 3 motion, 24 high sharpen)."""

from __future__ import annotations

import numpy as np

from ._matlab import (fspecial_disk, fspecial_gaussian, fspecial_motion, imfilter_replicate,
                      imgaussfilt, lab2rgb, rgb2lab)


def gaussian_blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Type 1: ``imgaussfilt`` with replicate borders."""
    return imgaussfilt(img, sigma)


def lens_blur(img: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Type 2: ``fspecial('disk', r)`` pillbox, replicate borders."""
    return imfilter_replicate(img, fspecial_disk(radius))


def sample_motion(img: np.ndarray, length: float, rng: np.random.Generator) -> dict:
    """Type 3's direction: ``randi([0, 180])`` degrees."""
    return {"angle": int(rng.integers(0, 181))}


def motion_blur_at(img: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Type 3: MATLAB's anti-aliased motion kernel at ``angle`` degrees, replicate
    borders."""
    return imfilter_replicate(img, fspecial_motion(length, angle))


def high_sharpen(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 24: ``imsharpen(I, 'Radius', 3, 'Amount', a)`` — unsharp mask on L* only."""
    lab = rgb2lab(img)
    lum = lab[..., 0]
    blurred = imfilter_replicate(lum, fspecial_gaussian(13, 3.0))
    lab[..., 0] = lum + amount * (lum - blurred)
    return np.clip(lab2rgb(lab), 0.0, 1.0)
