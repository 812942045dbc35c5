"""Method-comparison lines: Deming and Passing-Bablok regression of one method on another.

Used to calibrate xbmd's estimate to a site's DXA (``xbmd evaluate`` writes the line as a site
calibration, ``xbmd.estimation.site`` applies it). Both treat both methods as measured with
error, unlike least squares, whose slope is pulled towards 0 by the error in x.

- **Deming** (Deming 1943; Cornbleet & Gochman, Clin Chem 1979;25:432-438; Linnet, Stat Med
  1990;9:1463-1473): the maximum-likelihood line when both errors are normal with a known ratio
  of variances ``delta = var(error of y) / var(error of x)`` (1: orthogonal regression). Closed
  form from the second moments; 95 % intervals from the jackknife (Linnet 1990: leave-one-out
  pseudo-values, t with n - 2 degrees of freedom), as mcr and MedCalc report them.
- **Passing-Bablok** (Passing & Bablok, J Clin Chem Clin Biochem 1983;21:709-720): the shifted
  median of all pairwise slopes, no distributional assumption, robust to outliers; the
  intercept is the median of ``y - b x``; the slope's interval from the ranks of the pairwise
  slopes, the intercept's from the slope's ends.

Hand-written (a few lines each): scipy has neither; the R packages (mcr, deming) are not
Python, and the Python ports (methcomp) pull pandas and plotting for two formulas. Tested
against published worked examples (tests/test_method_comparison.py) and against ODRPACK
(``scipy.odr``) for Deming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

METHODS = ("passing-bablok", "deming")


@dataclass(frozen=True)
class LineFit:
    """``y = intercept + slope x`` with 95 % (or 1 - alpha) intervals; NaN where undefined."""

    method: str
    slope: float
    intercept: float
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    n: int
    alpha: float = 0.05
    delta: float | None = None  # Deming only: var(y error) / var(x error)

    def __call__(self, x):
        return self.intercept + self.slope * np.asarray(x, dtype=float)

    def to_dict(self) -> dict:
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        out = {
            "method": self.method,
            "slope": num(self.slope),
            "intercept": num(self.intercept),
            "slope_ci": [num(v) for v in self.slope_ci],
            "intercept_ci": [num(v) for v in self.intercept_ci],
            "confidence": 1.0 - self.alpha,
            "n": self.n,
        }
        if self.delta is not None:
            out["delta"] = self.delta
        return out


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Finite pairs only."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} and {y.size})")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _deming_slope(x: np.ndarray, y: np.ndarray, delta: float) -> float:
    sxx, syy = np.var(x, ddof=1), np.var(y, ddof=1)
    sxy = np.cov(x, y, ddof=1)[0, 1]
    if sxy == 0:
        return math.nan
    d = syy - delta * sxx
    return float((d + math.copysign(math.sqrt(d * d + 4 * delta * sxy * sxy), sxy)) / (2 * sxy))


def deming(x, y, delta: float = 1.0, alpha: float = 0.05) -> LineFit:
    """Deming regression of y on x with error-variance ratio ``delta`` (var y err / var x err).

    Examples
    --------
    >>> fit = deming([1, 2, 3, 4], [2.1, 3.9, 6.2, 7.8])
    >>> round(fit.slope, 4), round(fit.intercept, 4)
    (1.9467, 0.1333)
    """
    x, y = _pairs(x, y)
    n = x.size
    if n < 3:
        raise ValueError(f"Deming regression needs at least 3 pairs, not {n}")
    if not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a positive error-variance ratio, not {delta}")
    slope = _deming_slope(x, y, delta)
    intercept = float(y.mean() - slope * x.mean())
    nan2 = (math.nan, math.nan)
    if n < 4 or not math.isfinite(slope):
        return LineFit("deming", slope, intercept, nan2, nan2, n, alpha, delta)
    # jackknife (Linnet 1990): leave-one-out estimates -> pseudo-values -> t interval
    keep = ~np.eye(n, dtype=bool)
    loo = np.array([_deming_slope(x[k], y[k], delta) for k in keep])
    loo_a = np.array([y[k].mean() - b * x[k].mean() for k, b in zip(keep, loo, strict=True)])
    t = stats.t.ppf(1 - alpha / 2, n - 2)

    def interval(full: float, leave_one_out: np.ndarray) -> tuple[float, float]:
        pseudo = n * full - (n - 1) * leave_one_out
        se = float(np.std(pseudo, ddof=1) / math.sqrt(n))
        centre = float(pseudo.mean())
        return (float(centre - t * se), float(centre + t * se))

    return LineFit(
        "deming",
        slope,
        intercept,
        interval(slope, loo),
        interval(intercept, loo_a),
        n,
        alpha,
        delta,
    )


def passing_bablok(x, y, alpha: float = 0.05) -> LineFit:
    """Passing-Bablok regression of y on x (the 1983 procedure).

    Pairs with equal x and y are left out; equal x with different y gives an infinite slope of
    the sign of the y difference; slopes of exactly -1 are left out; the slope is the median of
    the rest shifted by K, the number of slopes below -1; the interval is from the normal
    approximation of Kendall's tau (ranks M1 + K and M2 + K).

    Examples
    --------
    >>> fit = passing_bablok([1, 2, 3, 4, 10, 12, 18], [9, 15, 19, 20, 45, 55, 78], alpha=0.07)
    >>> fit.slope, fit.intercept, [round(v, 4) for v in fit.slope_ci]
    (4.0, 6.0, [3.7143, 4.375])
    """
    x, y = _pairs(x, y)
    n = x.size
    if n < 3:
        raise ValueError(f"Passing-Bablok regression needs at least 3 pairs, not {n}")
    i, j = np.triu_indices(n, k=1)
    dx, dy = x[j] - x[i], y[j] - y[i]
    keep = (dx != 0) | (dy != 0)
    dx, dy = dx[keep], dy[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(dx != 0, dy / np.where(dx != 0, dx, 1.0), np.sign(dy) * np.inf)
    s = np.sort(s[s != -1])
    big_n = s.size
    if big_n == 0:
        raise ValueError("Passing-Bablok regression: all pairs are identical")
    k = int(np.sum(s < -1))
    if big_n // 2 + k + 1 > big_n:  # most slopes below -1: the shifted median leaves the list
        raise ValueError(
            "Passing-Bablok regression needs a positive relation between the two methods "
            f"({k} of {big_n} pairwise slopes are below -1)"
        )
    if big_n % 2:
        slope = float(s[(big_n + 1) // 2 + k - 1])
    else:
        slope = float((s[big_n // 2 + k - 1] + s[big_n // 2 + k]) / 2)
    intercept = float(np.median(y - slope * x))
    c = stats.norm.ppf(1 - alpha / 2) * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    m1 = math.floor((big_n - c) / 2 + 0.5)  # round half up, as the paper's tables
    m2 = big_n - m1 + 1
    lo = float(s[m1 + k - 1]) if 1 <= m1 + k <= big_n else math.nan
    hi = float(s[m2 + k - 1]) if 1 <= m2 + k <= big_n else math.nan
    ci_a = (
        float(np.median(y - hi * x)) if math.isfinite(hi) else math.nan,
        float(np.median(y - lo * x)) if math.isfinite(lo) else math.nan,
    )
    return LineFit("passing-bablok", slope, intercept, (lo, hi), ci_a, n, alpha)


def fit_line(x, y, method: str = "passing-bablok", delta: float = 1.0) -> LineFit:
    """One of ``METHODS`` by name."""
    if method == "passing-bablok":
        return passing_bablok(x, y)
    if method == "deming":
        return deming(x, y, delta=delta)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
