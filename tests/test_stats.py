"""Agreement statistics against published and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from xbmd.stats import agreement, icc_a1, icc_c1, pearson, reproducibility

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
