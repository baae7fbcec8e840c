"""The public API: registry contents, input handling, determinism, output contract."""

from __future__ import annotations

import numpy as np
import pytest

from biqa.data import sample_reference_paths
from biqa.distortions import distort, get, registry, resolve_distortions
from biqa.distortions._matlab import fspecial_disk, fspecial_motion, im2uint8, mapmm

# The level tables of the original generator (imdist_generator.m), literally.
KADID_LEVELS = {
    1: (0.1, 0.5, 1, 2, 5), 2: (1, 2, 4, 6, 8), 3: (1, 2, 4, 6, 10), 4: (1, 3, 6, 8, 12),
    5: (1, 3, 6, 8, 12), 6: (64, 48, 32, 16, 8), 7: (0.4, 0.2, 0.1, 0, -0.4),
    8: (1, 2, 3, 6, 9), 9: (16, 32, 45, 120, 400), 10: (43, 36, 24, 7, 4),
    11: (0.001, 0.002, 0.003, 0.005, 0.01), 12: (0.0001, 0.0005, 0.001, 0.002, 0.003),
    13: (0.001, 0.005, 0.01, 0.02, 0.03), 14: (0.001, 0.005, 0.01, 0.02, 0.05),
    15: (0.01, 0.03, 0.05, 0.1, 0.15), 16: (0.1, 0.2, 0.4, 0.7, 1.1),
    17: (0.05, 0.1, 0.2, 0.4, 0.8), 18: (0.15, 0.08, 0, -0.08, -0.15),
    19: (0.05, 0.1, 0.2, 0.5, 1), 20: (20, 40, 60, 80, 100), 21: (0.01, 0.05, 0.1, 0.2, 0.5),
    22: (20, 16, 13, 10, 7), 23: (2, 4, 6, 8, 10), 24: (1, 2, 3, 6, 12),
    25: (0.3, 0.15, 0, -0.4, -0.6),
}


@pytest.fixture(scope="module")
def small_image():
    from PIL import Image
    img = Image.open(sample_reference_paths()[2]).convert("RGB").resize((96, 72))
    return np.asarray(img)


def test_registry_holds_the_kadid_tables_literally():
    specs = {s.id: s for s in registry()}
    for type_id, levels in KADID_LEVELS.items():
        assert specs[type_id].params == levels
        assert specs[type_id].family == "kadid"
    ids = [s.id for s in registry()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len({s.name for s in registry()}) == len(ids)
    assert {s.family for s in registry()} == {"kadid", "vipnet", "codec"}
    entry = registry()[0].as_dict()
    assert {"id", "name", "family", "params", "stochastic"} <= set(entry)


def test_named_sets():
    assert [s.id for s in resolve_distortions("kadid")] == list(range(1, 26))
    vipnet = resolve_distortions("vipnet")
    assert len(vipnet) == 30 and [s.id for s in vipnet][:29] == list(range(1, 30))
    assert vipnet[-1].family == "codec"
    assert len(resolve_distortions("all")) == len(registry())
    assert [s.id for s in resolve_distortions("1, jpeg ,3-4")] == [1, 10, 3, 4]
    with pytest.raises(ValueError, match="twice"):
        resolve_distortions("1,gaussian_blur")
    with pytest.raises(ValueError, match="unknown distortion name"):
        resolve_distortions("blurry")


def test_lookup_by_id_name_and_digit_string():
    assert get(3).name == "motion_blur"
    assert get("motion_blur").id == 3
    assert get("3").id == 3
    with pytest.raises(ValueError, match="unknown distortion id"):
        get(999)


@pytest.mark.parametrize("spec", registry(), ids=lambda s: s.name)
def test_every_type_and_level_keeps_the_contract(spec, small_image):
    from biqa.distortions import DistortionNotApplicable

    for level in range(1, 6):
        try:
            out = distort(small_image, spec.id, level, rng=7)
        except DistortionNotApplicable:
            continue  # chromatic aberration may find no candidate on some images
        assert out.dtype == np.uint8 and out.shape == small_image.shape
        again = distort(small_image, spec.id, level, rng=7)
        assert np.array_equal(out, again), "same seed must give the same bytes"


@pytest.mark.parametrize("type_id", [s.id for s in registry() if s.stochastic])
def test_random_types_depend_on_the_seed_only(type_id, small_image):
    a = distort(small_image, type_id, 5, rng=1)
    b = distort(small_image, type_id, 5, rng=np.random.default_rng(1))
    c = distort(small_image, type_id, 5, rng=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gray_and_rgba_are_converted(small_image):
    gray = small_image[..., 0]
    out = distort(gray, 1, 3, rng=0)
    assert out.shape == gray.shape + (3,)
    assert np.array_equal(out, distort(np.repeat(gray[..., None], 3, axis=2), 1, 3, rng=0))
    opaque = np.dstack([small_image, np.full(gray.shape, 255, np.uint8)])
    assert np.array_equal(distort(opaque, 2, 2), distort(small_image, 2, 2))
    # Alpha is composited over white: a fully transparent image is white.
    from biqa.distortions.api import as_rgb_uint8
    clear = np.dstack([small_image, np.zeros(gray.shape, np.uint8)])
    assert (as_rgb_uint8(clear) == 255).all()
    half = as_rgb_uint8(np.dstack([np.zeros_like(small_image), np.full(gray.shape, 128,
                                                                        np.uint8)]))
    assert (half == 127).all()  # 255 * (1 - 128/255), rounded
    gray_alpha = np.dstack([gray, np.full(gray.shape, 255, np.uint8)])
    assert np.array_equal(as_rgb_uint8(gray_alpha), np.dstack([gray] * 3))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((80, 80, 3), np.uint16), "uint8"),
    (np.zeros((80, 80, 3), np.float32), "uint8"),
    (np.zeros((0, 80, 3), np.uint8), "empty"),
    (np.zeros((80, 80, 3, 1), np.uint8), "dimensions"),
    (np.zeros((80, 80, 5), np.uint8), "channels"),
    (np.zeros((40, 200, 3), np.uint8), "at least"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_bad_images_are_refused_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        distort(bad, 1, 1)


@pytest.mark.parametrize("level", [0, 6, 2.5, "3", True])
def test_bad_levels_are_refused(level, small_image):
    with pytest.raises(ValueError, match="level"):
        distort(small_image, 1, level)


def test_bad_rng_is_refused(small_image):
    with pytest.raises(ValueError, match="rng"):
        distort(small_image, 11, 1, rng="seed")


def test_the_kadid_stretch_rounds_half_away_from_zero():
    # An image spanning 0..232 is stretched by 255/232: k=116 lands exactly on 127.5.
    img = np.tile(np.arange(0, 233, dtype=np.uint8), (80, 1))[:, :232]
    img = np.dstack([img] * 3)
    img[0, 0] = 232
    out = distort(img, "gaussian_blur", 1)  # sigma 0.1 is the identity
    expected = np.floor(img.astype(np.float64) * 255 / 232 + 0.5)
    assert np.array_equal(out, expected.astype(np.uint8))
    assert out[0, 116, 0] == 128


def test_im2uint8_and_mapmm():
    assert np.array_equal(im2uint8(np.array([-1, 0.5 / 255, 1.5 / 255, 2, np.nan])),
                          [0, 1, 2, 255, 0])
    x = np.array([2.0, 4.0, 6.0])
    assert np.allclose(mapmm(x), [0, 0.5, 1])
    assert np.array_equal(mapmm(np.ones(3)), np.ones(3))


def test_matlab_kernels_have_the_documented_shapes():
    # fspecial('disk', 1): 3x3, corners smaller than edges, centre largest.
    d = fspecial_disk(1)
    assert d.shape == (3, 3) and abs(d.sum() - 1) < 1e-12
    assert d[0, 0] < d[0, 1] < d[1, 1]
    assert fspecial_disk(8).shape == (17, 17)
    # fspecial('motion', 10, 30) is 7x9 in MATLAB (the reference README).
    assert fspecial_motion(10, 30).shape == (7, 9)
    assert fspecial_motion(1, 0).shape == (1, 1)
    horizontal = fspecial_motion(5, 0)
    assert horizontal.shape == (1, 5) and abs(horizontal.sum() - 1) < 1e-9
