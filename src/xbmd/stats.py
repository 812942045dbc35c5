"""Agreement statistics: Pearson r with its CI, ICC, MAE, and multi-pose reproducibility.

Pearson r and its confidence interval come from scipy. The ICC is the two-way random-effects,
absolute-agreement, single-measurement form ICC(2,1) of Shrout & Fleiss (1979), i.e. ICC(A,1) of
McGraw & Wong (1996), computed from the two-way ANOVA mean squares (a few lines; scipy has no
ICC and pingouin would pull pandas, statsmodels and seaborn for this one formula). It is tested
against Shrout & Fleiss's published example.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def pearson(x, y) -> dict:
    """Pearson r, its 95 % confidence interval and p-value."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    res = stats.pearsonr(x, y)
    ci = res.confidence_interval(0.95)
    return {
        "r": float(res.statistic),
        "ci95": [float(ci.low), float(ci.high)],
        "p": float(res.pvalue),
    }


def _mean_squares(ratings) -> tuple[int, int, float, float, float]:
    """(n, k, MS rows, MS columns, MS error) of the two-way ANOVA of (n subjects, k raters)."""
    y = np.asarray(ratings, dtype=float)
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    return n, k, ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))


def icc_a1(ratings) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single rater.

    ``ratings`` is (n subjects, k raters), e.g. column 0 the estimate and column 1 the reference.
    """
    n, k, msr, msc, mse = _mean_squares(ratings)
    return float((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))


def icc_c1(ratings) -> float:
    """ICC(3,1): two-way mixed effects, consistency, single rater (ignores a constant bias)."""
    _, k, msr, _, mse = _mean_squares(ratings)
    return float((msr - mse) / (msr + (k - 1) * mse))


def agreement(estimate, reference) -> dict:
    """Pearson r (95 % CI), ICC(2,1), MAE, RMSE, bias and Bland-Altman limits of estimate vs ref."""
    e, r = np.asarray(estimate, float), np.asarray(reference, float)
    ok = np.isfinite(e) & np.isfinite(r)
    e, r = e[ok], r[ok]
    diff = e - r
    sd = float(diff.std(ddof=1)) if diff.size > 1 else math.nan
    return {
        "n": int(e.size),
        **{f"pearson_{k}": v for k, v in pearson(e, r).items()},
        "icc_a1": icc_a1(np.stack([e, r], axis=1)),
        "mae": float(np.abs(diff).mean()),
        "mae_pct": float(100 * np.abs(diff / r).mean()),
        "rmse": float(np.sqrt((diff**2).mean())),
        "bias": float(diff.mean()),
        "limits_of_agreement": [float(diff.mean() - 1.96 * sd), float(diff.mean() + 1.96 * sd)],
    }


def reproducibility(values, groups) -> dict:
    """Precision over repeated estimates of the same subject (e.g. one hip in several poses).

    Returns the root-mean-square CV (%) and SD over the groups with >= 2 values, the least
    significant change 2.77 x RMS-SD, and the number of groups.
    """
    values = np.asarray(values, float)
    groups = np.asarray(groups)
    cvs, sds = [], []
    for g in np.unique(groups):
        v = values[(groups == g) & np.isfinite(values)]
        if v.size >= 2:
            sd = v.std(ddof=1)
            sds.append(sd)
            cvs.append(sd / v.mean())
    if not sds:
        return {"groups": 0, "rms_cv_pct": math.nan, "rms_sd": math.nan, "lsc": math.nan}
    rms_sd = float(np.sqrt(np.mean(np.square(sds))))
    return {
        "groups": len(sds),
        "rms_cv_pct": float(100 * np.sqrt(np.mean(np.square(cvs)))),
        "rms_sd": rms_sd,
        "lsc": 2.77 * rms_sd,
    }
