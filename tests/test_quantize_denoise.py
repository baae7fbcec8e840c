"""Types 6 (colour quantisation), 22 (multi-level Otsu quantisation) and 15 (denoise)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree
from scipy.stats import norm

from biqa.data import sample_reference_paths
from biqa.distortions import distort
from biqa.distortions import denoise as dn
from biqa.distortions.noise import sample_gaussian, white_noise
from biqa.distortions import quantize as q
from biqa.distortions._matlab import im2uint8, imgaussfilt, mapmm, psnr
from biqa.distortions.registry import get

TYPES = (6, 15, 22)


@pytest.fixture(scope="module")
def samples() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sample_reference_paths()]


def stretched(img: np.ndarray) -> np.ndarray:
    """The float image the KADID types receive (what ``apply_spec`` passes)."""
    return mapmm(img.astype(np.float64)).astype(np.float32)


def mean_psnr_per_level(images, type_id, seeds=(0,)) -> np.ndarray:
    return np.array([np.mean([psnr(distort(im, type_id, lvl, s), im)
                              for im in images for s in seeds]) for lvl in range(1, 6)])


# ------------------------------------------------------------------ all three

@pytest.mark.parametrize("type_id", TYPES)
def test_contract_and_determinism(samples, type_id):
    img = samples[0]
    out = distort(img, type_id, 3, 7)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out, distort(img, type_id, 3, np.random.default_rng(7)))
    spec = get(type_id)
    raw = np.asarray(spec.apply(stretched(img), spec.params[2], np.random.default_rng(7)))
    assert raw.shape == img.shape and np.isfinite(raw).all()
    other_seed = distort(img, type_id, 3, 8)
    assert np.array_equal(out, other_seed) == (not spec.stochastic)


@pytest.mark.parametrize("type_id", TYPES)
def test_psnr_falls_with_level_on_sample_refs(samples, type_id):
    p = mean_psnr_per_level(samples, type_id)
    assert np.all(np.diff(p) < 0), p


@pytest.mark.parametrize("type_id", TYPES)
def test_psnr_falls_with_level_on_shared_refs(reference, type_id):
    images = [reference.image(r) for r in ("ref01", "ref07")]
    seeds = (0, 1) if get(type_id).stochastic else (0,)
    for img in images:
        p = mean_psnr_per_level([img], type_id, seeds)
        assert np.all(np.diff(p) < 0), p
        out = distort(img, type_id, 5, 0)
        assert out.shape == img.shape and out.dtype == np.uint8


# ------------------------------------------------------------------- type 6

def nearest_index(rgb8: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return cKDTree(palette).query(rgb8.reshape(-1, 3).astype(np.float64))[1].reshape(
        rgb8.shape[:2])


def count_colours(rgb8: np.ndarray) -> int:
    packed = rgb8.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    return len(np.unique(packed))


def test_color_quantization_uses_at_most_n_colours(samples):
    for img in samples[:2]:
        for lvl, n in enumerate(get(6).params, start=1):
            out = distort(img, 6, lvl)
            assert count_colours(out) <= n
            assert len(q.min_variance_palette(im2uint8(stretched(img)), n)) == n


def test_palette_has_lower_error_than_median_cut(samples):
    """The min-variance map must beat Pillow's median cut in nearest-colour error."""
    for img in samples[:2]:
        rgb8 = im2uint8(stretched(img))
        for n in (64, 8):
            ours = q.min_variance_palette(rgb8, n)
            mc = Image.fromarray(rgb8).quantize(n, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
            theirs = np.asarray(mc.getpalette()[:3 * n], float).reshape(-1, 3)
            err = [np.mean((p[nearest_index(rgb8, p)] - rgb8) ** 2) for p in (ours, theirs)]
            assert err[0] < err[1], (n, err)


def test_dithering_reproduces_a_smooth_ramp():
    """Error diffusion keeps the local mean: on a colour ramp inside the palette's
    gamut the blurred result is far closer to the input than nearest-colour
    mapping (banding), at the price of more pixel-wise error."""
    y, x = np.mgrid[0:96, 0:128]
    ramp = np.stack([40 + 175 * x / 127, 40 + 175 * y / 95, np.full(x.shape, 128.0)], -1)
    rgb8 = np.floor(ramp + 0.5).astype(np.uint8)
    palette = q.min_variance_palette(rgb8, 16)
    index = q.dither_to_palette(rgb8, palette)
    assert index.shape == rgb8.shape[:2] and index.max() < len(palette)
    dithered = palette[index]
    nearest = palette[nearest_index(rgb8, palette)]
    ref = rgb8.astype(np.float64)
    inner = (slice(8, -8), slice(8, -8))
    low_pass_err = [np.mean((imgaussfilt(v, 3.0) - imgaussfilt(ref, 3.0))[inner] ** 2)
                    for v in (dithered, nearest)]
    assert low_pass_err[0] < 0.25 * low_pass_err[1], low_pass_err
    assert np.mean((dithered - ref) ** 2) > np.mean((nearest - ref) ** 2)


def test_dithering_keeps_local_mean_on_photos(samples):
    for img in samples[:2]:
        rgb8 = im2uint8(stretched(img))
        palette = q.min_variance_palette(rgb8, 32)
        ref = imgaussfilt(rgb8.astype(np.float64), 2.0)
        errs = [np.mean((imgaussfilt(v, 2.0) - ref) ** 2)
                for v in (palette[q.dither_to_palette(rgb8, palette)],
                          palette[nearest_index(rgb8, palette)])]
        assert errs[0] < errs[1], errs


def test_few_colour_image_is_reproduced_exactly():
    colours = np.array([[255, 0, 0], [0, 128, 255], [20, 200, 40]], np.uint8)
    img = colours[np.random.default_rng(0).integers(0, 3, (80, 96))]
    palette = q.min_variance_palette(img, 64)
    assert len(palette) == 3
    out = q.color_quantization(img.astype(np.float32) / 255, 64, None)
    assert np.array_equal(im2uint8(out), img)


# ------------------------------------------------------------------ type 22

def between_class_score(counts: np.ndarray, thresholds) -> float:
    bins = np.arange(len(counts))
    edges = [-1, *thresholds, len(counts) - 1]
    score = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        w = counts[a + 1:b + 1].sum()
        s = (counts[a + 1:b + 1] * bins[a + 1:b + 1]).sum()
        score += s * s / w if w > 0 else 0.0
    return score


def brute_force_otsu(counts: np.ndarray, n: int) -> tuple[int, ...]:
    return max(itertools.combinations(range(len(counts) - 1), n),
               key=lambda t: between_class_score(counts, t))


def test_otsu_dp_equals_exhaustive_search():
    rng = np.random.default_rng(2024)
    for _ in range(40):
        size = int(rng.integers(5, 14))
        n = int(rng.integers(1, min(5, size - 1) + 1))
        counts = rng.integers(1, 1000, size).astype(float)
        assert np.array_equal(q.otsu_thresholds(counts, n), brute_force_otsu(counts, n))


def test_otsu_dp_with_empty_bins_is_optimal_and_centred_in_gaps():
    rng = np.random.default_rng(7)
    for _ in range(40):
        size = int(rng.integers(8, 16))
        counts = rng.integers(1, 1000, size).astype(float)
        counts[rng.random(size) < 0.4] = 0
        occupied = np.flatnonzero(counts)
        n = int(rng.integers(1, min(4, occupied.size - 1) + 1))
        dp = q.otsu_thresholds(counts, n)
        best = brute_force_otsu(counts, n)
        lower_cut = np.floor(dp).astype(int)
        assert between_class_score(counts, lower_cut) == pytest.approx(
            between_class_score(counts, best), rel=1e-12)
        for t in dp:  # midway between the occupied bins on either side
            below = occupied[occupied <= t].max()
            above = occupied[occupied > t].min()
            assert t == (below + above - 1) / 2


def test_fewer_levels_than_thresholds_gives_one_class_per_level():
    counts = np.zeros(256)
    counts[[10, 100, 200]] = [5, 7, 9]
    assert np.array_equal(q.otsu_thresholds(counts, 20), [(10 + 99) / 2, (100 + 199) / 2])


def test_quantization_mapping_on_constructed_image():
    """Three separated clusters and N=2: thresholds in the middle of the gaps,
    clusters mapped to 0, the upper threshold, and 1."""
    rng = np.random.default_rng(0)
    bins = np.concatenate([rng.integers(18, 23, 3000), rng.integers(118, 123, 3000),
                           rng.integers(228, 233, 3000), [0, 255]])
    img = np.repeat((bins / 255.0).reshape(-1, 1, 1), 3, axis=2).reshape(9002, 1, 3)
    img = np.tile(img, (1, 2, 1)).astype(np.float32)
    t = q.multithresh(img, 2)
    np.testing.assert_allclose(t * 255, [(22 + 117) / 2, (122 + 227) / 2])
    out = q.quantization(img, 2, None)
    b = np.tile(np.repeat(bins[:, None, None], 3, axis=2), (1, 2, 1))
    assert np.all(out[b <= 22] == 0)
    assert np.allclose(out[(b >= 118) & (b <= 122)], t[1])
    assert np.all(out[b >= 228] == 1)


def test_imquantize_ties_go_to_the_lower_class():
    t = np.array([0.25, 0.5, 0.75])
    x = np.array([0.0, 0.25, 0.2501, 0.5, 0.6, 0.75, np.float32(0.75), 0.8, 1.0])
    np.testing.assert_array_equal(q.imquantize_upper(x, t),
                                  [0, 0, 0.5, 0.5, 0.75, 0.75, 0.75, 1, 1])


def test_quantization_thresholds_count_and_levels(samples):
    img = stretched(samples[0])
    for n in get(22).params:
        t = q.multithresh(img, n)
        assert len(t) == n and np.all(np.diff(t) > 0) and 0 < t[0] and t[-1] < 1
        out = q.quantization(img, n, None)
        assert set(np.unique(out)) <= {0.0, 1.0, *t[1:]}
    flat = np.full((64, 64, 3), 0.5, np.float32)
    assert np.array_equal(q.quantization(flat, 7, None), flat)


# ------------------------------------------------------------------ type 15

def test_white_noise_statistics_match_imnoise():
    grey = np.full((256, 256, 3), 0.5, np.float32)
    for var in (0.01, 0.15):
        noisy = white_noise(grey, var, **sample_gaussian(grey, var, np.random.default_rng(1)))
        clipped = np.mean((noisy == 0) | (noisy == 1))
        expected = 2 * norm.sf(0.5 / np.sqrt(var))
        assert clipped == pytest.approx(expected, abs=0.005)
        inside = noisy[(noisy > 0) & (noisy < 1)] - 0.5
        assert abs(inside.mean()) < 0.003
    noisy = white_noise(grey, 0.01, **sample_gaussian(grey, 0.01, np.random.default_rng(1)))
    assert np.std(noisy - 0.5) == pytest.approx(0.1, rel=0.01)


def test_denoiser_removes_most_of_the_noise(samples):
    for var in get(15).params:
        gains = []
        for i, img in enumerate(samples[:3]):
            clean = stretched(img)
            rng = np.random.default_rng(i)
            noisy = white_noise(clean, var, **sample_gaussian(clean, var, rng))
            out = dn.nlm_denoise(im2uint8(noisy), 255 * np.sqrt(var))
            gains.append(psnr(out, im2uint8(clean)) - psnr(im2uint8(noisy), im2uint8(clean)))
        assert np.mean(gains) > 5.0, (var, gains)
