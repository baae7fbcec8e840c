"""Agreement between predicted and subjective scores: SRCC, PLCC, KRCC, RMSE.

PLCC and RMSE are reported, by default, after the standard monotonic
4-parameter logistic mapping of the predictions onto the subjective scale
(VQEG), because a network's raw output has no reason to be linear in MOS.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, stats


def _pair(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    """Validate two equal-length finite 1-D score vectors (at least 3, so that
    correlations are defined)."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    m = np.asarray(mos, dtype=np.float64).ravel()
    if p.shape != m.shape:
        raise ValueError(f"predictions ({p.size}) and scores ({m.size}) differ in length")
    if p.size < 3:
        raise ValueError(f"need at least 3 scores to correlate, got {p.size}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise ValueError("predictions and scores must be finite")
    return p, m


def srcc(pred, mos) -> float:
    """Spearman rank-order correlation (0 when either side is constant)."""
    p, m = _pair(pred, mos)
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        return 0.0
    return float(stats.spearmanr(p, m).statistic)


def krcc(pred, mos) -> float:
    """Kendall rank-order correlation (tau-b; 0 when either side is constant)."""
    p, m = _pair(pred, mos)
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        return 0.0
    return float(stats.kendalltau(p, m).statistic)


def logistic4(x, b1, b2, b3, b4):
    """The 4-parameter logistic of VQEG: b2 + (b1 - b2) / (1 + exp(-(x - b3)/|b4|))."""
    z = np.clip(-(x - b3) / (abs(b4) + 1e-12), -60.0, 60.0)
    return b2 + (b1 - b2) / (1.0 + np.exp(z))


def logistic_map(pred, mos) -> np.ndarray:
    """Predictions mapped onto the subjective scale by the fitted logistic.

    Started from the usual guesses (range of MOS, centre and spread of the
    predictions); if the fit does not converge the predictions are mapped by
    least-squares line instead, which keeps PLCC defined and never better than
    the logistic would be.
    """
    p, m = _pair(pred, mos)
    spread = np.std(p) or 1.0
    increasing = np.ptp(p) == 0 or np.ptp(m) == 0 or np.corrcoef(p, m)[0, 1] >= 0
    low, high = (m.min(), m.max()) if increasing else (m.max(), m.min())
    start = (high, low, np.mean(p), spread)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, p, m, p0=start, maxfev=20000)
        fitted = logistic4(p, *params)
        if np.isfinite(fitted).all():
            return fitted
    except (RuntimeError, optimize.OptimizeWarning):
        pass
    slope, intercept = np.polyfit(p, m, 1) if np.ptp(p) > 0 else (0.0, m.mean())
    return slope * p + intercept


def plcc(pred, mos, logistic: bool = True) -> float:
    """Pearson linear correlation, after the logistic mapping unless ``logistic=False``."""
    p, m = _pair(pred, mos)
    if logistic:
        p = logistic_map(p, m)
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        return 0.0
    return float(np.corrcoef(p, m)[0, 1])


def rmse(pred, mos, logistic: bool = True) -> float:
    """Root-mean-square error on the subjective scale (after the logistic mapping
    unless ``logistic=False``, when ``pred`` must already be on that scale)."""
    p, m = _pair(pred, mos)
    if logistic:
        p = logistic_map(p, m)
    return float(np.sqrt(np.mean((p - m) ** 2)))


def evaluate(pred, mos, logistic: bool = True) -> dict[str, float]:
    """All four criteria at once, as written into results.json."""
    return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos, logistic),
            "krcc": krcc(pred, mos), "rmse": rmse(pred, mos, logistic)}


def per_type_srcc(pred, mos, types) -> dict[str, float]:
    """SRCC within each distortion type (types with fewer than 3 images are left out,
    their correlation being undefined)."""
    p, m = _pair(pred, mos)
    t = np.asarray(types, dtype=object).ravel()
    if t.shape != p.shape:
        raise ValueError(f"types ({t.size}) and scores ({p.size}) differ in length")
    out = {}
    for name in sorted(set(t.tolist()), key=str):
        sel = t == name
        if sel.sum() >= 3:
            out[str(name)] = srcc(p[sel], m[sel])
    return out
