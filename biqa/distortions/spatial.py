"""Spatial types (19 jitter, 20 non-eccentricity patches, 21 pixelate, 23 colour blocks).

Types 20, 21 and 23 only move pixels or paint over them, so they run on the
8-bit levels (``pixels="levels"``): the KADID stretch around them becomes a
lookup table instead of float arithmetic on every element.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from ._matlab import imresize_nearest_index, interp2_cubic
from ._random import normal

JITTER_ROUNDS = 5


def sample_jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> dict:
    """Type 19: per round, per pixel, shifts (dy, dx) ~ N(0, amount^2)."""
    h, w = img.shape[:2]
    return {"shifts": normal(rng, (JITTER_ROUNDS, 2, h, w), amount)}


def jitter(img: np.ndarray, amount: float, shifts: np.ndarray) -> np.ndarray:
    """Type 19: five rounds of per-pixel shifts, resampled with Keys bicubic on a
    replicate-padded image (the original pads rows by the x-range and columns by the
    y-range; a sample outside the padded grid becomes NaN, then black)."""
    h, w, _ = img.shape
    planes = np.ascontiguousarray(np.moveaxis(img, 2, 0), dtype=np.float32)
    rows, cols = np.mgrid[1:h + 1, 1:w + 1].astype(np.float32)
    for sy, sx in np.asarray(shifts, dtype=np.float32):
        pad_r = math.ceil(np.max(np.abs(sx)))
        pad_c = math.ceil(np.max(np.abs(sy)))
        padded = np.pad(planes, ((0, 0), (pad_r, pad_r), (pad_c, pad_c)), mode="edge")
        planes = interp2_cubic(padded, cols + pad_c - sx, rows + pad_r - sy)
    out = np.moveaxis(planes, 0, 2)
    return np.nan_to_num(out, nan=0.0)


PATCH_SIZE = 16
PATCH_RADIUS = 16


def sample_patches(img: np.ndarray, count: int, rng: np.random.Generator) -> dict:
    """Type 20: per patch, its 0-based (row, col) and where it is pasted: a random
    position at least 16 px from the top/left and 32 px from the bottom/right,
    moved by round((u - 0.5) * 16) px per axis (MATLAB's rounding, half away
    from zero)."""
    h, w = img.shape[:2]
    size, radius = PATCH_SIZE, PATCH_RADIUS
    u = rng.random((int(count), 4))
    src_col = np.floor(u[:, 0] * (w - size - 2 * radius) + 0.5) + radius - 1
    src_row = np.floor(u[:, 1] * (h - size - 2 * radius) + 0.5) + radius - 1
    # The original's round((v - 0.5) * radius + start + 1), 1-based, in its order.
    dst_col = np.floor((u[:, 2] - 0.5) * radius + src_col + 1 + 0.5) - 1
    dst_row = np.floor((u[:, 3] - 0.5) * radius + src_row + 1 + 0.5) - 1
    return {"patches": np.stack([src_row, src_col, dst_row, dst_col], axis=1).astype(np.int64)}


def non_eccentricity_patch(img: np.ndarray, count: int, patches) -> np.ndarray:
    """Type 20: copy 16x16 patches (src_row, src_col) -> (dst_row, dst_col) in order;
    later copies see earlier ones."""
    size = PATCH_SIZE
    out = img.copy()
    for r, c, dr, dc in np.asarray(patches, dtype=np.int64).tolist():
        out[dr:dr + size, dc:dc + size] = out[r:r + size, c:c + size].copy()
    return out


@functools.lru_cache(maxsize=64)
def _pixelate_plan(h: int, w: int, strength: float):
    """The down-and-up nearest-neighbour resize as one gather: the distinct source
    rows, the source column of every output column, and which distinct row each
    output row repeats."""
    z = 0.95 - strength ** 0.6
    lo_h, lo_w = math.ceil(z * h), math.ceil(z * w)
    rows = imresize_nearest_index(h, lo_h, z)[imresize_nearest_index(lo_h, h, h / lo_h)]
    cols = imresize_nearest_index(w, lo_w, z)[imresize_nearest_index(lo_w, w, w / lo_w)]
    distinct, repeat = np.unique(rows, return_inverse=True)
    return distinct, cols, repeat


def pixelate(img: np.ndarray, strength: float, rng=None) -> np.ndarray:
    """Type 21: nearest-neighbour down by z = 0.95 - s^0.6 and back, MATLAB geometry
    (deterministic; ``rng`` unused).  The columns are gathered once per distinct
    source row, the rows then repeated; 8-bit RGB pixels move as 32-bit words."""
    h, w = img.shape[:2]
    distinct, cols, repeat = _pixelate_plan(h, w, float(strength))
    src = np.take(img, distinct, axis=0)
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        words = cv2.cvtColor(src, cv2.COLOR_RGB2RGBA).view(np.uint32)[..., 0]
        src = cv2.cvtColor(np.take(words, cols, axis=1).view(np.uint8).reshape(-1, w, 4),
                           cv2.COLOR_RGBA2RGB)
    else:
        src = np.take(src, cols, axis=1)
    return np.take(src, repeat, axis=0)


BLOCK_SIZE = 32


def sample_blocks(img: np.ndarray, count: int, rng: np.random.Generator) -> dict:
    """Type 23: per block, a uniform RGB colour in [0,1]^3 (float32, the image's
    precision) and a 0-based top-left corner round(u * (W-32), u' * (H-32)) - 1."""
    h, w = img.shape[:2]
    size = BLOCK_SIZE
    colours, corners = [], []
    for _ in range(int(count)):  # colour then position, per block, as the original
        colours.append(rng.random(3).astype(np.float32))
        x, y = rng.random(2) * (w - size, h - size)
        corners.append((math.floor(y + 0.5) - 1, math.floor(x + 0.5) - 1))
    return {"corners": np.array(corners, dtype=np.int64).reshape(-1, 2),
            "colours": np.array(colours, dtype=np.float32).reshape(-1, 3)}


def color_block(img: np.ndarray, count: int, corners, colours):
    """Type 23: 32x32 squares of the given colours at the given corners, later ones
    on top: returned as paints over the unchanged image (see ``DistortionSpec``)."""
    size = BLOCK_SIZE
    paints = []
    for (r0, c0), colour in zip(np.asarray(corners, dtype=np.int64).tolist(),
                                np.asarray(colours, dtype=np.float32)):
        paints.append(((slice(max(r0, 0), r0 + size), slice(max(c0, 0), c0 + size)), colour))
    return img, paints
