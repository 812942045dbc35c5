"""T-scores, Z-scores and WHO categories against the bundled NHANES III hip reference."""

from __future__ import annotations

import itertools
import math

import pytest

from xbmd.errors import InputError
from xbmd.tscore import (
    age_matched_mean_sd,
    load_reference_data,
    reference_info,
    t_score,
    who_category,
    z_score,
)

TH_MEAN, TH_SD = 0.942, 0.122  # NHANES III white women 20-29, total hip, g/cm2
FN_MEAN, FN_SD = 0.858, 0.120  # femoral neck


def test_young_adult_mean_is_t_zero():
    assert t_score(TH_MEAN) == pytest.approx(0.0, abs=1e-12)
    assert t_score(FN_MEAN, site="femoral_neck") == pytest.approx(0.0, abs=1e-12)


def test_osteoporosis_threshold_is_inclusive():
    bmd = TH_MEAN - 2.5 * TH_SD
    assert t_score(bmd) == pytest.approx(-2.5)
    assert who_category(t_score(bmd)) == "osteoporosis"
    assert who_category(t_score(FN_MEAN - 2.5 * FN_SD, "femoral_neck")) == "osteoporosis"


def test_category_boundaries():
    assert who_category(0.0) == "normal"
    assert who_category(-1.0) == "normal"
    assert who_category(t_score(TH_MEAN - TH_SD)) == "normal"
    assert who_category(-1.0001) == "osteopenia"
    assert who_category(-2.4999) == "osteopenia"
    assert who_category(-2.5) == "osteoporosis"
    assert who_category(-4.0) == "osteoporosis"


def test_men_use_the_female_reference_by_default():
    assert t_score(0.80, sex="M") == t_score(0.80, sex="F")
    male = reference_info(sex="M", reference="nhanes3_white_male")
    assert t_score(0.80, sex="M", reference="nhanes3_white_male") == pytest.approx(
        (0.80 - male["mean_g_cm2"]) / male["sd_g_cm2"]
    )
    matched = t_score(0.80, sex="M", reference="nhanes3_sex_matched")
    assert matched == t_score(0.80, reference="nhanes3_white_male")


def test_reference_info_cites_a_source():
    info = reference_info("total_hip", "F")
    assert (info["mean_g_cm2"], info["sd_g_cm2"]) == (TH_MEAN, TH_SD)
    assert info["status"] in ("verified", "secondary", "unverified")
    assert "Looker" in load_reference_data()["sources"]["looker1998"]["citation"]
    assert info["source"]


def test_z_score_is_age_matched():
    mean, sd = age_matched_mean_sd("total_hip", "F", 65.0)
    assert z_score(mean, "total_hip", "F", 65.0) == pytest.approx(0.0, abs=1e-12)
    assert z_score(mean - sd, "total_hip", "F", 65.0) == pytest.approx(-1.0)
    # The same BMD is a better Z-score at 85 than at 55.
    assert z_score(0.7, "total_hip", "F", 85.0) > z_score(0.7, "total_hip", "F", 55.0)


def test_age_curve_declines_after_50_and_is_continuous():
    for sex in ("F", "M"):
        for site in ("total_hip", "femoral_neck"):
            means = [age_matched_mean_sd(site, sex, a)[0] for a in range(50, 96, 5)]
            assert all(b < a for a, b in itertools.pairwise(means))
    below, above = (age_matched_mean_sd("total_hip", "F", a)[0] for a in (84.999, 85.001))
    assert below == pytest.approx(above, abs=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: t_score(0.8, site="spine"), "site must be one of total_hip, femoral_neck"),
        (lambda: t_score(0.8, sex="X"), "sex must be 'F' or 'M'"),
        (lambda: t_score(math.nan), "finite"),
        (lambda: t_score(-0.1), "positive"),
        (lambda: t_score("abc"), "number"),
        (lambda: t_score(0.8, reference="japan"), "reference must be one of"),
        (lambda: who_category(math.nan), "finite"),
        (lambda: z_score(0.8, "total_hip", "F", 15.0), ">= 20"),
        (lambda: z_score(0.8, "total_hip", "F", math.inf), "finite"),
    ],
)
def test_bad_input_raises_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()
