"""What the numbers say to a clinician: T-score, WHO category or Z-score, with their interval.

Conventions (ISCD, WHO; docs/model-card.md):

- the T-score is reported for every estimate (against the reference asked for; sex unknown:
  the female reference, with a warning when the reference is sex-matched);
- the WHO category (normal, osteopenia, osteoporosis) only for patients aged 50 or more of known
  sex, and only for a confident estimate; with an interval, the statement says which categories
  the interval spans;
- under 50 (from 20), the Z-score against age- and sex-matched norms instead, "below the
  expected range for age" at Z <= -2.0;
- without age or sex, neither category nor Z-score.
"""

from __future__ import annotations

import math

from xbmd.tscore import (
    MIN_AGE_YEARS,
    reference_info,
    t_score,
    who_category,
    z_score,
)

#: WHO categories apply from this age (postmenopausal women and men aged 50 or more).
WHO_MIN_AGE_YEARS = 50.0
#: A Z-score at or below this is "below the expected range for age".
Z_BELOW_RANGE = -2.0


def clinical_scores(
    bmd_g_cm2: float,
    interval_g_cm2: tuple[float, float] | None,
    sex: str | None,
    age_years: float | None,
    reference: str,
    confident: bool,
) -> tuple[dict, list[str]]:
    """T-score (and interval), WHO category or Z-score, the statement, the reference cited; and
    warnings. Keys: t_score, t_score_interval, who_category, z_score, category_statement,
    reference."""
    warnings = []
    ref_sex = sex if sex in ("F", "M") else "F"
    if reference == "nhanes3_sex_matched" and sex not in ("F", "M"):
        warnings.append("patient sex unknown: the female reference was used")
    out = {
        "t_score": None,
        "t_score_interval": None,
        "who_category": None,
        "z_score": None,
        "category_statement": None,
        "reference": reference_info("total_hip", ref_sex, reference),
    }
    if not (math.isfinite(bmd_g_cm2) and bmd_g_cm2 > 0):
        warnings.append(f"predicted aBMD {bmd_g_cm2:.4g} g/cm2 is not positive: no T-score")
        out["category_statement"] = "no T-score: the estimate is not a positive number"
        return out, warnings
    t = t_score(bmd_g_cm2, "total_hip", ref_sex, reference)
    out["t_score"] = t
    if interval_g_cm2 is not None:
        lo, hi = (max(v, 1e-6) for v in interval_g_cm2)
        out["t_score_interval"] = (
            t_score(lo, "total_hip", ref_sex, reference),
            t_score(hi, "total_hip", ref_sex, reference),
        )
    known = sex in ("F", "M") and age_years is not None
    if not confident:
        out["category_statement"] = "no category: the estimate is not confident (see warnings)"
    elif not known:
        out["category_statement"] = (
            "no WHO category or Z-score: they need the patient's age and sex "
            "(WHO categories apply from 50 years)"
        )
    elif age_years >= WHO_MIN_AGE_YEARS:
        out["who_category"] = who_category(t)
        out["category_statement"] = _who_statement(out["who_category"], out["t_score_interval"])
    elif age_years >= MIN_AGE_YEARS:
        z = z_score(bmd_g_cm2, "total_hip", sex, age_years)
        out["z_score"] = z
        out["category_statement"] = _z_statement(z, age_years)
    else:
        out["category_statement"] = f"no WHO category or Z-score under {MIN_AGE_YEARS:g} years"
    if known and age_years >= MIN_AGE_YEARS and out["z_score"] is None:
        out["z_score"] = z_score(bmd_g_cm2, "total_hip", sex, age_years)
    return out, warnings


def _who_statement(category: str, t_interval: tuple[float, float] | None) -> str:
    if t_interval is None:
        return f"{category} (no interval: the model is not calibrated)"
    mildest, worst = who_category(max(t_interval)), who_category(min(t_interval))
    if mildest == worst:
        return f"{category}; the 95 % interval stays within {category}"
    return f"{category}; the 95 % interval spans {mildest} to {worst}"


def _z_statement(z: float, age_years: float) -> str:
    where = "below" if z <= Z_BELOW_RANGE else "within"
    return (
        f"Z-score {z:+.1f}: {where} the expected range for age (aged {age_years:g}: WHO "
        f"categories apply from {WHO_MIN_AGE_YEARS:g} years)"
    )
