"""Types 6 (colour quantisation) and 22 (multi-level Otsu quantisation).

Type 6 stands in for MATLAB ``rgb2ind(I, n)`` + ``ind2rgb``: a minimum-variance
colour map (Wu's greedy box splitting on a 5-bit-per-channel histogram) and
Floyd-Steinberg error diffusion onto that map.  Type 22 is ``multithresh`` +
``imquantize`` with the exact Otsu optimum found by dynamic programming.
See docs/quantization_denoise.md for the choices and their measured effect.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ._matlab import im2uint8

# ---------------------------------------------------------------- type 6

_WU_BITS = 5                      # histogram resolution per channel, as Wu and MATLAB
_WU_SIDE = (1 << _WU_BITS) + 1    # one zero plane in front makes the sums prefix sums


def _wu_moments(rgb8: np.ndarray) -> np.ndarray:
    """3-D prefix sums over 5-bit cells of (count, sum R, sum G, sum B, sum of squares).

    Prefix sums make any box's moments an inclusion-exclusion of corners, so all
    candidate cuts of a box are evaluated in one vectorised step.
    """
    px = rgb8.reshape(-1, 3)
    cell = (px >> (8 - _WU_BITS)).astype(np.intp) + 1
    flat = (cell[:, 0] * _WU_SIDE + cell[:, 1]) * _WU_SIDE + cell[:, 2]
    size = _WU_SIDE ** 3
    pxf = px.astype(np.float64)
    columns = [np.bincount(flat, minlength=size).astype(np.float64)]
    columns += [np.bincount(flat, weights=pxf[:, c], minlength=size) for c in range(3)]
    columns.append(np.bincount(flat, weights=np.einsum("ij,ij->i", pxf, pxf), minlength=size))
    m = np.stack(columns, axis=-1).reshape((_WU_SIDE,) * 3 + (5,))
    return m.cumsum(0).cumsum(1).cumsum(2)


def _slab_moments(m: np.ndarray, box: tuple[int, ...], axis: int) -> np.ndarray:
    """Prefix moments of the box's cross-section range at every plane lo..hi along
    ``axis``, shape (hi-lo+1, 5): row k minus row 0 is the part of the box with
    cells up to plane lo+k, i.e. the lower half of a cut there."""
    others = [a for a in range(3) if a != axis]
    total = 0
    for corner, sign in (((1, 1), 1), ((1, 0), -1), ((0, 1), -1), ((0, 0), 1)):
        idx: list = [None, None, None]
        idx[axis] = slice(box[2 * axis], box[2 * axis + 1] + 1)
        for o, c in zip(others, corner):
            idx[o] = box[2 * o + c]
        total = total + sign * m[tuple(idx)]
    return total


_CORNER_SIGNS = np.array([(-1) ** (3 - bin(c).count("1")) for c in range(8)], dtype=np.float64)
_CORNER_BITS = np.array([[(c >> a) & 1 for a in range(3)] for c in range(8)])


def _box_moments(m: np.ndarray, box: tuple[int, ...]) -> np.ndarray:
    """(count, sum R, sum G, sum B, sum of squares) of the cells lo < i <= hi of a box."""
    bounds = np.asarray(box).reshape(3, 2)
    corners = bounds[np.arange(3), _CORNER_BITS]            # (8, 3) lo/hi per axis
    return _CORNER_SIGNS @ m[corners[:, 0], corners[:, 1], corners[:, 2]]


def _box_variance(m: np.ndarray, box: tuple[int, ...]) -> float:
    """Sum of squared deviations of the box's pixels from their mean colour."""
    w, r, g, b, sq = _box_moments(m, box)
    return float(sq - (r * r + g * g + b * b) / w) if w > 0 else 0.0


def _best_cut(m: np.ndarray, box: tuple[int, ...]) -> tuple[int, int] | None:
    """Wu's cut (axis, plane): the one maximising the summed squared means of the two
    halves, i.e. minimising their total variance; None if no cut leaves both halves
    non-empty."""
    best_gain, best = -np.inf, None
    whole = _box_moments(m, box)
    for axis in range(3):
        slab = _slab_moments(m, box, axis)
        lower = slab[1:-1] - slab[0]
        upper = whole - lower
        valid = (lower[:, 0] > 0) & (upper[:, 0] > 0)
        if not valid.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = ((lower[:, 1:4] ** 2).sum(1) / lower[:, 0]
                    + (upper[:, 1:4] ** 2).sum(1) / upper[:, 0])
        k = int(np.argmax(np.where(valid, gain, -np.inf)))
        if gain[k] > best_gain:
            best_gain, best = float(gain[k]), (axis, box[2 * axis] + 1 + k)
    return best


def min_variance_palette(rgb8: np.ndarray, n: int) -> np.ndarray:
    """Minimum-variance colour map of at most ``n`` colours (exactly ``n`` unless the
    image has fewer occupied 5-bit cells), as float RGB in [0, 255].

    Greedy as Wu: always split the box of largest variance at its best cut; each
    colour is the mean of the pixels in its box.
    """
    m = _wu_moments(rgb8)
    top = 1 << _WU_BITS
    boxes = [(0, top, 0, top, 0, top)]
    variances = [_box_variance(m, boxes[0])]
    while len(boxes) < n:
        i = int(np.argmax(variances))
        if variances[i] <= 0:
            break  # every box is one colour or one cell
        cut = _best_cut(m, boxes[i])
        if cut is None:
            variances[i] = 0.0  # a single cell: final
            continue
        axis, pos = cut
        lower, upper = list(boxes[i]), list(boxes[i])
        lower[2 * axis + 1] = pos
        upper[2 * axis] = pos
        boxes[i] = tuple(lower)
        boxes.append(tuple(upper))
        variances[i] = _box_variance(m, boxes[i])
        variances.append(_box_variance(m, boxes[-1]))
    means = np.stack([_box_moments(m, box) for box in boxes])
    return means[:, 1:4] / means[:, :1]


def dither_to_palette(rgb8: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Floyd-Steinberg error diffusion onto ``palette`` (k*3, 0..255); returns indices.

    Pillow does the sequential diffusion in C (raster order, 8-bit error, a
    6-bit inverse colour map), as MATLAB's ``dither`` does with its 5-bit one.
    """
    pal_img = Image.new("P", (1, 1))
    pal_img.putpalette(np.floor(palette + 0.5).astype(np.uint8).ravel().tolist())
    out = Image.fromarray(rgb8, "RGB").quantize(palette=pal_img,
                                                dither=Image.Dither.FLOYDSTEINBERG)
    return np.asarray(out)


def color_quantization(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """MATLAB ``ind2rgb(rgb2ind(I, n))``: n-colour min-variance map, dithered."""
    rgb8 = im2uint8(img)
    palette = min_variance_palette(rgb8, int(n))
    index = dither_to_palette(rgb8, palette)
    return (palette / 255.0)[index]


# --------------------------------------------------------------- type 22

_OTSU_BINS = 256  # multithresh's histogram size


def otsu_thresholds(counts: np.ndarray, n: int) -> np.ndarray:
    """Exact multi-level Otsu thresholds of a histogram, as bin positions.

    Maximises the between-class variance sum_c w_c * mu_c^2 over all ways of
    cutting the occupied bins into n+1 non-empty runs, by dynamic programming
    (O(n*m^2), m occupied bins).  A threshold at bin position t puts bins <= t in
    the lower class.  A cut that falls between two occupied bins separated by
    empty ones may sit anywhere in the gap without changing the objective; it is
    put in the middle, as MATLAB's ``graythresh``/``multithresh`` average tied
    positions.  With fewer than n+1 occupied bins there are fewer thresholds
    (every occupied bin its own class).
    """
    counts = np.asarray(counts, dtype=np.float64)
    occ = np.flatnonzero(counts > 0)
    m = occ.size
    k = min(int(n), m - 1)
    if k <= 0:
        return np.empty(0)
    cw = np.concatenate([[0.0], np.cumsum(counts[occ])])
    cs = np.concatenate([[0.0], np.cumsum(counts[occ] * occ)])
    a = np.arange(m + 1)
    valid = a[:, None] < a[None, :]          # run = items a..b-1, non-empty
    with np.errstate(divide="ignore", invalid="ignore"):
        run = (cs[None, :] - cs[:, None]) ** 2 / (cw[None, :] - cw[:, None])
    run = np.where(valid, run, -np.inf)
    best = run[0].copy()                      # one class covering items 0..b-1
    back = []
    for _ in range(k):
        total = best[:, None] + run
        back.append(np.argmax(total, axis=0))
        best = total.max(axis=0)
    cuts = []
    end = m
    for arg in reversed(back):
        end = int(arg[end])
        cuts.append(end)
    cuts = np.asarray(cuts[::-1])             # item index where each upper class starts
    return (occ[cuts - 1] + occ[cuts] - 1) / 2.0


def multithresh(x: np.ndarray, n: int) -> np.ndarray:
    """MATLAB ``multithresh(x, n)`` for a float array: 256-bin histogram over
    [min, max] (values rounded to the nearest bin, as ``imhist``), exact Otsu
    thresholds mapped back to the data range."""
    lo = float(np.min(x))
    hi = float(np.max(x))
    if hi <= lo:
        return np.empty(0)
    scaled = (x.astype(np.float64).ravel() - lo) * ((_OTSU_BINS - 1) / (hi - lo))
    counts = np.bincount(np.floor(scaled + 0.5).astype(np.int64), minlength=_OTSU_BINS)
    return lo + otsu_thresholds(counts, n) / (_OTSU_BINS - 1) * (hi - lo)


# Data values are at least 1/255^2 apart from any threshold unless equal to it,
# so this only settles float32 rounding of exact ties the MATLAB way (v <= t).
_TIE_TOLERANCE = 1e-6


def imquantize_upper(x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``imquantize(x, t, [0 t(2:end) 1])``: the lowest class -> 0, class k -> t(k)
    (its upper threshold), above the last threshold -> 1."""
    values = np.concatenate([[0.0], thresholds[1:], [1.0]])
    cls = np.searchsorted(thresholds + _TIE_TOLERANCE, x, side="left")
    return values[cls]


def quantization(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Type 22: Otsu thresholds of all samples of all channels, each sample mapped to
    its class's upper threshold.  A single-valued image has no classes: unchanged."""
    thresholds = multithresh(img, int(n))
    if thresholds.size == 0:
        return img.astype(np.float64)
    return imquantize_upper(img.astype(np.float64), thresholds)
