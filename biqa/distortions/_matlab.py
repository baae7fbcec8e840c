"""MATLAB semantics shared by many distortion types.

The KADID-10k generators lean on MATLAB built-ins whose exact behaviour (kernel
shapes, border modes, colour-space constants, rounding) decides whether a port
matches the dataset.  Each helper here reproduces one such built-in, vectorised,
so the distortion modules can stay short.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.interpolate import CubicSpline

EPS = np.finfo(np.float64).eps  # MATLAB's eps


# --------------------------------------------------------------------------- 8-bit

def im2uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB ``im2uint8`` of a double image: saturate, round half away from zero."""
    y = np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5)
    y[np.isnan(y)] = 0
    return y.astype(np.uint8)


def mapmm(x: np.ndarray) -> np.ndarray:
    """Global min-max stretch to [0, 1] over all channels (the KADID ``mapmm``).

    A constant image has no range to stretch; it is returned unchanged (MATLAB
    would produce NaN, i.e. black).
    """
    lo = float(np.min(x))
    hi = float(np.max(x))
    if hi <= lo:
        return x.copy()
    return (x - lo) * (1.0 / (hi - lo))


# ------------------------------------------------------------------------- filters

def imfilter_replicate(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``imfilter(img, kernel, 'replicate')``: correlation, centre anchor, odd kernels."""
    k = np.asarray(kernel, dtype=np.float32 if img.dtype == np.float32 else np.float64)
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError("imfilter_replicate expects an odd-sized kernel")
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REPLICATE)


def gaussian_kernel_1d(sigma: float, size: int) -> np.ndarray:
    """Normalised 1-D Gaussian of the given odd length (the factor of ``fspecial``)."""
    half = (size - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - half
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    """``fspecial('gaussian', size, sigma)`` including its eps*max cut."""
    half = (size - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - half
    xx, yy = np.meshgrid(x, x)
    h = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    h[h < EPS * h.max()] = 0
    return h / h.sum()


def imgaussfilt(img: np.ndarray, sigma: float) -> np.ndarray:
    """``imgaussfilt(img, sigma)``: side 2*ceil(2*sigma)+1, replicate borders, per plane."""
    size = 2 * math.ceil(2 * sigma) + 1
    g = gaussian_kernel_1d(sigma, size).astype(img.dtype)
    return cv2.sepFilter2D(img, -1, g, g, borderType=cv2.BORDER_REPLICATE)


def fspecial_disk(radius: float) -> np.ndarray:
    """``fspecial('disk', r)``: pillbox weighted by the exact pixel-disk overlap area."""
    rad = float(radius)
    crad = math.ceil(rad - 0.5)
    ax = np.arange(-crad, crad + 1, dtype=np.float64)
    x, y = np.meshgrid(ax, ax)
    maxxy = np.maximum(np.abs(x), np.abs(y))
    minxy = np.minimum(np.abs(x), np.abs(y))
    r2 = rad * rad

    def safe_sqrt(v):
        return np.sqrt(np.maximum(v, 0.0))

    cond1 = r2 < (maxxy + 0.5) ** 2 + (minxy - 0.5) ** 2
    m1 = np.where(cond1, minxy - 0.5, safe_sqrt(r2 - (maxxy + 0.5) ** 2))
    cond2 = r2 > (maxxy - 0.5) ** 2 + (minxy + 0.5) ** 2
    m2 = np.where(cond2, minxy + 0.5, safe_sqrt(r2 - (maxxy - 0.5) ** 2))
    a1 = np.arcsin(np.clip(m1 / rad, -1, 1))
    a2 = np.arcsin(np.clip(m2 / rad, -1, 1))
    area = (r2 * (0.5 * (a2 - a1) + 0.25 * (np.sin(2 * a2) - np.sin(2 * a1)))
            - (maxxy - 0.5) * (m2 - m1) + (m1 - minxy + 0.5))
    edge = ((r2 < (maxxy + 0.5) ** 2 + (minxy + 0.5) ** 2)
            & (r2 > (maxxy - 0.5) ** 2 + (minxy - 0.5) ** 2)) | (
        (minxy == 0) & (maxxy - 0.5 < rad) & (maxxy + 0.5 >= rad))
    sgrid = area * edge + ((maxxy + 0.5) ** 2 + (minxy + 0.5) ** 2 < r2)
    c = crad
    sgrid[c, c] = min(math.pi * r2, math.pi / 2)
    if crad > 0 and rad > crad - 0.5 and r2 < (crad - 0.5) ** 2 + 0.25:
        m1s = math.sqrt(r2 - (crad - 0.5) ** 2)
        m1n = m1s / rad
        sg0 = 2 * (r2 * (0.5 * math.asin(m1n) + 0.25 * math.sin(2 * math.asin(m1n)))
                   - m1s * (crad - 0.5))
        for (i, j) in ((2 * c, c), (c, 2 * c), (c, 0), (0, c)):
            sgrid[i, j] = sg0
        for (i, j) in ((2 * c - 1, c), (c, 2 * c - 1), (c, 1), (1, c)):
            sgrid[i, j] -= sg0
    sgrid[c, c] = min(sgrid[c, c], 1.0)
    return sgrid / sgrid.sum()


def fspecial_motion(length: float, angle: float) -> np.ndarray:
    """``fspecial('motion', len, theta)``: MATLAB's anti-aliased line kernel."""
    length = max(1.0, float(length))
    half = (length - 1) / 2.0
    phi = (angle % 180) / 180.0 * math.pi
    cosphi, sinphi = math.cos(phi), math.sin(phi)
    xsign = int(np.sign(cosphi))
    linewdt = 1.0
    sx = math.trunc(half * cosphi + linewdt * xsign - length * EPS)
    sy = math.trunc(half * sinphi + linewdt - length * EPS)
    xs = np.arange(0, sx + xsign, xsign, dtype=np.float64)
    ys = np.arange(0, sy + 1, dtype=np.float64)
    x, y = np.meshgrid(xs, ys)
    dist2line = y * cosphi - x * sinphi
    rad = np.sqrt(x * x + y * y)
    last = (rad >= half) & (np.abs(dist2line) <= linewdt)
    with np.errstate(divide="ignore", invalid="ignore"):
        x2last = half - np.abs((x[last] + dist2line[last] * sinphi) / cosphi)
    dist2line[last] = np.sqrt(dist2line[last] ** 2 + x2last ** 2)
    dist2line = linewdt + EPS - np.abs(dist2line)
    dist2line[dist2line < 0] = 0
    ny, nx = dist2line.shape
    h = np.zeros((2 * ny - 1, 2 * nx - 1))
    h[:ny, :nx] = np.rot90(dist2line, 2)
    h[ny - 1:, nx - 1:] = dist2line
    h = h / (h.sum() + EPS * length * length)
    if cosphi > 0:
        h = np.flipud(h)
    return h


# ---------------------------------------------------------------- colour spaces

def _srgb_to_xyz_matrix() -> np.ndarray:
    """Linear sRGB -> XYZ, derived from the primaries as MATLAB (R2015+) does."""
    prim = np.array([[0.64, 0.33], [0.30, 0.60], [0.15, 0.06]])
    white = np.array([0.95047, 1.0, 1.08883])
    xyz = np.stack([prim[:, 0] / prim[:, 1], np.ones(3),
                    (1 - prim[:, 0] - prim[:, 1]) / prim[:, 1]])  # columns = primaries
    s = np.linalg.solve(xyz, white)
    return xyz * s


_M_RGB2XYZ = _srgb_to_xyz_matrix()
_M_XYZ2RGB = np.linalg.inv(_M_RGB2XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS = (6.0 / 29.0) ** 3
_LAB_KAPPA = 24389.0 / 27.0


def _pow(x: np.ndarray, p: float) -> np.ndarray:
    """|x|**p in float32 via OpenCV (several times faster than numpy); callers use
    it only where x >= 0 matters."""
    return cv2.pow(np.ascontiguousarray(x, dtype=np.float32), p)


def _apply_matrix(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-pixel 3x3 colour matrix (``img @ m.T``), via OpenCV for speed."""
    return cv2.transform(img, m.astype(img.dtype))


def rgb2lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (D65) in [0,1] -> CIELAB, as MATLAB ``rgb2lab``.  float32 in and out
    (float32 keeps every type here above 90 dB of the double-precision original)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    lin = np.where(rgb <= 0.04045, rgb / np.float32(12.92),
                   _pow((rgb + np.float32(0.055)) / np.float32(1.055), 2.4))
    xyz = _apply_matrix(lin, _M_RGB2XYZ / _WHITE[:, None])
    f = np.where(xyz > _LAB_EPS, _pow(xyz, 1 / 3),
                 (np.float32(_LAB_KAPPA) * xyz + np.float32(16.0)) / np.float32(116.0))
    lab = _apply_matrix(f, np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0],
                                     [0.0, 200.0, -200.0]]))
    lab[..., 0] -= 16.0
    return lab


def lab2rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB -> sRGB (D65) as MATLAB ``lab2rgb``: nothing is clipped."""
    lab = np.asarray(lab, dtype=np.float32)
    shifted = lab.copy()
    shifted[..., 0] += 16.0
    f = _apply_matrix(shifted, np.array([[1 / 116, 1 / 500, 0.0], [1 / 116, 0.0, 0.0],
                                         [1 / 116, 0.0, -1 / 200]]))
    f3 = f * f * f
    xyz = np.where(f3 > _LAB_EPS, f3, (np.float32(116.0) * f - np.float32(16.0))
                   / np.float32(_LAB_KAPPA))
    lin = _apply_matrix(xyz, _M_XYZ2RGB * _WHITE[None, :])
    # sRGB gamma, odd-symmetric so negative linear values stay finite.
    a = np.abs(lin)
    out = np.where(a <= 0.0031308, np.float32(12.92) * a,
                   np.float32(1.055) * _pow(a, 1 / 2.4) - np.float32(0.055))
    return np.copysign(out, lin)


def rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2hsv`` for images in [0,1], H scaled to [0,1).  float32.

    OpenCV's float conversion is the same hexcone formula (checked to 4e-7) and
    ~50x faster than doing it in numpy."""
    hsv = cv2.cvtColor(np.asarray(rgb, dtype=np.float32), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] *= np.float32(1 / 360)
    return hsv


def hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """MATLAB ``hsv2rgb`` (sextant formula), linear in S so negative S is allowed.
    float32, via OpenCV (whose float path is the same formula, unclipped)."""
    hsv = np.array(hsv, dtype=np.float32)
    hsv[..., 0] *= np.float32(360)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_YCC_T = np.array([[65.481, 128.553, 24.966],
                   [-37.797, -74.203, 112.0],
                   [112.0, -93.786, -18.214]]) / 255.0
_YCC_OFF = np.array([16.0, 128.0, 128.0]) / 255.0
_YCC_TINV = np.linalg.inv(_YCC_T)


_YCC_FORWARD = np.hstack([_YCC_T, _YCC_OFF[:, None]])
_YCC_BACK = np.hstack([_YCC_TINV, -(_YCC_TINV @ _YCC_OFF)[:, None]])


def rgb2ycbcr(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` on doubles (BT.601, Y in [16,235]/255), in the input's
    float precision (one OpenCV pass)."""
    return cv2.transform(rgb, _YCC_FORWARD.astype(rgb.dtype))


def ycbcr2rgb(ycc: np.ndarray) -> np.ndarray:
    """MATLAB ``ycbcr2rgb`` on doubles, which clips its output to [0,1]."""
    rgb = cv2.transform(ycc, _YCC_BACK.astype(ycc.dtype))
    return np.clip(rgb, 0.0, 1.0, out=rgb)


_GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def rgb2gray(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` with its exact (unrounded) coefficients."""
    return rgb @ _GRAY.astype(rgb.dtype)


# ----------------------------------------------------------------------- curves

def spline_curve(x: np.ndarray, knots_x, knots_y) -> np.ndarray:
    """MATLAB ``curves``: not-a-knot cubic spline through the knots, clipped to [0,1]."""
    cs = CubicSpline(np.asarray(knots_x, float), np.asarray(knots_y, float),
                     bc_type="not-a-knot")
    return np.clip(cs(x), 0.0, 1.0)


# ------------------------------------------------------------------ geometry

def imresize_nearest_index(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """0-based source indices of MATLAB ``imresize(..., 'nearest')`` along one axis."""
    x = np.arange(1, out_size + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    return np.clip(np.floor(u + 0.5).astype(np.int64), 1, in_size) - 1


def interp2_cubic(planes: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """MATLAB ``interp2(Z, X, Y, 'bicubic')`` of every plane of a C*H*W float32 stack
    on the grid 1..n: Keys cubic convolution (a = -0.5), Keys' boundary extension
    3f1-3f2+f3, NaN outside the grid.  Returns C*h*w for query arrays of shape h*w.

    The 16 taps are fetched with OpenCV's nearest-neighbour ``remap`` at integer
    coordinates (an exact gather, several times faster than numpy indexing);
    OpenCV's own bicubic cannot be used: it has a = -0.75 and quantises
    coordinates to 1/32 px.  Planes, not interleaved channels, because OpenCV's
    single-channel paths and unbroadcast numpy products are the fastest.
    """
    c, h, w = planes.shape
    z = np.empty((c, h + 2, w + 2), dtype=np.float32)
    z[:, 1:-1, 1:-1] = planes
    z[:, 0, 1:-1] = 3 * planes[:, 0] - 3 * planes[:, 1] + planes[:, 2]
    z[:, -1, 1:-1] = 3 * planes[:, -1] - 3 * planes[:, -2] + planes[:, -3]
    z[:, :, 0] = 3 * z[:, :, 1] - 3 * z[:, :, 2] + z[:, :, 3]
    z[:, :, -1] = 3 * z[:, :, -2] - 3 * z[:, :, -3] + z[:, :, -4]
    outside = (xq < 1) | (xq > w) | (yq < 1) | (yq > h)
    xc = np.clip(xq, 1, w).astype(np.float32)
    yc = np.clip(yq, 1, h).astype(np.float32)
    fx = np.minimum(np.floor(xc), w - 1)
    fy = np.minimum(np.floor(yc), h - 1)
    wx = _keys_weights(xc - fx)
    wy = _keys_weights(yc - fy)
    # 1-based sample k sits at extended index k, so tap k-1+n of floor k is at k-1+n.
    cols = [fx - 1 + n for n in range(4)]
    out = np.zeros((c,) + xq.shape, dtype=np.float32)
    tap = np.empty(xq.shape, dtype=np.float32)
    weight = np.empty(xq.shape, dtype=np.float32)
    for m in range(4):
        rows = fy - 1 + m
        for n in range(4):
            np.multiply(wy[m], wx[n], out=weight)
            for ch in range(c):
                cv2.remap(z[ch], cols[n], rows, cv2.INTER_NEAREST, dst=tap)
                tap *= weight
                out[ch] += tap
    out[:, outside] = np.nan
    return out


def _keys_weights(t: np.ndarray):
    """Keys (a=-0.5) weights of the four taps at offsets -1, 0, 1, 2 from floor."""
    t2 = t * t
    t3 = t2 * t
    return (
        (-t3 + 2 * t2 - t) * 0.5,
        (3 * t3 - 5 * t2 + 2) * 0.5,
        (-3 * t3 + 4 * t2 + t) * 0.5,
        (t3 - t2) * 0.5,
    )


# ---------------------------------------------------------------------- quality

def psnr_from_sse(sse: float, count: int, peak: float = 255.0) -> float:
    """MATLAB ``psnr`` from a summed squared error over ``count`` samples."""
    mse = sse / count
    return math.inf if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """MATLAB ``psnr`` of two same-shaped images (inf when identical)."""
    sse = cv2.norm(np.ascontiguousarray(a), np.ascontiguousarray(b), cv2.NORM_L2SQR)
    if a.dtype.kind in "ui" and b.dtype.kind in "ui":
        sse = round(sse)  # OpenCV's double accumulation is off by ~1e-8 of an integer
    return psnr_from_sse(sse, a.size, peak)
