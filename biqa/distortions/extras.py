"""VIPNet's additional distortions, types 26-29: pink noise, chromatic aberration,
over- and under-exposure.

They take and return uint8 (no KADID min-max stretch), as the original
``additional_distortion_generator.m`` / ``ChromaticAberrations.m`` do.  Type 27
is a port of the original's PSNR-targeted search, quirks included, because the
dataset's levels are defined by what that search picks.  See docs/vipnet_extras.md.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from ._matlab import gaussian_kernel_1d, hsv2rgb, im2uint8, psnr_from_sse, rgb2hsv
from .spec import DistortionNotApplicable

# ------------------------------------------------------------------ 26 pink noise

PINK_FIELD_SIZE = 512  # the original always makes the noise at 512x512, then resizes


def _pink_amplitude(n: int) -> np.ndarray:
    """Spectral amplitude of ``randnd(-1, n)`` on the rfft2 half-plane: 1/|k|, DC 0.

    randnd raises the squared wavenumber kx^2 + ky^2 to beta/2 (the version
    whose statistics the reference outputs show; another published version uses
    beta/4, i.e. 1/sqrt|k|, and is 1-4 dB off them).
    """
    k = np.fft.fftfreq(n, d=1.0 / n)  # integer wavenumbers 0..n/2-1, -n/2..-1
    kr = np.abs(np.fft.rfftfreq(n, d=1.0 / n))
    k2 = k[:, None] ** 2 + kr[None, :] ** 2
    amp = np.zeros_like(k2)
    np.power(k2, -0.5, out=amp, where=k2 > 0)
    return amp


def pink_field(rng: np.random.Generator, channels: int = 3,
               size: int = PINK_FIELD_SIZE) -> np.ndarray:
    """``randnd(-1, size) / max|.|`` per channel: channels x size x size in [-1, 1].

    randnd re-standardises the shaped noise and restores the white noise's mean
    and sd as ``(z + mean) * sd``; the sd cancels in the division by the max, the
    mean does not, so it is kept.
    """
    white = rng.standard_normal((channels, size, size))
    shaped = np.fft.irfft2(np.fft.rfft2(white) * _pink_amplitude(size), s=(size, size))
    flat_w = white.reshape(channels, -1)
    flat_s = shaped.reshape(channels, -1)
    z = (flat_s - flat_s.mean(axis=1, keepdims=True)) / flat_s.std(axis=1, ddof=1,
                                                                    keepdims=True)
    z += flat_w.mean(axis=1, keepdims=True)
    z /= np.abs(z).max(axis=1, keepdims=True)
    return z.reshape(channels, size, size)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel, a = -0.5 (MATLAB imresize 'bicubic')."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


@functools.lru_cache(maxsize=32)
def imresize_bicubic_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices (out_len x taps) of MATLAB
    ``imresize(..., 'bicubic')`` along one axis.

    MATLAB's geometry: output sample x maps to u = x/s + (1 - 1/s)/2 (1-based);
    when shrinking, the kernel is stretched by 1/s and scaled by s (antialiasing);
    each row of taps is normalised to sum 1; taps beyond the ends are mirrored
    including the edge sample; tap positions unused by every output are dropped.
    """
    scale = out_len / in_len
    width = 4.0
    if scale < 1:
        kernel = lambda t: scale * _keys_cubic(scale * t)  # noqa: E731
        width /= scale
    else:
        kernel = _keys_cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    idx = left[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    used = np.any(weights != 0, axis=0)
    weights, src = weights[:, used], src[:, used]
    weights.setflags(write=False)
    src.setflags(write=False)
    return weights, src


def _resize_axis(planes: np.ndarray, axis: int, out_len: int) -> np.ndarray:
    """Resize along one axis, summing the taps in order as MATLAB does."""
    weights, src = imresize_bicubic_taps(planes.shape[axis], out_len)
    shape = [1] * planes.ndim
    shape[axis] = out_len
    out = weights[:, 0].reshape(shape) * np.take(planes, src[:, 0], axis=axis)
    for p in range(1, weights.shape[1]):
        out += weights[:, p].reshape(shape) * np.take(planes, src[:, p], axis=axis)
    return out


def imresize_bicubic(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize C x h x w planes to C x height x width as MATLAB ``imresize`` bicubic.

    MATLAB resizes the axis with the smaller scale first; the order is kept
    because it decides the last bits.
    """
    _, h, w = planes.shape
    if height / h <= width / w:
        return _resize_axis(_resize_axis(planes, 1, height), 2, width)
    return _resize_axis(_resize_axis(planes, 2, width), 1, height)


def sample_pink(img: np.ndarray, weight: float, rng: np.random.Generator) -> dict:
    """Type 26's noise: one 512x512 1/f field per channel (``pink_field``)."""
    return {"field": pink_field(rng, img.shape[2])}


def pink_noise(img: np.ndarray, weight: float, field: np.ndarray) -> np.ndarray:
    """Type 26: add ``weight * 255`` times the field resized to the image, floor,
    saturate."""
    h, w = img.shape[:2]
    field = imresize_bicubic(np.asarray(field), h, w).transpose(1, 2, 0)
    noisy = np.floor(img + weight * (field * 255.0))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# -------------------------------------------------------- 27 chromatic aberration

CA_BLUR_SIZES = (1, 2, 3, 4, 5, 7, 9, 15, 20, 25, 30)  # l = 1..11
CA_SHIFTS = tuple(range(1, 26))                          # i = 1..25
CA_TARGETS = (33, 30, 27, 24, 21)                        # target PSNR per level
_CA_GAP = 2.0                                            # initial |PSNR - target| gap
# Per level: admissible blur index l (lo, hi) and shift index i (lo, hi), 1-based.
_CA_WINDOWS = (((1, 2), (1, 4)), ((2, 5), (1, 20)), ((3, 6), (1, 20)),
               ((3, 8), (5, 20)), ((5, 11), (7, 25)))


class CAPick(NamedTuple):
    """One level's chosen candidate: shift index i (red moves i-1 px, green
    round(i/2)-1 px), Gaussian kernel side, and the candidate's PSNR to the input."""

    shift: int
    hsize: int
    psnr: float


def green_shift(i: int) -> int:
    """Pixels the green channel moves for shift index i: round(i/2) - 1.

    The original indexes with the non-integer i/2; Octave (which produced the
    reference) rounds such subscripts, giving round(i/2), half away from zero.
    """
    return (i + 1) // 2 - 1


def _gaussian_taps(hsize: int) -> np.ndarray:
    """1-D factor of ``fspecial('gaussian', hsize, hsize/6)`` (no tap falls below
    its eps cut for these sizes, so the 2-D kernel is exactly separable)."""
    return gaussian_kernel_1d(hsize / 6.0, hsize)


def _anchor(n: int) -> int:
    """0-based kernel centre of MATLAB imfilter: floor((n+1)/2) 1-based, so even
    kernels sit half a pixel up-left."""
    return (n + 1) // 2 - 1


def _mirror(q: np.ndarray, n: int) -> np.ndarray:
    """Index into 0..n-1 mirrored including the edge sample ('symmetric')."""
    q = np.where(q < 0, -q - 1, q)
    return np.where(q >= n, 2 * n - 1 - q, q)


def _blur_rows(channel: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Vertical pass of the blur, symmetric borders; taps summed in a fixed order."""
    n, a, h = len(g), _anchor(len(g)), channel.shape[0]
    padded = np.pad(channel, ((a, n - 1 - a), (0, 0)), mode="symmetric")
    out = g[0] * padded[0:h]
    for t in range(1, n):
        out += g[t] * padded[t:t + h]
    return out


def _blur_columns(padded: np.ndarray, g: np.ndarray, width: int) -> np.ndarray:
    """Horizontal pass over columns already padded for the kernel: ``width``
    outputs, taps summed in a fixed order so every pixel's value depends on its
    neighbourhood only (strips and full passes agree bit for bit)."""
    out = g[0] * padded[:, 0:width]
    for t in range(1, len(g)):
        out += g[t] * padded[:, t:t + width]
    return out


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """uint8 cast of MATLAB's imfilter on non-negative values, kept as float."""
    fl = np.floor(x)
    return fl + (x - fl >= 0.5)


class _ChannelBlur:
    """The blur of one channel at one kernel size, for any column shift.

    Shifting a channel right by s (the left s columns keep their values) commutes
    with the vertical pass, and the horizontal pass of the shifted channel equals
    the shifted horizontal pass except within a kernel's reach of the seam and of
    the right edge.  So the full pass runs once and only those strips are redone.
    """

    def __init__(self, channel: np.ndarray, g: np.ndarray):
        self.g = g
        self.n, self.a = len(g), _anchor(len(g))
        self.width = channel.shape[1]
        self.rows = _blur_rows(channel, g)
        self.channel = channel
        self.full = self._strip(0, self.width, 0)
        self._full_sq = np.einsum("ij,ij->j", self.full, self.full)
        self._chan_sq = np.einsum("ij,ij->j", channel, channel)

    def _strip(self, start: int, stop: int, shift: int) -> np.ndarray:
        """Rounded blur at output columns start..stop-1 of the channel shifted
        right by ``shift`` (the left ``shift`` columns keep their values)."""
        q = _mirror(np.arange(start - self.a, stop + self.n - 1 - self.a), self.width)
        src = np.where(q >= shift, q - shift, q)
        return _round_half_away(_blur_columns(self.rows[:, src], self.g, stop - start))

    def pieces(self, shift: int) -> list[tuple[slice, slice | None]]:
        """How the shifted channel's blur is made: (output columns, columns of
        the unshifted blur to reuse, or None where a strip must be computed)."""
        # Columns before `cut` read only unmoved columns, those from `lo` on only
        # moved ones, those from `hi` on pass the right edge.
        cut = max(shift - (self.n - 1 - self.a), 0) if shift >= self.a else 0
        lo = shift + self.a
        hi = self.width - self.n + self.a + 1
        if lo >= hi:
            return [(slice(0, self.width), None)]
        return [(slice(0, cut), slice(0, cut)),
                (slice(cut, lo), None),
                (slice(lo, hi), slice(self.a, hi - shift)),
                (slice(hi, self.width), None)]

    def shifted(self, shift: int) -> np.ndarray:
        """Rounded blur of the channel shifted right by ``shift`` columns."""
        return np.concatenate(
            [self.full[:, reuse] if reuse else self._strip(cols.start, cols.stop, shift)
             for cols, reuse in self.pieces(shift)], axis=1)

    def shifted_sse(self, shift: int) -> float:
        """Squared error of ``shifted(shift)`` against the input channel.

        Reused parts, most of the image, are expanded as sum a^2 + sum b^2 - 2 sum ab
        with per-column sums of squares shared by all shifts; every term is an
        integer below 2^53, so the result is exact.
        """
        total = 0.0
        for cols, reuse in self.pieces(shift):
            target = self.channel[:, cols]
            if reuse:
                cross = np.einsum("ij,ij->", self.full[:, reuse], target)
                total += self._full_sq[reuse].sum() + self._chan_sq[cols].sum() - 2.0 * cross
            else:
                d = self._strip(cols.start, cols.stop, shift) - target
                total += np.einsum("ij,ij->", d, d)
        return float(total)


def ca_candidate_psnrs(img: np.ndarray) -> np.ndarray:
    """PSNR to the input of all 25 x 11 candidates (shift index i, blur index l).

    A candidate's squared error is the sum of its channels' errors; red takes
    shift i-1, green round(i/2)-1, blue none, so each (channel, shift, size) is
    blurred once and shared.
    """
    chans = [img[:, :, c].astype(np.float64) for c in range(3)]
    count = img.size
    out = np.empty((len(CA_SHIFTS), len(CA_BLUR_SIZES)))
    for li, hsize in enumerate(CA_BLUR_SIZES):
        g = _gaussian_taps(hsize)
        red, green, blue = (_ChannelBlur(c, g) for c in chans)
        sse_red = [red.shifted_sse(i - 1) for i in CA_SHIFTS]
        sse_green = {s: green.shifted_sse(s)
                     for s in sorted({green_shift(i) for i in CA_SHIFTS})}
        sse_blue = blue.shifted_sse(0)
        for ii, i in enumerate(CA_SHIFTS):
            out[ii, li] = psnr_from_sse(sse_red[ii] + sse_green[green_shift(i)] + sse_blue,
                                         count)
    return out


def select_ca_levels(psnrs: np.ndarray) -> list[CAPick | None]:
    """The original's selection over the candidate PSNRs, in its loop order.

    Each candidate goes to the first level whose test it passes; it is kept if
    it lies in that level's (l, i) window and narrows that level's gap.  Level 1
    is the exception the original has: its test is PSNR > 33 or within the gap,
    and the candidate is taken *unguarded* - the last one passing wins - while
    only guarded hits set the gap and the found flag.  The identity (i=1,
    hsize=1, PSNR inf) makes that gap inf until the next guarded hit.
    """
    gaps = [_CA_GAP] * len(CA_TARGETS)
    found = [False] * len(CA_TARGETS)
    picks: list[CAPick | None] = [None] * len(CA_TARGETS)
    for ii, i in enumerate(CA_SHIFTS):
        for li, hsize in enumerate(CA_BLUR_SIZES):
            p = float(psnrs[ii, li])
            l_index = li + 1
            for level, target in enumerate(CA_TARGETS):
                first = level == 0
                if not ((first and p > target) or abs(p - target) < gaps[level]):
                    continue
                (l_lo, l_hi), (i_lo, i_hi) = _CA_WINDOWS[level]
                in_window = l_lo <= l_index <= l_hi and i_lo <= i <= i_hi
                if first or in_window:
                    picks[level] = CAPick(i, hsize, p)
                if in_window:
                    gaps[level] = abs(p - target)
                    found[level] = True
                break
    return [pick if ok else None for pick, ok in zip(picks, found)]


_CA_CACHE: OrderedDict[tuple, list] = OrderedDict()
_CA_CACHE_SIZE = 16


def clear_ca_cache() -> None:
    """Forget cached chromatic-aberration searches (for honest benchmarks)."""
    _CA_CACHE.clear()
_CA_LOCK = threading.Lock()


def chromatic_aberration_choice(img: np.ndarray) -> list[CAPick | None]:
    """Per level 1..5, the candidate the original's search picks, or None where it
    finds none (the original then drops the image from type 27 altogether).

    Cached per image (hash of its bytes) so the five levels of one reference
    cost one search.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"chromatic aberration needs a uint8 H*W*3 image, got "
                         f"{img.dtype} of shape {img.shape}")
    if min(img.shape[:2]) < max(CA_BLUR_SIZES):
        raise ValueError(f"chromatic aberration needs at least {max(CA_BLUR_SIZES)} px "
                         f"per side (its largest blur kernel), got {img.shape[1]}x{img.shape[0]}")
    img = np.ascontiguousarray(img)
    key = (img.shape, hashlib.blake2b(img.tobytes(), digest_size=16).digest())
    with _CA_LOCK:
        if key in _CA_CACHE:
            _CA_CACHE.move_to_end(key)
            return list(_CA_CACHE[key])
    picks = select_ca_levels(ca_candidate_psnrs(img))
    with _CA_LOCK:
        _CA_CACHE[key] = picks
        while len(_CA_CACHE) > _CA_CACHE_SIZE:
            _CA_CACHE.popitem(last=False)
    return list(picks)


def ca_candidate(img: np.ndarray, shift: int, hsize: int) -> np.ndarray:
    """One candidate of the search: red moved i-1 px, green round(i/2)-1 px
    (left columns keep their values), then the Gaussian blur of side hsize,
    sigma hsize/6, symmetric borders, rounded to uint8 as MATLAB's imfilter."""
    g = _gaussian_taps(hsize)
    moves = (shift - 1, green_shift(shift), 0)
    planes = [_ChannelBlur(img[:, :, c].astype(np.float64), g).shifted(s)
              for c, s in enumerate(moves)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def sample_ca(img: np.ndarray, target_psnr: float, rng=None) -> dict:
    """Type 27's choice for this level's target PSNR: the candidate (shift index,
    kernel side) the original's search picks -- deterministic (``rng`` unused).

    Raises DistortionNotApplicable where the search finds no candidate for the level.
    """
    if target_psnr not in CA_TARGETS:
        raise ValueError(f"chromatic aberration target PSNR must be one of {CA_TARGETS}, "
                         f"got {target_psnr!r}")
    level = CA_TARGETS.index(target_psnr)
    pick = chromatic_aberration_choice(img)[level]
    if pick is None:
        raise DistortionNotApplicable(
            f"chromatic aberration level {level + 1}: the original search finds no "
            f"candidate near {target_psnr} dB for this image (the original generator "
            "drops such images)")
    return {"shift": pick.shift, "hsize": pick.hsize}


def chromatic_aberration(img: np.ndarray, target_psnr: float, shift: int,
                         hsize: int) -> np.ndarray:
    """Type 27: the candidate (``sample_ca``) for this level."""
    return ca_candidate(img, int(shift), int(hsize))


# --------------------------------------------------------- 28/29 exposure curves

def _overexposed_v(v: np.ndarray, strength: float) -> np.ndarray:
    """simulate_ou type 1: V + 0.006 V^3 L^2 + 0.0315 V^2.42 L (may exceed 1)."""
    return (0.006 * v ** 3.0) * strength ** 2 + (0.0315 * v ** 2.42) * strength + v


def _underexposed_v(v: np.ndarray, strength: float) -> np.ndarray:
    """simulate_ou type 2: V + (0.0018 ln V + 0.00005) L^2 - 0.000021 V^-3 L.

    At V = 0 the original gets -inf, i.e. black; black is returned directly so
    no NaN or warning arises.
    """
    dark = v <= 0
    safe = np.where(dark, 1.0, v)
    log_term = -0.0018 * np.log(safe) - 0.00005
    cube_term = 0.000021 * safe ** -3.0
    out = -log_term * strength ** 2 - cube_term * strength + safe
    return np.where(dark, 0.0, out)


def _apply_v_curve(img: np.ndarray, curve, strength: float) -> np.ndarray:
    """RGB -> HSV, V through the curve, back to RGB, im2uint8 (saturating)."""
    hsv = rgb2hsv(img.astype(np.float64) / 255.0)
    hsv[..., 2] = curve(hsv[..., 2], strength)
    return im2uint8(hsv2rgb(hsv))


def overexposure(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Type 28 (deterministic; ``rng`` unused)."""
    return _apply_v_curve(img, _overexposed_v, strength)


def underexposure(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Type 29 (deterministic; ``rng`` unused)."""
    return _apply_v_curve(img, _underexposed_v, strength)
