"""Spatial types (19 jitter, 20 non-eccentricity patches, 21 pixelate, 23 colour blocks)."""

from __future__ import annotations

import math

import numpy as np

from ._matlab import imresize_nearest_index, interp2_cubic


def _round(x):
    """MATLAB ``round`` (half away from zero) for the non-negative values used here."""
    return np.floor(np.asarray(x) + 0.5).astype(np.int64)


def jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 19: five rounds of per-pixel random shifts, resampled with Keys bicubic on a
    replicate-padded image (the original pads rows by the x-range and columns by the
    y-range; a sample outside the padded grid becomes NaN, then black)."""
    h, w, _ = img.shape
    planes = np.ascontiguousarray(np.moveaxis(img, 2, 0))
    rows, cols = np.mgrid[1:h + 1, 1:w + 1].astype(np.float32)
    for _ in range(5):
        shifts = rng.standard_normal((2, h, w), dtype=np.float32) * np.float32(amount)
        sy, sx = shifts[0], shifts[1]
        pad_r = math.ceil(np.max(np.abs(sx)))
        pad_c = math.ceil(np.max(np.abs(sy)))
        padded = np.pad(planes, ((0, 0), (pad_r, pad_r), (pad_c, pad_c)), mode="edge")
        planes = interp2_cubic(padded, cols + pad_c - sx, rows + pad_r - sy)
    out = np.moveaxis(planes, 0, 2)
    return np.nan_to_num(out, nan=0.0)


def non_eccentricity_patch(img: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Type 20: copy 16x16 patches to nearby random offsets; later copies see earlier ones."""
    h, w, _ = img.shape
    size, radius = 16, 16
    h_max, w_max = h - size - radius, w - size - radius
    out = img.copy()
    for u_w, u_h, v_w, v_h in rng.random((count, 4)):
        ws = int(_round(u_w * (w_max - radius))) + radius - 1  # 0-based
        hs = int(_round(u_h * (h_max - radius))) + radius - 1
        patch = out[hs:hs + size, ws:ws + size].copy()
        dw = int(_round((v_w - 0.5) * radius + ws + 1)) - 1
        dh = int(_round((v_h - 0.5) * radius + hs + 1)) - 1
        out[dh:dh + size, dw:dw + size] = patch
    return out


def pixelate(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Type 21: nearest-neighbour down by z = 0.95 - s^0.6 and back, MATLAB geometry."""
    h, w, _ = img.shape
    z = 0.95 - strength ** 0.6
    lo_h, lo_w = math.ceil(z * h), math.ceil(z * w)
    small = img[imresize_nearest_index(h, lo_h, z)][:, imresize_nearest_index(w, lo_w, z)]
    return small[imresize_nearest_index(lo_h, h, h / lo_h)][
        :, imresize_nearest_index(lo_w, w, w / lo_w)]


def color_block(img: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Type 23: paste 32x32 squares of uniform random colour at random positions."""
    h, w, _ = img.shape
    size = 32
    out = img.copy()
    for _ in range(count):
        colour = rng.random(3).astype(img.dtype)
        x, y = rng.random(2) * (w - size, h - size)
        c0, r0 = int(_round(x)) - 1, int(_round(y)) - 1  # 1-based round(.) -> 0-based
        out[max(r0, 0):r0 + size, max(c0, 0):c0 + size] = colour
    return out
