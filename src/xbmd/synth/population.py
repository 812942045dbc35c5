"""Population model of the virtual cohort: who the synthetic patients are and what BMD they get.

Each patient is drawn on his or her own random stream (``SeedSequence(seed).spawn(n)``), so the
first k patients of ``sample_patients(n, s)`` are ``sample_patients(k, s)``:

- sex: female with probability ``female_fraction``;
- age (years): normal around ``age_mean_years`` +/- ``age_sd_years``, truncated to ``age_range``:
  a screened/referred population (USPSTF screens women from 65, hip imaging is for the old);
- height (cm): normal by sex, shrinking with age after 50;
- BMI (kg/m2): log-normal, mean about 27 +/- 5 (US adults 50+), a little lower after 70;
  weight = BMI x height^2;
- ``bone_z``: standard normal, correlated with the BMI deviate (r = 0.3: femoral BMD vs BMI
  r = 0.36-0.43 in 680 postmenopausal women, Gambacciani et al., Menopause 1995;2:169; 0.3 is
  the conservative end). It stays N(0, 1) overall, so the NHANES prevalence is kept;
- per side: z +/- half a left-right difference (SD 0.28 in Z units, i.e. about 0.034 g/cm2:
  left and right total hip correlate r = 0.94-0.96 and differ by more than the 0.026 g/cm2
  LSC in about half of people, Busselton Healthy Ageing Study, J Clin Densitom 2022;25:577;
  Mounach et al., ISRN Rheumatol 2012:617535); no side is systematically lower;
- ``total_hip_abmd_g_cm2[side]`` = NHANES III mean(age, sex) + z_side x SD(age, sex)
  (:func:`xbmd.tscore.age_matched_mean_sd`), clipped to ``ABMD_LIMITS_G_CM2``.

``benchmarks/bench_population.py`` compares the result with the published NHANES figures.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

from xbmd.errors import InputError
from xbmd.synth.model import DRAW_SIDES, Patient
from xbmd.tscore import MIN_AGE_YEARS, age_matched_mean_sd

#: Mean height at 50 y, cm, and loss per decade after 50, cm (NHANES anthropometry of US
#: adults, rounded; unverified figures).
HEIGHT_AT_50_CM = {"F": 162.5, "M": 176.0}
HEIGHT_LOSS_CM_PER_DECADE = {"F": 1.5, "M": 1.3}
HEIGHT_SD_CM = {"F": 6.5, "M": 7.0}
HEIGHT_LIMITS_CM = (135.0, 205.0)
#: BMI of US adults 50+, kg/m2: mean and SD (log-normal), and the decline per year after 70.
BMI_MEAN_KG_M2 = 27.0
BMI_SD_KG_M2 = 5.0
BMI_DECLINE_KG_M2_PER_YEAR_AFTER_70 = 0.1
BMI_LIMITS_KG_M2 = (15.0, 50.0)
#: Correlation of the bone Z-score with the BMI deviate.
BMI_BONE_CORRELATION = 0.3
#: SD of the left-minus-right total-hip difference, in Z-score units.
SIDE_DIFFERENCE_SD_Z = 0.28
#: Physiologic limits of a total-hip aBMD, g/cm2 (severe osteoporosis to dense young bone).
ABMD_LIMITS_G_CM2 = (0.30, 1.50)


def sample_patients(
    n: int,
    seed: int,
    *,
    female_fraction: float = 0.75,
    age_range: tuple[float, float] = (50.0, 90.0),
    age_mean_years: float = 70.0,
    age_sd_years: float = 10.0,
) -> list[Patient]:
    """Draw ``n`` synthetic patients, reproducibly from ``seed``.

    Ages (years) fall inside ``age_range`` (lowest allowed 20, the youngest NHANES III band).
    Patient ``i`` depends only on ``(seed, i)``: a prefix of a larger sample is the smaller sample.

    Example::

        >>> p = sample_patients(3, seed=0)[0]
        >>> p.patient_id, sorted(p.total_hip_abmd_g_cm2)
        ('VQ0001', ['left', 'right'])
    """
    _check_arguments(n, female_fraction, age_range, age_sd_years)
    children = np.random.SeedSequence(seed).spawn(n)
    return [
        _sample_one(i, child, female_fraction, age_range, age_mean_years, age_sd_years)
        for i, child in enumerate(children)
    ]


def _sample_one(
    index: int,
    seed_seq: np.random.SeedSequence,
    female_fraction: float,
    age_range: tuple[float, float],
    age_mean_years: float,
    age_sd_years: float,
) -> Patient:
    draws_seq, patient_seq = seed_seq.spawn(2)
    rng = np.random.default_rng(draws_seq)
    sex = "F" if rng.random() < female_fraction else "M"
    age_years = round(_truncated_normal(rng, age_mean_years, age_sd_years, *age_range), 1)
    height_cm = _height_cm(rng, sex, age_years)
    bmi_deviate = rng.standard_normal()
    weight_kg = _bmi_kg_m2(bmi_deviate, age_years) * (height_cm / 100.0) ** 2
    r = BMI_BONE_CORRELATION
    bone_z = r * bmi_deviate + math.sqrt(1.0 - r * r) * rng.standard_normal()
    half_difference_z = 0.5 * SIDE_DIFFERENCE_SD_Z * rng.standard_normal()
    mean, sd = age_matched_mean_sd("total_hip", sex, age_years)
    side_z = {"left": bone_z + half_difference_z, "right": bone_z - half_difference_z}
    abmd = {side: float(np.clip(mean + z * sd, *ABMD_LIMITS_G_CM2)) for side, z in side_z.items()}
    # Recomputed from the (rarely) clipped values so that bone_z always matches the targets.
    bone_z = float(np.mean([(abmd[side] - mean) / sd for side in DRAW_SIDES]))
    return Patient(
        patient_id=f"VQ{index + 1:04d}",
        age_years=age_years,
        sex=sex,
        height_cm=round(height_cm, 1),
        weight_kg=round(weight_kg, 1),
        total_hip_abmd_g_cm2=abmd,
        bone_z=bone_z,
        seed=int(patient_seq.generate_state(1, np.uint64)[0] >> np.uint64(1)),
    )


def _truncated_normal(
    rng: np.random.Generator, mean: float, sd: float, low: float, high: float
) -> float:
    """One draw of N(mean, sd) restricted to [low, high], by inverting the CDF (one uniform)."""
    if sd == 0.0:
        return float(np.clip(mean, low, high))
    p_low, p_high = ndtr((low - mean) / sd), ndtr((high - mean) / sd)
    value = mean + sd * float(ndtri(rng.uniform(p_low, p_high)))
    return float(np.clip(value, low, high))


def _height_cm(rng: np.random.Generator, sex: str, age_years: float) -> float:
    decades_past_50 = max(0.0, age_years - 50.0) / 10.0
    mean = HEIGHT_AT_50_CM[sex] - HEIGHT_LOSS_CM_PER_DECADE[sex] * decades_past_50
    return float(np.clip(mean + HEIGHT_SD_CM[sex] * rng.standard_normal(), *HEIGHT_LIMITS_CM))


def _bmi_kg_m2(deviate: float, age_years: float) -> float:
    """BMI (kg/m2) from a standard-normal deviate: log-normal with the target mean and SD."""
    mean = BMI_MEAN_KG_M2 - BMI_DECLINE_KG_M2_PER_YEAR_AFTER_70 * max(0.0, age_years - 70.0)
    sigma = math.sqrt(math.log1p((BMI_SD_KG_M2 / mean) ** 2))
    mu = math.log(mean) - 0.5 * sigma * sigma
    return float(np.clip(math.exp(mu + sigma * deviate), *BMI_LIMITS_KG_M2))


def _check_arguments(
    n: int, female_fraction: float, age_range: tuple[float, float], age_sd_years: float
) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise InputError(f"n must be a non-negative integer, not {n!r}")
    if not 0.0 <= female_fraction <= 1.0:
        raise InputError(f"female_fraction must be in [0, 1], not {female_fraction}")
    low, high = age_range
    if not MIN_AGE_YEARS <= low <= high:
        raise InputError(
            f"age_range must be (low, high) with {MIN_AGE_YEARS:g} <= low <= high years, "
            f"not {age_range}"
        )
    if not age_sd_years >= 0.0:
        raise InputError(f"age_sd_years must be >= 0, not {age_sd_years}")
