"""Full-reference metrics against independent implementations: scikit-image's SSIM,
slow float64 NumPy/SciPy transcriptions of msssim.m, GMSD.m and vifp_mscale.m written
here from the published code, and pytorch_msssim values recorded as constants; plus
identity, monotonicity in the distortion level, undefined cases and the parser."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, signal
from skimage.metrics import structural_similarity

from biqa import fr_metrics
from biqa.data import sample_reference_paths
from biqa.distortions import distort
from biqa.fr_metrics import FR_METRICS, compute_fr_metrics, parse_fr_metrics

# MATLAB rgb2gray weights: the first row of inv([1 .956 .621; 1 -.272 -.647; 1 -1.106 1.703]).
RGB2GRAY = np.linalg.inv(np.array([[1.0, 0.956, 0.621],
                                   [1.0, -0.272, -0.647],
                                   [1.0, -1.106, 1.703]]))[0]

# Our SSIM terms are float32 with second moments about grey 128: the variances carry
# an absolute error of order 1e-3 grey^2 against C2 = 58.5, i.e. <= 2e-5 per pixel in
# the SSIM map and far less in its mean (observed <= 2.8e-6 over 7 references x 12
# types x 3 levels, for SSIM and MS-SSIM alike).
SSIM_TOL = 1e-5
# VIF and GMSD run in float64 like the MATLAB code; only summation order and the
# reference's FFT correlation differ (observed <= 1e-8 and 1e-16).
VIF_TOL = 1e-7
GMSD_TOL = 1e-12


@pytest.fixture(scope="module")
def refs() -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sample_reference_paths()}


# ------------------------------------------------------------- independent references

def luma_reference(rgb: np.ndarray) -> np.ndarray:
    """double(rgb2gray(uint8 rgb)): the weighted sum rounded half away from zero."""
    y = rgb.astype(np.float64) @ RGB2GRAY
    return np.floor(y + 0.5)


def fspecial_gaussian(n: int, sigma: float) -> np.ndarray:
    half = (n - 1) / 2
    xx, yy = np.meshgrid(np.arange(n) - half, np.arange(n) - half)
    h = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def filter2_valid(win: np.ndarray, img: np.ndarray) -> np.ndarray:
    return signal.correlate(img, win, mode="valid", method="fft")


def ssim_terms_reference(x, y):
    """ssim_index_new of msssim.m: (mean SSIM, mean contrast-structure) over 'valid'."""
    win = fspecial_gaussian(11, 1.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filter2_valid(win, x), filter2_valid(win, y)
    s1 = filter2_valid(win, x * x) - mu1 ** 2
    s2 = filter2_valid(win, y * y) - mu2 ** 2
    s12 = filter2_valid(win, x * y) - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    return np.mean((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1) * cs), np.mean(cs)


def ms_ssim_reference(x, y):
    """msssim.m (imfilter 'symmetric' version): product of mcs^w over scales 1-4 and
    mssim^w at scale 5."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    score = 1.0
    for level, w in enumerate(weights):
        mssim, mcs = ssim_terms_reference(x, y)
        score *= (mssim if level == len(weights) - 1 else mcs) ** w
        # imfilter(im, ones(2)/4, 'symmetric', 'same') anchors the 2x2 kernel at its
        # top-left tap: out(i,j) = mean of im(i:i+1, j:j+1), mirrored past the end.
        down = [ndimage.correlate(v, np.full((2, 2), 0.25), mode="reflect", origin=(-1, -1))
                for v in (x, y)]
        x, y = down[0][::2, ::2], down[1][::2, ::2]
    return score


def gmsd_reference(x, y):
    """GMSD.m: conv2(Y, ones(2)/4, 'same') sampled at odd (1-based) positions,
    Prewitt /3 with zero padding, T = 170, std2 (N - 1)."""
    h, w = x.shape
    # conv2 'same' of a 2x2 kernel is full(2:h+1, 2:w+1) in MATLAB's 1-based terms.
    down = [signal.convolve2d(v, np.full((2, 2), 0.25), mode="full")[1:h + 1, 1:w + 1][::2, ::2]
            for v in (x, y)]
    dx = np.array([[1, 0, -1]] * 3) / 3
    grads = [np.hypot(signal.convolve2d(v, dx, mode="same"),
                      signal.convolve2d(v, dx.T, mode="same")) for v in down]
    g1, g2 = grads
    quality = (2 * g1 * g2 + 170) / (g1 ** 2 + g2 ** 2 + 170)
    return np.std(quality, ddof=1)


def vif_reference(ref, dist):
    """vifp_mscale.m line by line, float64."""
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        win = fspecial_gaussian(n, n / 5)
        if scale > 1:
            ref = filter2_valid(win, ref)[::2, ::2]
            dist = filter2_valid(win, dist)[::2, ::2]
        mu1, mu2 = filter2_valid(win, ref), filter2_valid(win, dist)
        s1 = filter2_valid(win, ref * ref) - mu1 ** 2
        s2 = filter2_valid(win, dist * dist) - mu2 ** 2
        s12 = filter2_valid(win, ref * dist) - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        g[s1 < 1e-10] = 0
        sv[s1 < 1e-10] = s2[s1 < 1e-10]
        s1[s1 < 1e-10] = 0
        g[s2 < 1e-10] = 0
        sv[s2 < 1e-10] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g ** 2 * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    return num / den


def test_reference_downsampling_reads_matlab_anchoring():
    """The two MATLAB idioms the references rely on, on a vector: imfilter
    'symmetric' averages (i, i+1) with the last sample mirrored; conv2 'same'
    averages (i, i+1) with zero past the end."""
    a = np.array([[1.0, 2, 4, 8, 16]])
    sym = ndimage.correlate(a, np.full((1, 2), 0.5), mode="reflect", origin=(0, -1))
    assert sym.tolist() == [[1.5, 3, 6, 12, 16]]
    same = signal.convolve2d(a, np.full((1, 2), 0.5), mode="full")[:, 1:6]
    assert same.tolist() == [[1.5, 3, 6, 12, 8]]


# ----------------------------------------------------------------------- validation

CASES = [(ref, kind, level)
         for ref in ("astronaut", "coffee", "rocket")
         for kind in ("gaussian_blur", "white_noise", "jpeg", "contrast_change",
                      "color_saturation_hsv", "impulse_noise", "brighten", "pixelate")
         for level in (2, 5)]


@pytest.fixture(scope="module")
def distorted(refs):
    cache = {}

    def get(ref, kind, level):
        if (ref, kind, level) not in cache:
            cache[ref, kind, level] = distort(refs[ref], kind, level, rng=7)
        return refs[ref], cache[ref, kind, level]
    return get


def test_luma_is_matlab_rgb2gray_for_all_colours():
    """Every 24-bit colour: no weighted sum lies within 1e-9 of a rounding tie (so the
    rounding rule and summation order cannot matter) and the luma is MATLAB's."""
    codes = np.arange(2 ** 24, dtype=np.uint32)
    for chunk in np.split(codes, 16):
        rgb = np.stack([chunk >> 16, (chunk >> 8) & 255, chunk & 255], axis=-1)
        rgb = rgb.astype(np.uint8).reshape(1024, -1, 3)
        exact = rgb.astype(np.float64) @ RGB2GRAY
        assert np.min(np.abs(exact - np.floor(exact) - 0.5)) > 1e-9
        np.testing.assert_array_equal(fr_metrics._luma(rgb), luma_reference(rgb))


@pytest.mark.parametrize("ref,kind,level", CASES)
def test_ssim_matches_scikit_image(distorted, ref, kind, level):
    a, b = distorted(ref, kind, level)
    expected = structural_similarity(luma_reference(a), luma_reference(b), data_range=255,
                                     gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert fr_metrics.ssim(a, b) == pytest.approx(expected, abs=SSIM_TOL)


@pytest.mark.parametrize("ref,kind,level", CASES)
def test_ms_ssim_gmsd_vif_match_matlab_transcriptions(distorted, ref, kind, level):
    a, b = distorted(ref, kind, level)
    x, y = luma_reference(a), luma_reference(b)
    got = compute_fr_metrics(a, b, ("ms_ssim", "gmsd", "vif"))
    assert got["ms_ssim"] == pytest.approx(ms_ssim_reference(x, y), abs=SSIM_TOL)
    assert got["gmsd"] == pytest.approx(gmsd_reference(x, y), abs=GMSD_TOL)
    assert got["vif"] == pytest.approx(vif_reference(x, y), abs=VIF_TOL)


def test_odd_sizes_follow_each_papers_edge_rule(distorted):
    """383x511: MS-SSIM mirrors the odd last row at each halving, GMSD pads zeros."""
    a, b = distorted("astronaut", "white_noise", 3)
    a, b = a[:383, :511].copy(), b[:383, :511].copy()
    x, y = luma_reference(a), luma_reference(b)
    assert fr_metrics.ms_ssim(a, b) == pytest.approx(ms_ssim_reference(x, y), abs=SSIM_TOL)
    assert fr_metrics.gmsd(a, b) == pytest.approx(gmsd_reference(x, y), abs=GMSD_TOL)
    assert fr_metrics.vif(a, b) == pytest.approx(vif_reference(x, y), abs=VIF_TOL)
    assert fr_metrics.ssim(a, b) == pytest.approx(
        structural_similarity(x, y, data_range=255, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False), abs=SSIM_TOL)


# pytorch_msssim 1.0.0 ``ms_ssim(X, Y, data_range=255)`` (defaults: win 11, sigma 1.5,
# K (0.01, 0.03), the paper's weights), float64 tensors of luma_reference() of the
# bundled astronaut and distort(astronaut, kind, level, rng=7); run once in a scratch
# venv, since torch is no dependency of these metrics.  (white_noise re-recorded the same
# way when type 11's random stream changed to biqa's machine-independent normal deviates.)
PYTORCH_MSSSIM = {
    ("gaussian_blur", 4): 0.956957162400619,
    ("white_noise", 4): 0.9378652086821582,
}


@pytest.mark.parametrize("kind,level", sorted(PYTORCH_MSSSIM))
def test_ms_ssim_matches_pytorch_msssim_values(refs, kind, level):
    a = refs["astronaut"]
    b = distort(a, kind, level, rng=7)
    assert fr_metrics.ms_ssim(a, b) == pytest.approx(PYTORCH_MSSSIM[kind, level], abs=SSIM_TOL)


# ----------------------------------------------------------------------- behaviour

def test_identical_images(refs):
    a = refs["coffee"]
    got = compute_fr_metrics(a, a.copy(), "all")
    assert got["psnr"] is None  # inf: undefined, kept out of the JSON
    assert got["ssim"] == 1.0 and got["ms_ssim"] == 1.0 and got["gmsd"] == 0.0
    assert got["vif"] == pytest.approx(1.0, abs=1e-9)
    json.dumps(got, allow_nan=False)


@pytest.mark.parametrize("kind,first", [("white_noise", 1), ("jpeg", 1), ("impulse_noise", 1),
                                        ("gaussian_blur", 2)])
def test_every_metric_worsens_with_level(refs, kind, first):
    """Strictly worse at each level on every bundled reference.  Gaussian blur from
    level 2: level 1 (sigma 0.1) is the KADID stretch alone, which on a low-contrast
    image (chelsea) changes more than the slight level-2 blur does."""
    for name, img in refs.items():
        rows = [compute_fr_metrics(img, distort(img, kind, lvl, rng=3), "all")
                for lvl in range(first, 6)]
        for metric, spec in FR_METRICS.items():
            sign = 1 if spec.higher_is_better else -1
            # PSNR of an unchanged image is None: infinitely good
            vals = [math.inf if r[metric] is None else sign * r[metric] for r in rows]
            assert all(p > q for p, q in zip(vals, vals[1:])), (name, kind, metric, vals)


def test_inverted_image_has_no_ms_ssim_similarity(refs):
    a = refs["astronaut"]
    b = 255 - a
    assert fr_metrics.ssim(a, b) < 0  # anti-correlated structure
    assert fr_metrics.ms_ssim(a, b) == 0.0  # negative contrast-structure counts as none


def test_small_images_get_none_where_windows_do_not_fit(refs):
    a = refs["rocket"]
    b = distort(a, "white_noise", 3, rng=0)
    got = compute_fr_metrics(a[:176, :200], b[:176, :200], "all")
    assert all(v is not None for v in got.values())
    got = compute_fr_metrics(a[:175, :200], b[:175, :200], "all")
    assert got["ms_ssim"] is None and got["ssim"] is not None and got["vif"] is not None
    assert fr_metrics.vif(a[:41, :60], b[:41, :60]) is not None  # 4 scales just fit
    assert fr_metrics.vif(a[:40, :60], b[:40, :60]) is None
    got = compute_fr_metrics(a[:10, :40], b[:10, :40], "all")
    assert got["ssim"] is None and got["ms_ssim"] is None and got["vif"] is None
    assert got["psnr"] is not None and got["gmsd"] is not None


def test_compute_shares_work_without_changing_results(distorted):
    a, b = distorted("coffee", "jpeg", 5)
    together = compute_fr_metrics(a, b, parse_fr_metrics("all"))
    assert together == {name: FR_METRICS[name](a, b) for name in FR_METRICS}
    assert compute_fr_metrics(a, b, "ms_ssim,psnr") == {"ms_ssim": together["ms_ssim"],
                                                        "psnr": together["psnr"]}


def test_psnr_is_the_generators_psnr(distorted):
    from biqa.distortions._matlab import psnr as matlab_psnr
    a, b = distorted("rocket", "impulse_noise", 4)
    assert fr_metrics.psnr(a, b) == matlab_psnr(a, b)


def test_directions_are_declared():
    assert {n: m.higher_is_better for n, m in FR_METRICS.items()} == {
        "psnr": True, "ssim": True, "ms_ssim": True, "gmsd": False, "vif": True}


def test_parse_fr_metrics():
    assert parse_fr_metrics("psnr,ssim,ms_ssim") == ("psnr", "ssim", "ms_ssim")
    assert parse_fr_metrics(" SSIM, ms-ssim ,ssim") == ("ssim", "ms_ssim")
    assert parse_fr_metrics("vif,all") == ("vif", "psnr", "ssim", "ms_ssim", "gmsd")
    with pytest.raises(ValueError, match=r"'fsim'.*psnr, ssim, ms_ssim, gmsd, vif"):
        parse_fr_metrics("ssim,fsim")
    with pytest.raises(ValueError, match="no full-reference metric"):
        parse_fr_metrics(" , ")
    with pytest.raises(ValueError, match="unknown"):
        compute_fr_metrics(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8),
                           ["psnr", "lpips"])


@pytest.mark.parametrize("ref,dist,message", [
    (np.zeros((20, 20, 3), np.uint8), np.zeros((20, 21, 3), np.uint8), "differ in size"),
    (np.zeros((20, 20, 3), np.float32), np.zeros((20, 20, 3), np.uint8), "uint8"),
    (np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8), "H\\*W\\*3"),
    (np.zeros((0, 20, 3), np.uint8), np.zeros((0, 20, 3), np.uint8), "non-empty"),
    ([[0]], np.zeros((1, 1, 3), np.uint8), "uint8"),
])
def test_bad_input_is_refused_clearly(ref, dist, message):
    with pytest.raises(ValueError, match=message):
        compute_fr_metrics(ref, dist, "ssim")
    with pytest.raises(ValueError, match=message):
        fr_metrics.psnr(ref, dist)
