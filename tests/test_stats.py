"""Agreement statistics against published and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from xbmd.evaluation.stats import (
    agreement,
    confusion_matrix,
    diagnostic,
    icc_a1,
    icc_c1,
    pearson,
    reproducibility,
    roc_auc,
)

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float
)


def test_icc_matches_shrout_and_fleiss():
    assert icc_a1(SHROUT_FLEISS) == pytest.approx(0.29, abs=0.005)  # ICC(2,1)
    assert icc_c1(SHROUT_FLEISS) == pytest.approx(0.71, abs=0.005)  # ICC(3,1)


def test_icc_penalises_bias_and_pearson_does_not():
    x = np.linspace(0.5, 1.2, 30)
    assert icc_a1(np.stack([x, x], 1)) == pytest.approx(1.0)
    biased = agreement(x + 0.2, x)
    assert biased["pearson_r"] == pytest.approx(1.0)
    assert biased["icc_a1"] < 0.8
    assert biased["bias"] == pytest.approx(0.2) and biased["mae"] == pytest.approx(0.2)


def test_pearson_ci_contains_r():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    res = pearson(x, x + rng.normal(scale=0.5, size=50))
    assert res["ci95"][0] < res["r"] < res["ci95"][1]


def test_reproducibility_by_hand():
    values = [1.0, 1.1, 2.0, 2.0, 5.0]
    groups = ["a", "a", "b", "b", "c"]  # c has one value: left out
    out = reproducibility(values, groups)
    sd_a = np.std([1.0, 1.1], ddof=1)
    assert out["groups"] == 2
    assert out["rms_sd"] == pytest.approx(np.sqrt((sd_a**2 + 0) / 2))
    assert out["rms_cv_pct"] == pytest.approx(100 * np.sqrt(((sd_a / 1.05) ** 2) / 2))
    assert out["lsc"] == pytest.approx(2.77 * out["rms_sd"])


def test_roc_auc_matches_hanley_and_mcneil():
    # Hanley & McNeil (1982), Table 1: CT images rated 1 (definitely normal) .. 5 (definitely
    # abnormal); 58 normal and 51 abnormal patients; published area 0.893.
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    ratings = np.concatenate(
        [np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    )
    truth = np.r_[np.zeros(58, bool), np.ones(51, bool)]
    assert roc_auc(ratings, truth) == pytest.approx(0.893, abs=0.0005)
    assert roc_auc(-ratings, truth) == pytest.approx(1 - 0.8932, abs=0.0005)
    assert np.isnan(roc_auc([1.0, 2.0], [True, True]))


def test_bland_altman_limits_by_hand():
    reference = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    estimate = reference + np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # differences: mean 3, SD 1.58114
    out = agreement(estimate, reference)
    assert out["bias"] == pytest.approx(3.0)
    assert out["limits_of_agreement"] == pytest.approx(
        [3 - 1.96 * 1.58114, 3 + 1.96 * 1.58114], abs=1e-5
    )
    assert out["rmse"] == pytest.approx(np.sqrt(11.0))


def test_diagnostic_counts_and_rates():
    ref_t = [-3.0, -2.6, -2.5, -2.0, -1.0, 0.5]
    est_t = [-2.8, -2.0, -2.6, -2.7, -0.5, 0.0]
    out = diagnostic(est_t, ref_t, threshold=-2.5, inclusive=True)
    # truth: first three (T <= -2.5, -2.5 itself included); test: -2.8, -2.6, -2.7
    assert out["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(2 / 3)
    assert out["n_positive"] == 3
    # ranking: positives' estimated T (-2.8, -2.0, -2.6) vs negatives' (-2.7, -0.5, 0.0):
    # every (positive, negative) pair in which the positive has the lower estimated T
    pairs = [(p, n) for p in (-2.8, -2.0, -2.6) for n in (-2.7, -0.5, 0.0)]
    assert out["auc"] == pytest.approx(sum(p < n for p, n in pairs) / 9)
    strict = diagnostic(est_t, ref_t, threshold=-2.5, inclusive=False)
    assert strict["n_positive"] == 2


def test_confusion_matrix_rows_are_reference():
    labels = ("normal", "osteopenia", "osteoporosis")
    m = confusion_matrix(
        ["normal", "osteoporosis", "osteoporosis"], ["normal", "osteopenia", "osteoporosis"], labels
    )
    assert m == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
