"""The simulated QCT scan: phantom, HU scale, and calibration recovering it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from xbmd.ct.calibration import (
    Phantom,
    Rod,
    phantom_calibration,
    phantomless_calibration,
)
from xbmd.synth.model import Anatomy
from xbmd.synth.scanner import (
    ROD_DENSITIES_MG_CM3,
    Scanner,
    ideal_hu_per_mg_cm3,
    sample_scanner,
    scan,
    soft_tissue_at_kvp,
)


def body_anatomy(spacing_mm: float = 1.5) -> Anatomy:
    """A fat-over-muscle elliptical body with a dense bone cylinder: enough for the scanner."""
    n = (40, int(260 / spacing_mm), int(360 / spacing_mm))
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = [-180.0, -130.0, -30.0]
    _, y, x = np.meshgrid(*[np.arange(k) * spacing_mm for k in n], indexing="ij")
    x, y = x - 180.0, y - 130.0
    r = (x / 170.0) ** 2 + (y / 110.0) ** 2
    soft = np.where(r <= 1, -100.0, -1000.0)
    soft = np.where((x / 150.0) ** 2 + (y / 90.0) ** 2 <= 1, 45.0, soft).astype(np.float32)
    bone = (x - 60.0) ** 2 + y**2 <= 15.0**2
    mineral = np.where(bone, 600.0, 0.0).astype(np.float32)
    labels = np.where(bone, 4, 0).astype(np.uint8)
    return Anatomy(affine, mineral, soft, labels, labels.copy(), {}, np.zeros(3))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_phantom_calibration_recovers_the_simulated_hu_scale(seed):
    rng = np.random.default_rng(seed)
    scanner = sample_scanner(rng)
    result = scan(body_anatomy(), scanner, rng, phantom=True)
    rods = tuple(Rod(label, d) for label, d in ROD_DENSITIES_MG_CM3.items())  # cohort's 101-105
    cal = phantom_calibration(result.ct, result.labels, Phantom("synth", rods))
    # every rod's fitted density within 2 mg/cm3 of its nominal value
    for name, residual in cal.residuals_mg_cm3.items():
        assert abs(residual) < 2.0, (name, residual, scanner)
    assert cal.slope_mg_cm3_per_hu == pytest.approx(1 / scanner.hu_per_mg_cm3, rel=0.01)
    assert cal.intercept_mg_cm3 == pytest.approx(-scanner.water_hu / scanner.hu_per_mg_cm3, abs=2.0)


def test_rods_labelled_under_the_patient_and_absent_without_phantom():
    rng = np.random.default_rng(5)
    scanner = Scanner("test", 120.0, 1.3, 3.0, 12.0, 0.6)
    with_phantom = scan(body_anatomy(), scanner, rng, phantom=True)
    ids = set(np.unique(with_phantom.labels.data).tolist())
    assert set(ROD_DENSITIES_MG_CM3) <= ids and 4 in ids
    rods_y = np.nonzero(np.isin(with_phantom.labels.data, list(ROD_DENSITIES_MG_CM3)))[1]
    bone_y = np.nonzero(with_phantom.labels.data == 4)[1]
    assert rods_y.min() > bone_y.max()  # posterior (+y) of the patient
    core = ndimage.binary_erosion(with_phantom.labels.data == 105, iterations=2)
    hu = with_phantom.ct.data[core].astype(float)
    assert np.median(hu) == pytest.approx(3.0 + 1.3 * 200.0, abs=3.0)
    without = scan(body_anatomy(), scanner, np.random.default_rng(5), phantom=False)
    assert not np.isin(without.labels.data, list(ROD_DENSITIES_MG_CM3)).any()
    assert without.ct.meta["kvp"] == 120.0 and without.ct.data.dtype == np.int16


def test_phantomless_calibration_is_close_on_an_ideal_scanner():
    scanner = Scanner("ideal", 120.0, ideal_hu_per_mg_cm3(120.0), 0.0, 10.0, 0.6)
    result = scan(body_anatomy(), scanner, np.random.default_rng(0), phantom=False)
    cal = phantomless_calibration(result.ct, kvp=120.0)
    truth = 1 / scanner.hu_per_mg_cm3
    assert cal.slope_mg_cm3_per_hu == pytest.approx(truth, rel=0.05)


def test_soft_tissue_contrast_follows_kvp():
    hu = np.array([-1000.0, -100.0, 0.0, 45.0, 90.0], np.float32)
    at_80 = soft_tissue_at_kvp(hu, 80.0)
    assert at_80[0] == pytest.approx(-1000.0) and at_80[2] == pytest.approx(0.0)
    assert at_80[1] < -100.0 and at_80[3] > 45.0  # more contrast at low kVp
    assert np.all(np.diff(at_80) > 0)
    np.testing.assert_array_equal(soft_tissue_at_kvp(hu, 120.0), hu)
    assert ideal_hu_per_mg_cm3(80.0) > ideal_hu_per_mg_cm3(140.0)
