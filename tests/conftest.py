"""Fixtures shared by the test modules: one tiny virtual cohort and its prepared dataset per
test session (instead of every module building its own).

The cohort: 3 virtual patients (seed 21), 1 radiograph each, 3 mm CT voxels and 1.6 mm detector
pixels (coarse enough for seconds per case, the same code paths as the 1 mm default), every case
with a calibration phantom. The dataset: ``xbmd prepare`` with the known poses (6 samples).
Tests must not modify them: copy what they change.
"""

from __future__ import annotations

import pytest

from xbmd.dataset.prepare import prepare_dataset
from xbmd.synth.cohort import SynthSettings, generate_cohort

TINY = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0.0)
TINY_CASES = 3
TINY_SEED = 21


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cohort")
    summary = generate_cohort(
        out, cases=TINY_CASES, seed=TINY_SEED, settings=TINY, workers=1, progress=False
    )
    assert summary["succeeded"] == TINY_CASES
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_dataset") / "dataset"
    summary = prepare_dataset(
        tiny_cohort / "manifest.csv", out, use_known_poses=True, progress=False
    )
    assert summary["samples_failed"] == 0
    return out


# The estimate tests' shared fixtures (tests/estimate_helpers.py): a synthetic pelvis and
# radiograph files, an untrained bundle, an estimator with it.
from estimate_helpers import bundle_path, estimator, images  # noqa: E402, F401
