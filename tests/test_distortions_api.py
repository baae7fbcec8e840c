"""The public API: registry contents, input handling, determinism, output contract."""

from __future__ import annotations

import json

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

    before = small_image.copy()
    for level in range(1, 6):
        try:
            out = distort(small_image, spec.id, level, rng=7)
        except DistortionNotApplicable:
            continue  # chromatic aberration may find no candidate on some images
        assert out.dtype == np.uint8 and out.shape == small_image.shape
        assert not np.shares_memory(out, small_image) and np.array_equal(small_image, before)
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


# ------------------------------------------------------------------ draws

STOCHASTIC = [s for s in registry() if s.stochastic]
# Types whose record holds every draw in full: replaying it must give the bytes.
FULLY_RECORDED = ("motion_blur", "color_shift", "non_eccentricity_patch", "color_block",
                  "chromatic_aberration")


def test_every_stochastic_type_samples_apart_from_its_pixel_work():
    assert all(s.sample is not None for s in STOCHASTIC)


@pytest.mark.parametrize("spec", STOCHASTIC, ids=lambda s: s.name)
def test_draws_are_recorded_small_json_and_deterministic(spec, small_image):
    from biqa.distortions import distort_with_draws

    for level in (1, 5):
        out, draws = distort_with_draws(small_image, spec.id, level, rng=3)
        assert draws, "a stochastic type must record what it drew"
        text = json.dumps(draws)
        assert len(text) < 2500, (spec.name, len(text))
        again_out, again = distort_with_draws(small_image, spec.id, level, rng=3)
        assert json.loads(text) == again and np.array_equal(out, again_out)
        assert np.array_equal(out, distort(small_image, spec.id, level, rng=3))
        others = [distort_with_draws(small_image, spec.id, level, rng=s)[1] for s in (4, 5, 6)]
        assert any(o != draws for o in others), "the draws must depend on the seed"


@pytest.mark.parametrize("name", FULLY_RECORDED)
def test_replaying_recorded_draws_gives_the_same_bytes(name):
    from biqa.distortions import DistortionNotApplicable
    from biqa.distortions.api import apply_spec_with_draws, replay_draws

    from PIL import Image
    img = np.asarray(Image.open(sample_reference_paths()[1]).convert("RGB"))
    spec = get(name)
    replayed = 0
    for level in range(1, 6):
        try:
            out, draws = apply_spec_with_draws(spec, img, level, np.random.default_rng(level))
        except DistortionNotApplicable:
            continue
        from_json = json.loads(json.dumps(draws))
        assert np.array_equal(replay_draws(spec, img, level, from_json), out), (name, level)
        replayed += 1
    assert replayed >= 3


def test_motion_and_shift_draws_say_what_was_drawn(small_image):
    from biqa.distortions import distort_with_draws

    _, motion = distort_with_draws(small_image, "motion_blur", 4, rng=11)
    assert set(motion) == {"angle"} and 0 <= motion["angle"] <= 180
    _, shift = distort_with_draws(small_image, "color_shift", 5, rng=11)
    dr, dc = shift["shift"]
    assert dr >= 0 and dc >= 0 and abs(np.hypot(dr, dc) - 12) <= 1
    _, blocks = distort_with_draws(small_image, "color_block", 5, rng=11)
    assert len(blocks["corners"]) == len(blocks["colours"]) == 10
    _, impulse = distort_with_draws(small_image, "impulse_noise", 5, rng=11)
    hits = impulse["pepper"] + impulse["salt"]
    assert abs(hits - 0.03 * small_image.size) < 5 * np.sqrt(0.03 * small_image.size)
    _, noise = distort_with_draws(small_image, "white_noise", 5, rng=11)
    assert noise["noise"]["shape"] == list(small_image.shape)
    assert noise["noise"]["sd"] == pytest.approx(0.1, rel=0.02)


# ------------------------------------------------------------------ random streams

@pytest.mark.parametrize("count, earlier", [(4096, 0), (4097, 0), (4096, 3), (9, 1)])
def test_uniform_words_are_those_of_rng_random(count, earlier):
    from biqa.distortions._random import (float32_threshold_word, uniform_float32_words,
                                          words_to_float32)

    a, b = np.random.default_rng(8), np.random.default_rng(8)
    a.random(earlier, dtype=np.float32)
    b.random(earlier, dtype=np.float32)
    expected = a.random(count, dtype=np.float32)
    words = uniform_float32_words(b, (count,))
    assert np.array_equal(words_to_float32(words.copy()), expected)
    assert np.array_equal(a.random(5), b.random(5)), "the generator must be left alike"
    for t in (0.001, 0.015, 0.5, 1e-9, 0.999999):
        assert np.array_equal(words < float32_threshold_word(t), expected < np.float32(t))


def test_normal_deviates_are_standard_normal_and_deterministic():
    from scipy import stats

    from biqa.distortions._random import normal

    z = normal(np.random.default_rng(2), (1000, 1000)).astype(np.float64).ravel()
    assert abs(z.mean()) < 0.004 and abs(z.std() - 1) < 0.003
    assert stats.kstest(z, "norm").pvalue > 0.01
    tail = np.abs(z) > 4.17  # the outer bins are drawn exactly, not collapsed
    assert 10 < tail.sum() < 60 and np.unique(z[tail]).size == tail.sum()
    assert np.array_equal(normal(np.random.default_rng(2), (7, 3), 0.5),
                          normal(np.random.default_rng(2), (7, 3), 0.5))
