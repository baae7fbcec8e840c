"""Colour types (4 diffusion, 5 shift, 7 HSV saturation, 8 Lab saturation)."""

from __future__ import annotations

import numpy as np

from ._matlab import hsv2rgb, imgaussfilt, lab2rgb, mapmm, rgb2gray, rgb2hsv, rgb2lab


def color_diffusion(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 4: blur a*, b* with sigma 1.5a+2, then *multiply* them by a (the original's
    ``imcolorblur(I, 1.5a+2, a)``, which over-saturates from level 2 on)."""
    lab = rgb2lab(img)
    lab[..., 1:] = imgaussfilt(np.ascontiguousarray(lab[..., 1:]), 1.5 * amount + 2) * amount
    return np.clip(lab2rgb(lab), 0.0, 1.0)


def _percentile1(x: np.ndarray, perc: float) -> float:
    """The original's ``percentile1``: sorted(x)[round(n*perc/100)] (1-based, clamped)."""
    flat = x.ravel()
    n = flat.size
    i = int(np.floor(min(max(n * perc / 100.0, 1), n) + 0.5)) - 1
    return float(np.partition(flat, i)[i])


def _ps2(a: np.ndarray) -> np.ndarray:
    """Percentile stretch: clamp to the 1st/99th percentiles, then min-max stretch."""
    a = mapmm(a)
    hi = _percentile1(a, 99)
    lo = 1.0 - _percentile1(1.0 - a, 99)
    return mapmm(np.maximum(np.minimum(a, hi), lo))


def _edge_weight(img: np.ndarray) -> np.ndarray:
    """Edge map that localises the colour shift: smoothed gradient magnitude of luma."""
    gray = rgb2gray(img.astype(np.float64))
    gy, gx = np.gradient(gray)
    e = np.sqrt(gx * gx + gy * gy)
    e = mapmm(imgaussfilt(e, 4))
    return _ps2(np.clip(e, 0.1, 1.0))


def sample_color_shift(img: np.ndarray, amount: float, rng: np.random.Generator) -> dict:
    """Type 5's shift of the green channel, ``round(normr(rand(1,2)) * a)``: (rows,
    cols), both components >= 0."""
    u = rng.random(2)
    u = u / np.sqrt(np.sum(u * u))
    r, c = np.floor(u * amount + 0.5).astype(int)
    return {"shift": (int(r), int(c))}


def color_shift(img: np.ndarray, amount: float, shift: tuple[int, int]) -> np.ndarray:
    """Type 5 with its drawn ``shift`` (``amount`` only sets the shift's length)."""
    return color_shift_by(img, shift)


def color_shift_by(img: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """Type 5's pixel work: shift the green channel by (rows, cols) (replicate
    padding) and blend it in where the image has edges."""
    w = _edge_weight(img)
    dr, dc = shift
    g = img[..., 1]
    h, wd = g.shape
    rows = np.clip(np.arange(h) - dr, 0, h - 1)
    cols = np.clip(np.arange(wd) - dc, 0, wd - 1)
    shifted = g[rows][:, cols]
    out = img.astype(np.float64)
    out[..., 1] = shifted * w + g * (1.0 - w)
    return out


def color_saturation_hsv(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Type 7: S <- f*S in HSV (negative f inverts the hue); the stretch handles range."""
    hsv = rgb2hsv(img)
    hsv[..., 1] *= factor
    return hsv2rgb(hsv)


def color_saturation_lab(img: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Type 8: a*, b* <- s*(a*, b*), back to sRGB, clipped."""
    lab = rgb2lab(img)
    lab[..., 1:] *= scale
    return np.clip(lab2rgb(lab), 0.0, 1.0)
