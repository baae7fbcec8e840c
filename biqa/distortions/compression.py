"""Lossy codecs: KADID types 9 (JPEG 2000) and 10 (JPEG), and the codec family (ids 30+).

Every codec runs in memory through Pillow (libjpeg-turbo, OpenJPEG, libwebp,
libavif/aom) or a Pillow plugin (pillow-heif/x265, pillow-jxl-plugin/libjxl).
Each encoder pins every setting that changes its output -- speed, effort,
subsampling, thread count -- so the bytes do not depend on library defaults or
on how many cores the machine has.  Settings, calibration and measurements are
in docs/codecs.md; ``benchmarks/calibrate_codecs.py`` re-derives the levels.
"""

from __future__ import annotations

import importlib
import io
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from PIL import Image, features

from .spec import DistortionSpec

# The codec levels aim at the span of KADID's JPEG levels, mean PSNR over the
# bundled sample references from 38 dB down to 24 dB, in five even steps.
KADID_JPEG_SPAN_DB = (38.0, 24.0)

AVIF_SPEED = 8  # libavif/aom 0-10; its default 6 costs up to ~280 ms at 512x384, 8 ~100
JPEGXL_EFFORT = 5  # libjxl 1-9; its default 7 costs ~2x the time (up to ~135 ms)
HEIF_X265 = {"preset": "medium", "tune": "ssim", "x265:pools": "none"}
WEBP_METHOD = 4  # libwebp's default speed/quality trade-off


def level_targets(floor_db: float) -> tuple[float, ...]:
    """Five evenly spaced mean-PSNR targets from 38 dB down to 24 dB -- or down to
    the codec's floor (its mean PSNR at its coarsest setting) where the format
    cannot degrade further, so that its five levels stay evenly spread."""
    top, bottom = KADID_JPEG_SPAN_DB
    return tuple(round(float(v), 1) for v in np.linspace(top, max(bottom, floor_db), 5))


# ------------------------------------------------------------------ plumbing

def _to_pil(img: np.ndarray) -> Image.Image:
    """Refuse anything but uint8 H*W*3: a codec would silently reinterpret it."""
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8
            and img.ndim == 3 and img.shape[2] == 3):
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"codecs take uint8 H*W*3 RGB images, got {dtype} {shape}")
    return Image.fromarray(np.ascontiguousarray(img))


def _save(img: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    _to_pil(img).save(buf, fmt, **options)
    return buf.getvalue()


# OpenCV's libjpeg-turbo decodes to the same pixels as Pillow's (both the accurate
# integer IDCT and fancy upsampling; tests/test_compression.py compares them) in
# half the time.  IMREAD_COLOR_RGB came with OpenCV 4.10.
_RGB_READ = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_jpeg(data: bytes) -> np.ndarray:
    """A baseline JPEG as uint8 RGB."""
    flags = (_RGB_READ if _RGB_READ is not None else cv2.IMREAD_COLOR) \
        | cv2.IMREAD_IGNORE_ORIENTATION
    out = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if out is None:
        raise ValueError("not a decodable JPEG")
    return out if _RGB_READ is not None else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _plugin(module: str, package: str):
    """Import an optional codec plugin, saying which package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this codec needs the {package!r} package "
                          f"(pip install {package})") from err


def _jpeg2000_resolutions(height: int, width: int) -> int:
    """Kakadu's and OpenJPEG's default of 6 resolution levels (5 wavelet
    decompositions), fewer where the image is too small to halve 5 times."""
    return min(6, int(math.log2(min(height, width))) + 1)


# ------------------------------------------------------------------ encoders

def encode_jpeg(img: np.ndarray, quality: int, subsampling: str) -> bytes:
    """Baseline JPEG (libjpeg-turbo, IJG quality tables, no Huffman optimisation)."""
    return _save(img, "JPEG", quality=int(quality), subsampling=subsampling,
                 optimize=False, progressive=False)


def encode_jpeg2000(img: np.ndarray, value: float, mode: str) -> bytes:
    """JPEG 2000 (OpenJPEG) as a .jp2 file, one quality layer.

    ``mode="rates"``: ``value`` is the compression ratio raw/coded (MATLAB's
    'CompressionRatio'); ``mode="dB"``: ``value`` is the PSNR the rate
    allocator aims for.  Irreversible 9/7 wavelet with the ICT colour transform,
    64x64 code blocks, LRCP: Kakadu's lossy defaults, which MATLAB used.
    """
    h, w = img.shape[:2]
    return _save(img, "JPEG2000", quality_mode=mode, quality_layers=[float(value)],
                 irreversible=True, mct=1, num_resolutions=_jpeg2000_resolutions(h, w),
                 codeblock_size=(64, 64), progression="LRCP")


def encode_webp(img: np.ndarray, quality: int) -> bytes:
    """Lossy WebP (VP8 intra, always 4:2:0)."""
    return _save(img, "WEBP", lossless=False, quality=int(quality), method=WEBP_METHOD)


def encode_avif(img: np.ndarray, quality: int) -> bytes:
    """AVIF through Pillow's own libavif with the aom encoder, 4:2:0, one thread.

    aom's output changes between one and several threads, so the thread count is
    pinned to keep the bytes identical on every machine.
    """
    if not features.check("avif"):
        raise ImportError("this Pillow was built without AVIF support; "
                          "install a Pillow wheel >= 11.3")
    from PIL import _avif
    if not _avif.encoder_codec_available("aom"):
        raise ImportError("Pillow's libavif lacks the aom encoder that the AVIF levels "
                          "were calibrated with")
    return _save(img, "AVIF", quality=int(quality), speed=AVIF_SPEED, subsampling="4:2:0",
                 codec="aom", max_threads=1, range="full", autotiling=False,
                 tile_rows=0, tile_cols=0)


def encode_heif(img: np.ndarray, quality: int) -> bytes:
    """HEIF/HEVC (libheif + x265), 4:2:0, x265 without its thread pool.

    x265's wavefront threading changes the bitstream, hence ``pools=none``.
    """
    heif = _plugin("pillow_heif", "pillow-heif")
    buf = io.BytesIO()
    heif.from_pillow(_to_pil(img)).save(buf, quality=int(quality), chroma=420,
                                        enc_params=dict(HEIF_X265))
    return buf.getvalue()


def decode_heif(data: bytes) -> np.ndarray:
    heif = _plugin("pillow_heif", "pillow-heif")
    return np.asarray(heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True))[:, :, :3]


def encode_jpegxl(img: np.ndarray, quality: int) -> bytes:
    """JPEG XL (libjxl VarDCT), bare codestream, one thread."""
    _plugin("pillow_jxl", "pillow-jxl-plugin")
    return _save(img, "JXL", lossless=False, quality=int(quality), effort=JPEGXL_EFFORT,
                 decoding_speed=0, use_container=False, num_threads=1)


def decode_jpegxl(data: bytes) -> np.ndarray:
    _plugin("pillow_jxl", "pillow-jxl-plugin")  # registers the JXL decoder with Pillow
    return _pillow_decode(data)


# ------------------------------------------------------------- KADID 9 and 10

# Under the KADID stretch these see the 8-bit conversion of the stretched image and
# their output is read as value/255 (``pixels="uint8"``), as the original's
# im2uint8 -> codec -> im2double.

def jpeg2000(img: np.ndarray, ratio: float, rng=None) -> np.ndarray:
    """KADID type 9: JPEG 2000 at a compression ratio (OpenJPEG standing in for
    MATLAB's Kakadu; see docs/codecs.md)."""
    return _pillow_decode(encode_jpeg2000(img, ratio, "rates"))


def jpeg(img: np.ndarray, quality: int, rng=None) -> np.ndarray:
    """KADID type 10: baseline JPEG, IJG quality, 4:2:0 -- pixel-identical to the
    original's output on the reference images."""
    return decode_jpeg(encode_jpeg(img, quality, "4:2:0"))


# ----------------------------------------------------------- the codec family

@dataclass(frozen=True)
class Codec:
    """One codec of the family: fixed encoder settings and a single quality knob.

    Calling it is the distortion ``fn(img uint8, param, rng) -> uint8``: encode
    at ``param``, decode.  ``rng`` is unused; the encoders are deterministic.
    """

    name: str
    description: str
    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes], np.ndarray] = _pillow_decode

    def __call__(self, img: np.ndarray, param, rng=None) -> np.ndarray:
        return self.decode(self.encode(img, param))


def _jpeg_444(img: np.ndarray, quality: int) -> bytes:
    return encode_jpeg(img, quality, "4:4:4")


def _jpeg2000_db(img: np.ndarray, psnr_db: float) -> bytes:
    return encode_jpeg2000(img, psnr_db, "dB")


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("avif", f"AVIF (libavif/aom, speed {AVIF_SPEED}, 4:2:0) at quality q", encode_avif),
    Codec("webp", "WebP lossy (libwebp, method 4, 4:2:0) at quality q", encode_webp),
    Codec("jpeg_444", "baseline JPEG (libjpeg-turbo) at quality q, 4:4:4 chroma", _jpeg_444,
          decode_jpeg),
    Codec("jpeg2000_db", "JPEG 2000 (OpenJPEG, 9/7) at a fixed-quality target in dB",
          _jpeg2000_db),
    Codec("heif", "HEIF/HEVC (libheif/x265 medium, 4:2:0) at quality q", encode_heif,
          decode_heif),
    Codec("jpegxl", f"JPEG XL (libjxl, effort {JPEGXL_EFFORT}) at quality q", encode_jpegxl,
          decode_jpegxl),
)}

# id, codec, encoder setting per level (quality 0-100; for jpeg2000_db the PSNR
# the rate allocator aims at), and the mean PSNR per level it was calibrated to
# (``level_targets``).  Found by benchmarks/calibrate_codecs.py; see docs/codecs.md.
_LEVELS = (
    (30, "avif", (80, 59, 44, 24, 2), (38.0, 35.2, 32.4, 29.6, 26.8)),
    (31, "webp", (90, 78, 38, 8, 0), (38.0, 35.2, 32.4, 29.6, 26.8)),
    (32, "jpeg_444", (86, 62, 23, 9, 4), (38.0, 34.5, 31.0, 27.5, 24.0)),
    (33, "jpeg2000_db", (38.2, 34.7, 31.1, 27.7, 24.2), (38.0, 34.5, 31.0, 27.5, 24.0)),
    (34, "heif", (57, 42, 28, 13, 0), (38.0, 34.9, 31.9, 28.8, 25.8)),
    (35, "jpegxl", (91, 80, 58, 22, 0), (38.0, 35.3, 32.7, 30.0, 27.3)),
)

CODEC_SPECS: tuple[DistortionSpec, ...] = tuple(
    DistortionSpec(type_id, f"codec_{name}", "codec", params, False, CODECS[name],
                   kadid_stretch=False, description=CODECS[name].description)
    for type_id, name, params, _ in _LEVELS)

# Mean PSNR (dB) per level over the sample references that each codec type was
# calibrated to, by type id.
CALIBRATION_TARGETS_DB: dict[int, tuple[float, ...]] = {
    type_id: targets for type_id, _, _, targets in _LEVELS}
