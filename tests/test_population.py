"""Population model of the virtual cohort: reproducible, plausible, NHANES-like BMD."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from xbmd.errors import InputError
from xbmd.synth.model import Patient
from xbmd.synth.population import ABMD_LIMITS_G_CM2, sample_patients
from xbmd.tscore import t_score, who_category, z_score


@pytest.fixture(scope="module")
def population() -> list[Patient]:
    return sample_patients(5000, seed=2024)


def test_deterministic():
    assert sample_patients(20, seed=7) == sample_patients(20, seed=7)
    assert sample_patients(20, seed=7) != sample_patients(20, seed=8)


def test_prefix_property():
    assert sample_patients(40, seed=3)[:15] == sample_patients(15, seed=3)


def test_fields_and_ids():
    patients = sample_patients(12, seed=1)
    assert [p.patient_id for p in patients[:2]] == ["VQ0001", "VQ0002"]
    assert len({p.patient_id for p in patients}) == 12
    assert len({p.seed for p in patients}) == 12
    names = {f.name for f in dataclasses.fields(Patient)}
    assert names == {
        "patient_id", "age_years", "sex", "height_cm", "weight_kg",
        "total_hip_abmd_g_cm2", "bone_z", "seed",
    }  # fmt: skip
    for p in patients:
        assert isinstance(p.seed, int) and 0 <= p.seed < 2**63
        assert set(p.total_hip_abmd_g_cm2) == {"left", "right"}


def test_ranges(population):
    ages = np.array([p.age_years for p in population])
    assert ages.min() >= 50.0 and ages.max() <= 90.0
    assert 67.0 < ages.mean() < 73.0
    for sex, (low, high) in {"F": (155.0, 165.0), "M": (168.0, 178.0)}.items():
        heights = np.array([p.height_cm for p in population if p.sex == sex])
        assert low < heights.mean() < high
        assert heights.min() >= 135.0 and heights.max() <= 205.0
    weights = np.array([p.weight_kg for p in population])
    assert weights.min() > 30.0 and weights.max() < 200.0
    bmi = np.array([p.bmi for p in population])
    assert 25.5 < bmi.mean() < 28.5 and 4.0 < bmi.std() < 6.0
    abmd = np.array([list(p.total_hip_abmd_g_cm2.values()) for p in population])
    assert abmd.min() >= ABMD_LIMITS_G_CM2[0] and abmd.max() <= ABMD_LIMITS_G_CM2[1]


def test_female_fraction(population):
    share = np.mean([p.sex == "F" for p in population])
    assert share == pytest.approx(0.75, abs=0.02)
    assert all(p.sex == "M" for p in sample_patients(50, seed=0, female_fraction=0.0))


def test_younger_adults_when_asked():
    ages = [p.age_years for p in sample_patients(200, seed=5, age_range=(30.0, 60.0))]
    assert min(ages) >= 30.0 and max(ages) <= 60.0
    with pytest.raises(InputError, match="age_range"):
        sample_patients(5, seed=0, age_range=(10.0, 60.0))


def test_sides_close_and_bone_z_is_their_mean(population):
    diffs = np.array(
        [p.total_hip_abmd_g_cm2["left"] - p.total_hip_abmd_g_cm2["right"] for p in population]
    )
    assert abs(diffs.mean()) < 0.003  # no side systematically lower
    assert 0.02 < diffs.std() < 0.05  # g/cm2: left-right r about 0.95
    left = np.array([p.total_hip_abmd_g_cm2["left"] for p in population])
    right = np.array([p.total_hip_abmd_g_cm2["right"] for p in population])
    assert np.corrcoef(left, right)[0, 1] > 0.9
    for p in population[:50]:
        z = [z_score(v, "total_hip", p.sex, p.age_years) for v in p.total_hip_abmd_g_cm2.values()]
        assert p.bone_z == pytest.approx(np.mean(z), abs=1e-9)


def test_bone_z_standard_normal_and_heavier_is_denser(population):
    z = np.array([p.bone_z for p in population])
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05
    r = np.corrcoef(z, [p.bmi for p in population])[0, 1]
    assert 0.2 < r < 0.4


def test_bmd_declines_with_age(population):
    women = [p for p in population if p.sex == "F"]
    mean_by_decade = [
        np.mean([p.total_hip_abmd_g_cm2["right"] for p in women if lo <= p.age_years < lo + 10])
        for lo in (50, 60, 70, 80)
    ]
    assert all(b < a - 0.03 for a, b in itertools.pairwise(mean_by_decade))


def test_who_prevalence_of_women_over_50(population):
    # Target band (NHANES III: 13-18 % osteoporosis, 37-50 % osteopenia at the femur in all
    # women >= 50; this population is older, screened): 15-25 % and 35-50 % per hip.
    women = [p for p in population if p.sex == "F" and p.age_years >= 50]
    for side in ("left", "right"):
        cats = [who_category(t_score(p.total_hip_abmd_g_cm2[side])) for p in women]
        assert 0.15 <= cats.count("osteoporosis") / len(cats) <= 0.25
        assert 0.35 <= cats.count("osteopenia") / len(cats) <= 0.50


def test_bad_arguments():
    with pytest.raises(InputError, match="n must be"):
        sample_patients(-1, seed=0)
    with pytest.raises(InputError, match="female_fraction"):
        sample_patients(3, seed=0, female_fraction=1.5)
    assert sample_patients(0, seed=0) == []
