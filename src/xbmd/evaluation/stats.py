"""Agreement, diagnostic and reproducibility statistics of BMD estimates against references.

Pearson r and its confidence interval come from scipy. The ICC is the two-way random-effects,
absolute-agreement, single-measurement form ICC(2,1) of Shrout & Fleiss (1979), i.e. ICC(A,1) of
McGraw & Wong (1996), computed from the two-way ANOVA mean squares (a few lines; scipy has no
ICC and pingouin would pull pandas, statsmodels and seaborn for this one formula). It is tested
against Shrout & Fleiss's published example. Bland-Altman bias and 95 % limits of agreement are
the mean difference +/- 1.96 SD of the differences (Bland & Altman 1986). ROC AUC is the
Mann-Whitney U statistic (scipy) divided by n_pos x n_neg, tested against Hanley & McNeil's
(1982) rating example (0.893).
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


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for ``positive``.

    The probability that a random positive scores above a random negative, ties counting half
    (Mann-Whitney U / (n_pos n_neg)). NaN when either class is empty.
    """
    s = np.asarray(scores, float)
    y = np.asarray(positive, bool)
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u / (pos.size * neg.size))


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def diagnostic(estimated_t, reference_t, threshold: float, inclusive: bool) -> dict:
    """Detection of ``T <= threshold`` (``inclusive``) or ``T < threshold`` from estimated T-scores.

    The truth is the reference's T-score; the test is the estimate's T-score against the same
    threshold; the AUC ranks by the estimated T-score (lower = more likely positive). Returns n,
    n_positive, auc, sensitivity, specificity and the confusion counts tp/fp/tn/fn.
    """
    e, r = np.asarray(estimated_t, float), np.asarray(reference_t, float)
    ok = np.isfinite(e) & np.isfinite(r)
    e, r = e[ok], r[ok]
    truth = r <= threshold if inclusive else r < threshold
    test = e <= threshold if inclusive else e < threshold
    tp, fn = int((test & truth).sum()), int((~test & truth).sum())
    fp, tn = int((test & ~truth).sum()), int((~test & ~truth).sum())
    return {
        "n": int(e.size),
        "n_positive": int(truth.sum()),
        "auc": roc_auc(-e, truth),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def confusion_matrix(reference_labels, estimated_labels, labels) -> list[list[int]]:
    """Counts with rows = reference label, columns = estimated label, in the order ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for ref, est in zip(reference_labels, estimated_labels, strict=True):
        if ref in index and est in index:
            matrix[index[ref], index[est]] += 1
    return matrix.tolist()
