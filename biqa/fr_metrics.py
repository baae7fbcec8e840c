"""Full-reference quality scores of a distorted image against its reference.

Cheap weak labels ("pseudo-MOS") for every generated sample, as DeepFL-IQA used
full-reference metrics as proxies for subjective scores on KADIS-700k.  Every
metric takes two uint8 H*W*3 RGB images of one size, ``fn(ref, dist)``, and
returns a float, or ``None`` where the metric is undefined for the pair (PSNR of
identical images, an image too small for the metric's windows), so a sample's
JSON stays valid.

Conventions (docs/fr_metrics.md has the details, costs and validation):

* ``psnr`` is MATLAB's ``psnr`` over all three RGB channels (the generator's
  per-sample "psnr").
* The others work on luma as the reference MATLAB code is fed:
  ``double(rgb2gray(rgb))`` -- BT.601 weights, rounded to 8 bits -- with data range
  255 and each paper's own windows.

>>> from biqa.fr_metrics import parse_fr_metrics, compute_fr_metrics
>>> out = distort(astronaut, "jpeg", 3, rng=1)
>>> compute_fr_metrics(astronaut, out, parse_fr_metrics("psnr,ssim,ms_ssim"))
{'psnr': 29.72..., 'ssim': 0.9206..., 'ms_ssim': 0.9876...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable

import cv2
import numpy as np

from biqa.distortions._matlab import gaussian_kernel_1d
from biqa.distortions._matlab import psnr as _matlab_psnr

# MATLAB rgb2gray's weights (BT.601 luma, from the inverse of its NTSC matrix).
_GRAY = np.array([[0.298936021293775, 0.587043074451121, 0.114020904255103]])

# SSIM (Wang et al. 2004): 11x11 Gaussian, sigma 1.5, K = (0.01, 0.03), L = 255.
_SSIM_WINDOW = gaussian_kernel_1d(1.5, 11).astype(np.float32)
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2
# Second moments are taken about this grey level: float32 E[x^2] - E[x]^2 of values
# near 0 instead of near 255 loses 4x less to cancellation (variance is shift-free).
_CENTRE = 128.0

# MS-SSIM (Wang, Simoncelli & Bovik 2003): five scales, the paper's weights.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_MS_SSIM_MIN_SIDE = 11 * 2 ** (len(_MS_SSIM_WEIGHTS) - 1)  # 176, as msssim.m checks

# GMSD (Xue et al. 2014): Prewitt filters /3 after 2x2 averaging, T = 170 for 0..255.
_GMSD_T = 170.0
_PREWITT_DIFF = np.array([1.0, 0.0, -1.0])
_PREWITT_MEAN = np.full(3, 1.0 / 3.0)

# VIFp (Sheikh & Bovik, vifp_mscale.m): four scales, windows 17, 9, 5, 3 (sigma N/5).
_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
_VIF_WINDOWS = tuple((n, gaussian_kernel_1d(n / 5.0, n)) for n in (17, 9, 5, 3))


def _checked(ref, dist) -> tuple[np.ndarray, np.ndarray]:
    for what, img in (("reference", ref), ("distorted image", dist)):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 \
                or img.shape[2] != 3 or img.size == 0:
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", type(img).__name__)
            raise ValueError(f"{what} must be a non-empty uint8 H*W*3 RGB array, "
                             f"got {dtype} {shape}")
    if ref.shape != dist.shape:
        raise ValueError(f"reference and distorted image differ in size: "
                         f"{ref.shape} vs {dist.shape}")
    return ref, dist


def _luma(rgb: np.ndarray) -> np.ndarray:
    """``double(rgb2gray(rgb))`` of uint8 RGB: MATLAB rounds half away from zero
    (no ties occur with these weights); float32 holds the integers exactly."""
    y = cv2.transform(rgb.astype(np.float64), _GRAY)
    return np.floor(y + 0.5).astype(np.float32)


def _filter_valid(img: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """MATLAB ``filter2(k*k', img, 'valid')``: filter, then drop the border rows and
    columns that the window overhangs (so the border mode never matters)."""
    r = (len(kernel_1d) - 1) // 2
    k = kernel_1d.astype(img.dtype)
    out = cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT)
    return out[r:img.shape[0] - r, r:img.shape[1] - r]


def _local_moments(x: np.ndarray, y: np.ndarray, kernel_1d: np.ndarray):
    """Windowed means and (co)variances over the valid region: (mu_x, mu_y, var_x,
    var_y, cov_xy), variances as E[v^2] - E[v]^2 like the reference code."""
    xc, yc = x - _CENTRE, y - _CENTRE  # a Python float keeps the arrays' dtype
    mx, my = _filter_valid(xc, kernel_1d), _filter_valid(yc, kernel_1d)
    vx = _filter_valid(xc * xc, kernel_1d) - mx * mx
    vy = _filter_valid(yc * yc, kernel_1d) - my * my
    cxy = _filter_valid(xc * yc, kernel_1d) - mx * my
    return mx + _CENTRE, my + _CENTRE, vx, vy, cxy


def _ssim_means(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(mean SSIM, mean contrast-structure term) over the valid region; None when
    the image is smaller than the 11x11 window."""
    if min(x.shape) < len(_SSIM_WINDOW):
        return None
    mx, my, vx, vy, cxy = _local_moments(x, y, _SSIM_WINDOW)
    cs = (2.0 * cxy + _C2) / (vx + vy + _C2)
    lum = (2.0 * mx * my + _C1) / (mx * mx + my * my + _C1)
    return float(np.mean(lum * cs, dtype=np.float64)), float(np.mean(cs, dtype=np.float64))


def _halve(img: np.ndarray, pad_mode: str) -> np.ndarray:
    """2x2 block means, the MATLAB idiom ``filtered(1:2:end, 1:2:end)``.  An odd last
    row/column is averaged with its mirror (``"edge"``: imfilter 'symmetric', as in
    msssim.m) or with zeros (``"constant"``: conv2 'same', as in GMSD.m)."""
    h, w = img.shape
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2)), mode=pad_mode)
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


def _gradient_magnitude(img: np.ndarray) -> np.ndarray:
    """GMSD.m's ``conv2(Y, dx, 'same')`` and ``dy = dx'``: Prewitt /3, zero padding."""
    gx = cv2.sepFilter2D(img, -1, _PREWITT_DIFF, _PREWITT_MEAN, borderType=cv2.BORDER_CONSTANT)
    gy = cv2.sepFilter2D(img, -1, _PREWITT_MEAN, _PREWITT_DIFF, borderType=cv2.BORDER_CONSTANT)
    return np.sqrt(gx * gx + gy * gy)


class _Pair:
    """One (reference, distorted) pair; the luma and the full-scale SSIM terms are
    computed once and shared by the metrics that need them."""

    def __init__(self, ref, dist):
        self.ref, self.dist = _checked(ref, dist)

    @cached_property
    def luma(self) -> tuple[np.ndarray, np.ndarray]:
        return _luma(self.ref), _luma(self.dist)

    @cached_property
    def ssim_scale1(self) -> tuple[float, float] | None:
        return _ssim_means(*self.luma)


# ----------------------------------------------------------------------- metrics

def _psnr(p: _Pair) -> float:
    return _matlab_psnr(p.ref, p.dist)


def _ssim(p: _Pair) -> float | None:
    means = p.ssim_scale1
    return None if means is None else means[0]


def _ms_ssim(p: _Pair) -> float | None:
    x, y = p.luma
    if min(x.shape) < _MS_SSIM_MIN_SIDE:
        return None
    last = len(_MS_SSIM_WEIGHTS) - 1
    score = 1.0
    for scale, weight in enumerate(_MS_SSIM_WEIGHTS):
        if scale:
            x, y = _halve(x, "edge"), _halve(y, "edge")
        ssim_mean, cs_mean = p.ssim_scale1 if scale == 0 else _ssim_means(x, y)
        term = ssim_mean if scale == last else cs_mean
        # An anti-correlated scale has a negative term, whose fractional power is
        # complex in MATLAB; it counts as no similarity (pytorch_msssim does the same).
        score *= max(term, 0.0) ** weight
    return score


def _gmsd(p: _Pair) -> float | None:
    x, y = (_halve(v.astype(np.float64), "constant") for v in p.luma)
    if x.size < 2:
        return None  # no deviation of a single value
    g1, g2 = _gradient_magnitude(x), _gradient_magnitude(y)
    gms = (2.0 * g1 * g2 + _GMSD_T) / (g1 * g1 + g2 * g2 + _GMSD_T)
    return float(np.std(gms, ddof=1))  # std2


def _vif(p: _Pair) -> float | None:
    # float64: the residual variance s2 - s12^2/s1 cancels badly in float32 (errors
    # of 5e-5 in VIF on strong blur, against 1e-6 for SSIM's terms).
    x, y = (v.astype(np.float64) for v in p.luma)
    num = den = 0.0
    for scale, (n, kernel) in enumerate(_VIF_WINDOWS):
        if scale and min(x.shape) >= n:
            x, y = _filter_valid(x, kernel)[::2, ::2], _filter_valid(y, kernel)[::2, ::2]
        if min(x.shape) < n:
            return None  # the window overhangs the image at this scale
        _, _, s1, s2, s12 = _local_moments(x, y, kernel)
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        g = s12 / (s1 + _VIF_EPS)
        sv = s2 - g * s12
        flat_ref = s1 < _VIF_EPS
        g[flat_ref] = 0.0
        sv[flat_ref] = s2[flat_ref]
        s1[flat_ref] = 0.0
        flat_dist = s2 < _VIF_EPS
        g[flat_dist] = 0.0
        sv[flat_dist] = 0.0
        negative = g < 0
        sv[negative] = s2[negative]
        g[negative] = 0.0
        sv = np.maximum(sv, _VIF_EPS)
        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + _VIF_SIGMA_NSQ))))
        den += float(np.sum(np.log10(1.0 + s1 / _VIF_SIGMA_NSQ)))
    return None if den == 0.0 else num / den


# ---------------------------------------------------------------------- registry

@dataclass(frozen=True)
class FRMetric:
    """A full-reference metric: ``metric(ref, dist) -> float | None``."""

    name: str
    higher_is_better: bool
    summary: str
    _of_pair: Callable[[_Pair], float | None] = field(repr=False)

    def __call__(self, ref: np.ndarray, dist: np.ndarray) -> float | None:
        return _finite_or_none(self._of_pair(_Pair(ref, dist)))


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


FR_METRICS: dict[str, FRMetric] = {m.name: m for m in (
    FRMetric("psnr", True, "PSNR in dB over the RGB channels (MATLAB psnr); "
             "None for identical images", _psnr),
    FRMetric("ssim", True, "SSIM (Wang et al. 2004) on luma, Gaussian 11x11 sigma 1.5, "
             "mean over the valid region; 1 = identical", _ssim),
    FRMetric("ms_ssim", True, "MS-SSIM (Wang et al. 2003) on luma, 5 scales, standard "
             "weights; None below 176 px", _ms_ssim),
    FRMetric("gmsd", False, "GMSD (Xue et al. 2014) on luma, as GMSD.m; 0 = identical, "
             "larger = worse", _gmsd),
    FRMetric("vif", True, "pixel-domain VIF (Sheikh & Bovik, vifp_mscale.m) on luma; "
             "1 = identical, > 1 for contrast enhancement", _vif),
)}

psnr, ssim, ms_ssim, gmsd, vif = (FR_METRICS[n] for n in
                                  ("psnr", "ssim", "ms_ssim", "gmsd", "vif"))


def parse_fr_metrics(spec: str) -> tuple[str, ...]:
    """``"psnr,ssim,ms_ssim"`` (or ``"all"``) -> metric names, in the given order,
    without repeats; a ``ValueError`` naming the valid names for anything else."""
    valid = ", ".join(FR_METRICS)
    names: list[str] = []
    for token in str(spec).split(","):
        name = token.strip().lower().replace("-", "_")
        if not name:
            continue
        wanted = tuple(FR_METRICS) if name == "all" else (name,)
        for n in wanted:
            if n not in FR_METRICS:
                raise ValueError(f"unknown full-reference metric {token.strip()!r}; "
                                 f"valid: {valid}, or all")
            if n not in names:
                names.append(n)
    if not names:
        raise ValueError(f"no full-reference metric named in {spec!r}; valid: {valid}, or all")
    return tuple(names)


def compute_fr_metrics(ref: np.ndarray, dist: np.ndarray,
                       names: str | Iterable[str]) -> dict[str, float | None]:
    """``{name: score}`` for the named metrics of one pair (``names`` as from
    ``parse_fr_metrics``, or a string for it), sharing the luma and the full-scale
    SSIM terms between them.  A score is ``None`` where the metric is
    undefined (never inf or NaN), so the dict is valid JSON as it stands."""
    names = parse_fr_metrics(names) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in FR_METRICS]
    if unknown:
        raise ValueError(f"unknown full-reference metric(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(FR_METRICS)}")
    pair = _Pair(ref, dist)
    return {n: _finite_or_none(FR_METRICS[n]._of_pair(pair)) for n in names}
