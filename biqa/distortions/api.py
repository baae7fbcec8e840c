"""``distort(image, kind, level, rng)``: input checks, the KADID stretch, 8-bit output."""

from __future__ import annotations

import numpy as np

from .registry import get
from .spec import DistortionSpec


def as_rgb_uint8(image) -> np.ndarray:
    """Validate an image and bring it to uint8 H*W*3 RGB.

    Gray (H*W, H*W*1) is replicated to three channels; an alpha channel (gray+alpha
    H*W*2, RGBA H*W*4) is composited over white, the background a viewer shows,
    so transparent areas do not turn into whatever colour the encoder left behind
    them.  Anything else is refused with a ``ValueError`` that says why, because
    silently rescaling a 16-bit or float image would change what the distortion
    levels mean.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (8-bit RGB), got dtype {image.dtype}; "
                         "convert 16-bit or float images to 8-bit first")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be H*W or H*W*C, got {image.ndim} dimensions")
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"image must have 1 to 4 channels (gray, gray+alpha, RGB, RGBA), "
                         f"got {channels}")
    colour = image[:, :, :3] if channels >= 3 else np.repeat(image[:, :, :1], 3, axis=2)
    if channels in (2, 4):
        alpha = image[:, :, -1:].astype(np.uint32)
        blended = colour.astype(np.uint32) * alpha + 255 * (255 - alpha)
        colour = ((blended + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(colour)


def as_generator(rng) -> np.random.Generator:
    """``None`` -> fresh entropy, int -> seeded, Generator -> itself."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a numpy Generator, "
                     f"not {type(rng).__name__}")


def check_level(level) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= 5:
        raise ValueError(f"level must be an integer 1..5, got {level!r}")
    return int(level)


def apply_spec(spec: DistortionSpec, image: np.ndarray, level: int,
               rng: np.random.Generator) -> np.ndarray:
    """Run one type on a validated uint8 RGB image (no checks: the caller made them)."""
    param = spec.params[level - 1]
    if not spec.kadid_stretch:
        return spec.fn(image, param, rng)
    return run_stretched(lambda x: spec.fn(x, param, rng), image, spec.input_dtype)


def run_stretched(pixel_fn, image: np.ndarray, dtype="float32") -> np.ndarray:
    """The KADID entry point around a pixel function: min-max stretch the uint8 input
    (from its integer values), apply, stretch the output again, ``im2uint8``.

    Both stretches are done in double precision, as MATLAB does, so ties at .5
    round the same way; the input one is a 256-entry lookup table.
    """
    lo, hi = int(image.min()), int(image.max())
    levels = np.arange(256, dtype=np.float64)
    lut = (levels - lo) / (hi - lo) if hi > lo else levels
    x = lut.astype(dtype)[image]
    return stretch_to_uint8(np.asarray(pixel_fn(x)))


def stretch_to_uint8(y: np.ndarray) -> np.ndarray:
    """``im2uint8(mapmm(y))`` in one pass of double arithmetic; NaN becomes 0."""
    y = y.astype(np.float64)
    nan = np.isnan(y)
    has_nan = bool(nan.any())
    lo = float(np.nanmin(y) if has_nan else y.min())
    hi = float(np.nanmax(y) if has_nan else y.max())
    if hi > lo:
        y -= lo
        y /= hi - lo
    y *= 255.0
    y += 0.5
    np.clip(y, 0.0, 255.0, out=y)
    if has_nan:
        y[nan] = 0.0
    return y.astype(np.uint8)  # truncation of a non-negative value is floor


def distort(image, kind, level, rng=None) -> np.ndarray:
    """Apply distortion ``kind`` (id or name) at ``level`` 1..5 to an RGB image.

    Returns uint8 H*W*3 of the input's height and width.  All randomness comes
    from ``rng`` (None, an int seed or a ``numpy.random.Generator``), so the same
    (image, kind, level, seed) gives the same bytes on any machine.
    """
    spec = get(kind)
    level = check_level(level)
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    if min(h, w) < spec.min_size:
        raise ValueError(f"image is {w}x{h} px; {spec.name} (type {spec.id}) needs at least "
                         f"{spec.min_size}x{spec.min_size}")
    out = apply_spec(spec, img, level, as_generator(rng))
    assert out.dtype == np.uint8 and out.shape == img.shape, (spec.name, out.dtype, out.shape)
    return out
