"""Codecs: KADID types 9 and 10 against the original and the codec family against its
calibration (docs/codecs.md)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.distortions import distort, get, registry
from biqa.distortions._matlab import im2uint8, mapmm, psnr
from biqa.distortions.api import run_stretched
from biqa.distortions.compression import (CALIBRATION_TARGETS_DB, CODEC_SPECS, CODECS,
                                          _pillow_decode, decode_jpeg, encode_jpeg,
                                          encode_jpeg2000)


@pytest.fixture(scope="module")
def samples() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sample_reference_paths()]


@pytest.mark.parametrize("level", range(1, 6))
def test_jpeg_matches_original(reference, level):
    for ref in reference.refs:
        want = reference.output(ref, 10, level)
        got = distort(reference.image(ref), 10, level)
        assert psnr(want, got) >= 40.0, (ref, level, psnr(want, got))


def test_jpeg2000_hits_ratio_and_degrades_monotonically(samples):
    inputs = [im2uint8(mapmm(im.astype(np.float64))) for im in samples]  # what type 9 codes
    mean_psnr = []
    for ratio in get(9).params:
        coded = [encode_jpeg2000(im, ratio, "rates") for im in inputs]
        achieved = [im.size / len(data) for im, data in zip(inputs, coded)]
        # OpenJPEG's rate control lands within a few per cent, .jp2 boxes included.
        assert np.allclose(achieved, ratio, rtol=0.06), (ratio, achieved)
        mean_psnr.append(np.mean([psnr(im, _pillow_decode(data))
                                  for im, data in zip(inputs, coded)]))
    assert all(a > b for a, b in zip(mean_psnr, mean_psnr[1:])), mean_psnr


def test_kadid_codecs_see_the_stretch_in_double_precision():
    # An image spanning 0..200 stretches to k*255/200: its five ties (k*1.275 = n+0.5)
    # must round up as in MATLAB's double arithmetic; a float32 stretch misses two.
    span = 200
    values = np.arange(span + 1, dtype=np.float64)
    image = np.repeat(values.astype(np.uint8)[None, :, None], 3, axis=2).repeat(2, axis=0)
    want = np.floor(values * 255 / span + 0.5).astype(np.uint8)
    for type_id in (9, 10):
        spec = get(type_id)
        seen = run_stretched(lambda x: im2uint8(x.astype(np.float64)) / 255.0, image,
                             spec.input_dtype)
        assert np.array_equal(seen[0, :, 0], want), type_id
        # What the codec is handed on the table-driven path the type runs on.
        handed = []
        run_stretched(lambda x8: handed.append(x8) or x8, image, spec.input_dtype,
                      spec.pixels)
        assert spec.pixels == "uint8" and np.array_equal(handed[0][0, :, 0], want), type_id


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_opencv_decodes_jpeg_as_pillow_does(samples, subsampling):
    for im in samples:
        for quality in (90, 43, 24, 4):
            data = encode_jpeg(im, quality, subsampling)
            assert np.array_equal(decode_jpeg(data), _pillow_decode(data)), quality


def test_codec_ids_and_the_vipnet_stand_in():
    ids = [s.id for s in CODEC_SPECS]
    assert ids == list(range(30, 30 + len(ids)))
    assert len(ids) >= 4
    assert [s.id for s in registry() if s.family == "codec"] == ids
    assert CODEC_SPECS[0].name == "codec_avif"
    for s in CODEC_SPECS:
        assert not s.kadid_stretch and not s.stochastic and len(s.params) == 5


@pytest.mark.parametrize("spec", CODEC_SPECS, ids=lambda s: s.name)
def test_codec_levels_follow_calibration(spec, samples):
    mean_psnr = []
    for level in range(1, 6):
        outs = [distort(im, spec.id, level) for im in samples]
        for out, im in zip(outs, samples):
            assert out.dtype == np.uint8 and out.shape == im.shape
        mean_psnr.append(float(np.mean([psnr(im, out) for im, out in zip(samples, outs)])))
    assert all(a > b for a, b in zip(mean_psnr, mean_psnr[1:])), mean_psnr
    assert np.allclose(mean_psnr, CALIBRATION_TARGETS_DB[spec.id], atol=1.5), mean_psnr


@pytest.mark.parametrize("spec", CODEC_SPECS, ids=lambda s: s.name)
def test_codec_is_deterministic_and_takes_odd_sizes(spec, samples):
    im = samples[0]
    first = CODECS[spec.name.removeprefix("codec_")].encode(im, spec.params[2])
    again = CODECS[spec.name.removeprefix("codec_")].encode(im.copy(), spec.params[2])
    assert first == again
    for h, w in ((250, 333), (65, 97), (97, 65)):
        crop = np.ascontiguousarray(samples[1][:h, :w])
        out = distort(crop, spec.id, 5, rng=1)
        assert out.dtype == np.uint8 and out.shape == (h, w, 3)
        assert np.array_equal(out, distort(crop, spec.id, 5, rng=2))
        assert psnr(crop, out) < 45


@pytest.mark.parametrize("kind", [9, 10])
def test_kadid_codecs_take_odd_sizes(kind, samples):
    crop = np.ascontiguousarray(samples[2][:65, :97])
    out = distort(crop, kind, 3)
    assert out.shape == crop.shape and np.array_equal(out, distort(crop, kind, 3))


def test_codec_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        CODECS["webp"](np.zeros((64, 64, 3), np.float32), 50)
