"""Tone-curve types (16 brighten, 17 darken, 18 mean shift, 25 contrast change)."""

from __future__ import annotations

import numpy as np

from ._matlab import lab2rgb, rgb2lab, spline_curve


def _midtone_curve(x: np.ndarray, mid: float) -> np.ndarray:
    """The original's ``curves(x, mid)``: spline through (0,0), (0.5,mid), (1,1)."""
    return spline_curve(x, (0.0, 0.5, 1.0), (0.0, mid, 1.0))


def brighten(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 16: mean of the curve on RGB (weight 2) and on L* (weight 1)."""
    mid = 0.5 + amount / 2
    lab = rgb2lab(img)
    lab[..., 0] = _midtone_curve(lab[..., 0] / 100.0, mid) * 100.0
    j_rgb = _midtone_curve(img, mid)
    return (2.0 * j_rgb + np.clip(lab2rgb(lab), 0.0, 1.0)) / 3.0


def darken(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 17: the curve through (0.5, 0.5-a/2) on RGB only (the original's Lab
    branch is never taken)."""
    return _midtone_curve(img, 0.5 - amount / 2)


def mean_shift(img: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Type 18: add a constant and clip; the output stretch partly undoes it."""
    return np.clip(img + np.float32(delta), 0.0, 1.0)


def contrast_change(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Type 25: S-shaped (a>0) or flattening (a<0) spline through five knots."""
    return spline_curve(img, (0.0, 0.3, 0.5, 0.7, 1.0),
                        (0.0, 0.25 - amount / 4, 0.5, 0.75 + amount / 4, 1.0))
