"""SRCC, PLCC (raw and after the 4-parameter logistic), KRCC, RMSE against scipy and
hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from biqa.training import metrics


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    return mos, mos + rng.normal(0, 0.4, 200)


def test_rank_correlations_match_scipy(scores):
    mos, pred = scores
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic)
    assert metrics.srcc([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert metrics.krcc([1, 2, 3], [3, 2, 1]) == -1.0
    assert metrics.srcc([1, 1, 1], [1, 2, 3]) == 0.0  # constant prediction: no correlation


def test_logistic_fit_linearises_a_monotonic_prediction(scores):
    mos, _ = scores
    pred = np.exp(mos)  # monotonic but far from linear
    raw = metrics.plcc(pred, mos, logistic=False)
    fitted = metrics.plcc(pred, mos)
    assert raw < 0.95 < fitted
    assert metrics.rmse(pred, mos) < 0.3 * np.std(mos)  # the mapping lands on the MOS scale


def test_logistic_recovers_a_logistic_and_handles_decreasing(scores):
    mos, _ = scores
    x = np.linspace(-3, 3, 200)
    target = metrics.logistic4(x, 5.0, 1.0, 0.5, 0.7)
    assert metrics.rmse(x, target) < 1e-4
    assert metrics.plcc(-x, target) == pytest.approx(1.0, abs=1e-6)  # decreasing fit works too
    assert metrics.plcc(-x, target, logistic=False) < 0


def test_raw_rmse_and_evaluate(scores):
    mos, pred = scores
    assert metrics.rmse(pred, mos, logistic=False) == pytest.approx(np.sqrt(np.mean((pred - mos) ** 2)))
    result = metrics.evaluate(pred, mos)
    assert set(result) == {"srcc", "plcc", "krcc", "rmse"}
    assert 0.8 < result["srcc"] < 1 and result["rmse"] < 0.5


def test_per_type_srcc_and_errors():
    pred = np.array([1, 2, 3, 4, 3, 2, 1, 9.0])
    mos = np.array([1, 2, 3, 4, 1, 2, 3, 1.0])
    types = ["a"] * 4 + ["b"] * 3 + ["c"]  # c has one image: left out
    assert metrics.per_type_srcc(pred, mos, types) == {"a": 1.0, "b": -1.0}
    with pytest.raises(ValueError, match="differ in length"):
        metrics.srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        metrics.plcc([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        metrics.srcc([1, np.nan, 3], [1, 2, 3])
