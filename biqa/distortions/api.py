"""``distort(image, kind, level, rng)``: input checks, the KADID stretch, 8-bit output."""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from ._matlab import im2uint8
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
    return _run(spec, image, level, rng)[0]


def apply_spec_with_draws(spec: DistortionSpec, image: np.ndarray, level: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """``apply_spec`` plus a JSON-able record of the values drawn (or chosen) for
    this output: what explains it; the seed replays it."""
    out, draws = _run(spec, image, level, rng)
    summarize = spec.summarize or record_draws
    return out, summarize(draws) if draws else {}


def replay_draws(spec: DistortionSpec, image: np.ndarray, level: int, draws: dict) -> np.ndarray:
    """The output for given draws, e.g. a record read back from JSON -- where the
    record holds them in full (motion angle, shift vector, patches, blocks, CA
    candidate); per-pixel noise is recorded as a summary and replays from the seed."""
    if spec.sample is None:
        raise ValueError(f"{spec.name} draws nothing to replay")
    param = spec.params[level - 1]
    if not spec.kadid_stretch:
        return spec.fn(image, param, **draws)
    return run_stretched(lambda x: spec.fn(x, param, **draws), image, spec.input_dtype,
                         spec.pixels)


def _run(spec: DistortionSpec, image: np.ndarray, level: int, rng) -> tuple[np.ndarray, dict]:
    param = spec.params[level - 1]
    draws = spec.sample(image, param, rng) if spec.sample is not None else {}

    def pixel_fn(x):
        return spec.fn(x, param, **draws) if spec.sample is not None else spec.fn(x, param, rng)

    if not spec.kadid_stretch:
        return pixel_fn(image), draws
    return run_stretched(pixel_fn, image, spec.input_dtype, spec.pixels), draws


def input_table(image: np.ndarray) -> np.ndarray:
    """The stretched value of each uint8 level: (v - min)/(max - min) in double,
    from the integer values as MATLAB's ``mapmm(double(I))`` has it (a constant
    image is left as it is)."""
    return _input_tables(int(image.min()), int(image.max()))[0]


@functools.lru_cache(maxsize=1024)
def _input_tables(lo: int, hi: int):
    """(double table, its float32 copy, its ``im2uint8``, whether that is the identity)."""
    levels = np.arange(256, dtype=np.float64)
    table = (levels - lo) / (hi - lo) if hi > lo else levels
    to8 = im2uint8(table)
    tables = (table, table.astype(np.float32), to8)
    for t in tables:
        t.setflags(write=False)
    return tables + (_is_identity(to8),)


def run_stretched(pixel_fn, image: np.ndarray, dtype="float32", pixels="float") -> np.ndarray:
    """The KADID entry point around a pixel function: min-max stretch the uint8 input
    (from its integer values), apply, stretch the output again, ``im2uint8``.

    Both stretches are the double-precision arithmetic of MATLAB, so ties at .5
    round the same way; where the pixel function allows (``pixels``, see
    ``DistortionSpec``) they are done as 256-entry lookup tables, which give the
    same bytes at a fraction of the cost.
    """
    table64, table32, to8, to8_identity = _input_tables(*_level_range(image))
    table = table32 if np.dtype(dtype) == np.float32 else table64.astype(dtype)
    if pixels == "levels":
        return _levels_to_uint8(*_with_paints(pixel_fn(image)), table, image)
    if pixels == "pointwise":
        values = np.asarray(pixel_fn(table.copy()))
        return _levels_to_uint8(image, [], values, image)
    if pixels == "uint8":
        coded = pixel_fn(image if to8_identity else cv2.LUT(image, to8))
        return _levels_to_uint8(coded, [], _DECODED_TABLE, image)
    if pixels != "float":
        raise ValueError(f"unknown pixel domain {pixels!r}")
    x = cv2.LUT(image, table)
    y, paints = _with_paints(pixel_fn(x))
    y = np.asarray(y)
    for index, value in paints:
        y[index] = value
    return stretch_to_uint8(y)


_DECODED_TABLE = np.arange(256) / 255.0  # an 8-bit result read back as double, v/255
_DECODED_TABLE.setflags(write=False)


def _level_range(levels: np.ndarray) -> tuple[int, int]:
    """(min, max) of a uint8 image in one pass."""
    if levels.dtype == np.uint8 and levels.flags.c_contiguous:
        lo, hi, _, _ = cv2.minMaxLoc(levels.reshape(levels.shape[0], -1))
        return int(lo), int(hi)
    return int(levels.min()), int(levels.max())


def _with_paints(result) -> tuple[np.ndarray, list]:
    return result if isinstance(result, tuple) else (result, [])


def _is_identity(lut: np.ndarray) -> bool:
    return bool(np.array_equal(lut, np.arange(256)))


def _stretch_values(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The output stretch and ``im2uint8`` of some values, given the output's range:
    the exact arithmetic of ``stretch_to_uint8``."""
    y = np.array(values, dtype=np.float64)
    if hi > lo:
        y -= lo
        y /= hi - lo
    y *= 255.0
    y += 0.5
    np.minimum(np.maximum(y, 0.0, out=y), 255.0, out=y)
    return y.astype(np.uint8)


@functools.lru_cache(maxsize=1024)
def _output_lut(raw: bytes, dtype: str, lo: float, hi: float) -> tuple[np.ndarray, bool]:
    """The output stretch of a table of 256 values (given as bytes: a cache key), and
    whether it is the identity."""
    lut = _stretch_values(np.frombuffer(raw, dtype=dtype), lo, hi)
    lut.setflags(write=False)
    return lut, _is_identity(lut)


def _levels_to_uint8(levels: np.ndarray, paints: list, table: np.ndarray,
                     source: np.ndarray) -> np.ndarray:
    """``stretch_to_uint8`` of the image whose element values are ``table[levels]``
    with ``paints`` written over it, computed as a lookup table.

    The output range is the range over the levels left unpainted and the painted
    values; the table is non-decreasing for the stretched input, not necessarily
    for a pointwise function's values, whose present levels are then counted.
    Where the table maps every level to itself the levels are the result: copied
    only if they are (or share memory with) the caller's ``source`` image.
    """
    lmin, lmax, scratch = _unpainted_range(levels, paints)
    painted = [np.asarray(v, dtype=table.dtype).ravel() for _, v in paints]
    candidates = list(painted)
    if lmin <= lmax:  # some element is unpainted
        span = table[lmin:lmax + 1]
        if np.all(span[1:] >= span[:-1]):
            candidates.append(table[[lmin, lmax]])
        else:
            present = cv2.calcHist([levels.reshape(levels.shape[0], -1)], [0], None, [256],
                                   [0, 256]).ravel() > 0
            candidates.append(table[present])
    allv = np.concatenate(candidates)
    lo, hi = float(allv.min()), float(allv.max())
    lut, identity = _output_lut(np.ascontiguousarray(table).tobytes(), table.dtype.str, lo, hi)
    if not identity:
        out = cv2.LUT(levels, lut)
    elif scratch is not None:  # it differs from the levels only where paint goes anyway
        out = scratch
    else:
        out = levels.copy() if np.may_share_memory(levels, source) else levels
    if paints:
        values8 = _stretch_values(np.concatenate(painted), lo, hi)
        start = 0
        for (index, value), v in zip(paints, painted):
            out[index] = values8[start:start + v.size].reshape(np.shape(value))
            start += v.size
    return out


def _unpainted_range(levels: np.ndarray, paints: list):
    """(min, max) level over the elements no paint covers (min > max if none is
    left), and the scratch copy used to find them (None without paints)."""
    if not paints:
        return _level_range(levels) + (None,)
    scratch = levels.copy()
    for index, _ in paints:
        scratch[index] = 255
    lmin = int(scratch.min())
    for index, _ in paints:
        scratch[index] = 0
    return lmin, int(scratch.max()), scratch


def stretch_to_uint8(y: np.ndarray) -> np.ndarray:
    """``im2uint8(mapmm(y))`` in double arithmetic, as MATLAB; NaN becomes 0.

    Where the output already spans [0, 1] (the clipping types) the stretch is the
    identity and is skipped, bit for bit: y - 0 and y / 1 are exact.
    """
    lo, hi = float(y.min()), float(y.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _stretch_nonfinite(y)
    flat = y.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    # In blocks: the double temporary stays small (cache-resident, no fresh pages).
    for start in range(0, flat.size, _STRETCH_BLOCK):
        block = flat[start:start + _STRETCH_BLOCK]
        if (lo, hi) == (0.0, 1.0):
            t = np.multiply(block, 255.0, dtype=np.float64)
        elif hi > lo:
            t = block.astype(np.float64)
            t -= lo
            t /= hi - lo
            t *= 255.0
        else:  # nothing to stretch: saturate as im2uint8 does
            t = np.clip(block, 0.0, 1.0).astype(np.float64)
            t *= 255.0
        t += 0.5
        out[start:start + _STRETCH_BLOCK] = t  # truncation of [0.5, 255.5] is floor
    return out.reshape(y.shape)


_STRETCH_BLOCK = 1 << 16


def _stretch_nonfinite(y: np.ndarray) -> np.ndarray:
    """``stretch_to_uint8`` where NaN (or inf) occurs: range over the rest, NaN -> 0."""
    y = y.astype(np.float64)
    nan = np.isnan(y)
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    if hi > lo:
        y -= lo
        y /= hi - lo
    y *= 255.0
    y += 0.5
    np.clip(y, 0.0, 255.0, out=y)
    y[nan] = 0.0
    return y.astype(np.uint8)


def record_draws(draws: dict) -> dict:
    """A JSON-able record of a type's draws: scalars and small arrays in full (float32
    values to 9 significant digits, which give back the same float32), large
    arrays -- per-pixel noise, replayable from the seed -- as shape, mean, sd,
    min and max."""
    return {key: _jsonable(value) for key, value in draws.items()}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        if value.size > _FULL_ARRAY:
            return {"shape": list(value.shape), **_summary(value.reshape(-1))}
        if value.dtype == np.float32:
            return np.vectorize(_float32_str, otypes=[float])(value).tolist()
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


_FULL_ARRAY = 1024  # arrays up to this size are recorded element by element


def _summary(flat: np.ndarray) -> dict:
    """Mean, (population) sd, min and max, summed in double without a double copy."""
    mean = float(np.add.reduce(flat, dtype=np.float64)) / flat.size
    mean_sq = float(np.add.reduce(np.square(flat), dtype=np.float64)) / flat.size
    return {"mean": _sig(mean), "sd": _sig(math.sqrt(max(mean_sq - mean * mean, 0.0))),
            "min": _sig(flat.min()), "max": _sig(flat.max())}


def _sig(x) -> float:
    return float(f"{float(x):.6g}")


def _float32_str(x) -> float:
    return float(f"{float(x):.9g}")


def distort_with_draws(image, kind, level, rng=None) -> tuple[np.ndarray, dict]:
    """``distort`` plus the JSON-able record of what was drawn for this output
    (``apply_spec_with_draws``)."""
    spec, img, level = _checked(image, kind, level)
    out, draws = apply_spec_with_draws(spec, img, level, as_generator(rng))
    assert out.dtype == np.uint8 and out.shape == img.shape, (spec.name, out.dtype, out.shape)
    return out, draws


def _checked(image, kind, level) -> tuple[DistortionSpec, np.ndarray, int]:
    spec = get(kind)
    level = check_level(level)
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    if min(h, w) < spec.min_size:
        raise ValueError(f"image is {w}x{h} px; {spec.name} (type {spec.id}) needs at least "
                         f"{spec.min_size}x{spec.min_size}")
    return spec, img, level


def distort(image, kind, level, rng=None) -> np.ndarray:
    """Apply distortion ``kind`` (id or name) at ``level`` 1..5 to an RGB image.

    Returns uint8 H*W*3 of the input's height and width.  All randomness comes
    from ``rng`` (None, an int seed or a ``numpy.random.Generator``), so the same
    (image, kind, level, seed) gives the same bytes on any machine.
    """
    spec, img, level = _checked(image, kind, level)
    out = apply_spec(spec, img, level, as_generator(rng))
    assert out.dtype == np.uint8 and out.shape == img.shape, (spec.name, out.dtype, out.shape)
    return out
