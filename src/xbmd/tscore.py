"""T-scores, Z-scores and the WHO categories of hip areal BMD (g/cm2, Hologic scale).

- T-score = (BMD - young-adult mean) / young-adult SD. The young adults are NHANES III
  non-Hispanic white women aged 20-29 (Looker et al. 1998) for women *and* men by default: the
  ISCD convention of one white female reference for everybody. The NHANES III white male
  reference (``reference='nhanes3_white_male'``) or the patient's own sex
  (``reference='nhanes3_sex_matched'``) can be asked for.
- Z-score = (BMD - mean) / SD of NHANES III white adults of the patient's sex and age, the age
  bands interpolated (:func:`age_matched_mean_sd`).
- WHO: T >= -1 normal, -2.5 < T < -1 osteopenia (low bone mass), T <= -2.5 osteoporosis.

The numbers live in ``xbmd/data/reference/nhanes3_hip.json`` with their sources and whether they
were verified; :func:`reference_info` returns what a result should cite.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

import numpy as np

from xbmd.errors import InputError

SITES = ("total_hip", "femoral_neck")
SEXES = ("F", "M")
REFERENCES = ("nhanes3_white_female", "nhanes3_white_male", "nhanes3_sex_matched")
#: ISCD: white female young adults for women and men of every ethnic group.
DEFAULT_REFERENCE = "nhanes3_white_female"
CATEGORIES = ("normal", "osteopenia", "osteoporosis")
#: WHO thresholds on the T-score.
OSTEOPENIA_T = -1.0
OSTEOPOROSIS_T = -2.5
#: T-scores this close to a threshold count as on it: floating-point slack, so that
#: t_score(0.942 - 2.5 * 0.122) is osteoporosis.
THRESHOLD_TOLERANCE = 1e-9
#: Youngest age the NHANES III bands cover, years.
MIN_AGE_YEARS = 20.0
_SEX_KEY = {"F": "female", "M": "male"}


@cache
def load_reference_data(name: str = "nhanes3_hip") -> dict:
    """The bundled reference table ``xbmd/data/reference/<name>.json`` as a dict (cached)."""
    resource = resources.files("xbmd") / "data" / "reference" / f"{name}.json"
    if not resource.is_file():
        raise InputError(f"no bundled reference table {name!r}")
    return json.loads(resource.read_text(encoding="utf-8"))


def t_score(
    bmd_g_cm2: float,
    site: str = "total_hip",
    sex: str = "F",
    reference: str = DEFAULT_REFERENCE,
) -> float:
    """T-score of an areal BMD (g/cm2, Hologic scale) against young NHANES III adults.

    ``sex`` is the patient's sex ('F' or 'M'); it picks the reference only when
    ``reference='nhanes3_sex_matched'``. Example: ``t_score(0.820)`` -> -1.0 (total hip, women).
    """
    bmd = _check_bmd(bmd_g_cm2)
    mean, sd = _young_adult(site, _reference_sex(sex, reference))
    return (bmd - mean) / sd


def z_score(bmd_g_cm2: float, site: str, sex: str, age_years: float) -> float:
    """Z-score of an areal BMD (g/cm2) against NHANES III white adults of that sex and age (years).

    Example: ``z_score(0.80, 'total_hip', 'F', 65.0)`` -> about 0 (a typical 65-year-old woman).
    """
    bmd = _check_bmd(bmd_g_cm2)
    mean, sd = age_matched_mean_sd(site, sex, age_years)
    return (bmd - mean) / sd


def who_category(t: float) -> str:
    """WHO category of a T-score: 'normal' (T >= -1), 'osteopenia', 'osteoporosis' (T <= -2.5)."""
    t = _finite(t, "T-score")
    if t <= OSTEOPOROSIS_T + THRESHOLD_TOLERANCE:
        return "osteoporosis"
    if t >= OSTEOPENIA_T - THRESHOLD_TOLERANCE:
        return "normal"
    return "osteopenia"


def reference_info(
    site: str = "total_hip", sex: str = "F", reference: str = DEFAULT_REFERENCE
) -> dict:
    """What a T-score was computed against, for a result to cite.

    Returns a dict: name, population, site, mean_g_cm2, sd_g_cm2, status ('verified',
    'secondary' or 'unverified') and source.
    """
    ref_sex = _reference_sex(sex, reference)
    entry = load_reference_data()["young_adult_reference"][_SEX_KEY[ref_sex]]
    values = entry[_check_site(site)]
    return {
        "name": reference if reference != "nhanes3_sex_matched" else f"{reference} ({ref_sex})",
        "population": entry["population"],
        "site": site,
        "mean_g_cm2": values["mean_g_cm2"],
        "sd_g_cm2": values["sd_g_cm2"],
        "status": values["status"],
        "source": values["source"],
    }


def age_matched_mean_sd(site: str, sex: str, age_years: float) -> tuple[float, float]:
    """Mean and SD (g/cm2) of NHANES III white adults of ``sex`` at ``age_years``.

    The 10-year band values sit at the band centres (25, 35, ..., 85 y) and are interpolated
    linearly in between; below 25 y the 20-29 values hold; beyond 85 y the 70s-to-80+ slope
    continues (bone keeps being lost after 85, the open 80+ band averages it out).
    """
    age = _finite(age_years, "age_years")
    if age < MIN_AGE_YEARS:
        raise InputError(f"age_years must be >= {MIN_AGE_YEARS:g} (NHANES III adults), not {age}")
    bands = load_reference_data()["age_bands"]
    table = bands[_SEX_KEY[_check_sex(sex)]][_check_site(site)]
    centres = np.asarray(bands["centre_age_years"], dtype=float)
    mean = _interp_extrapolate_old(age, centres, np.asarray(table["mean_g_cm2"], dtype=float))
    sd = _interp_extrapolate_old(age, centres, np.asarray(table["sd_g_cm2"], dtype=float))
    return mean, sd


def _interp_extrapolate_old(age: float, centres: np.ndarray, values: np.ndarray) -> float:
    if age <= centres[-1]:
        return float(np.interp(age, centres, values))
    slope = (values[-1] - values[-2]) / (centres[-1] - centres[-2])
    return float(values[-1] + slope * (age - centres[-1]))


def _young_adult(site: str, ref_sex: str) -> tuple[float, float]:
    values = load_reference_data()["young_adult_reference"][_SEX_KEY[ref_sex]][_check_site(site)]
    return float(values["mean_g_cm2"]), float(values["sd_g_cm2"])


def _reference_sex(sex: str, reference: str) -> str:
    sex = _check_sex(sex)
    if reference == "nhanes3_white_female":
        return "F"
    if reference == "nhanes3_white_male":
        return "M"
    if reference == "nhanes3_sex_matched":
        return sex
    raise InputError(f"reference must be one of {', '.join(REFERENCES)}, not {reference!r}")


def _check_site(site: str) -> str:
    if site not in SITES:
        raise InputError(f"site must be one of {', '.join(SITES)}, not {site!r}")
    return site


def _check_sex(sex: str) -> str:
    if sex not in SEXES:
        raise InputError(f"sex must be 'F' or 'M', not {sex!r}")
    return sex


def _check_bmd(bmd_g_cm2: float) -> float:
    bmd = _finite(bmd_g_cm2, "bmd_g_cm2")
    if bmd <= 0.0:
        raise InputError(f"bmd_g_cm2 must be positive, not {bmd}")
    return bmd


def _finite(value: float, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be finite, not {number}")
    return number
