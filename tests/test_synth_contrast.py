"""The virtual cohort's optional contrast medium: off by default, only the CT changes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from xbmd.ct.contrast import detect_contrast
from xbmd.synth import anatomy as anatomy_mod
from xbmd.synth.cohort import SynthSettings
from xbmd.synth.contrast import VESSEL_IDS, ContrastPhase, rng_for, sample_contrast
from xbmd.synth.population import sample_patients
from xbmd.synth.scanner import Scanner, scan

PHASE = ContrastPhase("portal-venous", 180.0, 170.0, 10.0, 40.0)


@pytest.fixture(scope="module")
def anatomy():
    patient = sample_patients(1, 21)[0]
    rng = np.random.default_rng(patient.seed)
    shape = anatomy_mod.sample_shape(patient, rng)
    return anatomy_mod.build_anatomy(patient, shape, spacing_mm=(1.5, 1.5, 1.5), rng=rng)


def test_contrast_changes_only_vessels_muscle_and_organs(anatomy):
    scanner = Scanner("test", 120.0, 1.3, 2.0, 12.0, 0.6)
    plain = scan(anatomy, scanner, np.random.default_rng(4))
    enhanced = scan(anatomy, scanner, np.random.default_rng(4), contrast=PHASE)
    assert plain.vessels is None
    np.testing.assert_array_equal(plain.labels.data, enhanced.labels.data)
    vessels = enhanced.vessels
    assert set(np.unique(vessels).tolist()) == {0, *VESSEL_IDS.values()}
    diff = enhanced.ct.data.astype(float) - plain.ct.data
    inside = vessels > 0
    # vessels read the blood's HU (blurred at their rims); their cores are the phase's
    core = inside & (np.abs(diff) > 50)
    assert core.sum() > 0.3 * inside.sum()
    assert np.median(enhanced.ct.data[core]) == pytest.approx(PHASE.artery_hu + 2.0, abs=25)
    muscle = np.isclose(anatomy.soft_tissue_hu, anatomy.meta["body"]["muscle_hu"], atol=1e-3)
    n = muscle.shape[1]
    muscle_diff = np.median(diff[:, :n][muscle & ~inside[:, :n]])
    assert muscle_diff == pytest.approx(PHASE.muscle_enhancement_hu, abs=2.0)
    bones = np.isin(plain.labels.data, (1, 2, 3, 4))
    deep = ndimage.binary_erosion(bones, iterations=2) & ~ndimage.binary_dilation(
        inside, iterations=3
    )
    assert deep.sum() > 1000 and np.abs(diff[deep]).max() == 0  # bone keeps its HU
    labels = enhanced.labels.with_data(vessels)  # as a segmenter would label them
    found = detect_contrast(enhanced.ct, labels)
    assert found.contrast and found.method == "labels"
    assert found.blood_hu == pytest.approx(PHASE.artery_hu, abs=30)  # arteries and veins mixed
    assert not detect_contrast(plain.ct).contrast  # no vessel-like region in the plain scan


def test_contrast_draws_are_their_own_and_settings_stay_as_before():
    a, b = sample_contrast(rng_for(7)), sample_contrast(rng_for(7))
    assert a == b and a.phase in ("arterial", "portal-venous") and a.artery_hu > 140
    assert "contrast_fraction" not in SynthSettings().record()  # cohort.json as before
    assert SynthSettings(contrast_fraction=0.5).record()["contrast_fraction"] == 0.5
