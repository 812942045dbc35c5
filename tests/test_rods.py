"""Automatic phantom rods: found without a label, fitted, refused when absent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.calibration import Calibration, load_phantom, phantom_calibration
from xbmd.ct.rods import PhantomLayout, find_rods
from xbmd.errors import CalibrationError, InputError
from xbmd.io.ct import read_labels, write_volume
from xbmd.synth.model import Anatomy
from xbmd.synth.scanner import Scanner, scan
from xbmd.volume import Volume

BMAS = load_phantom("bmas200")


def body_anatomy(spacing_mm: float = 1.5) -> Anatomy:
    """A fat-over-muscle elliptical body with a dense bone cylinder (as test_synth_scanner)."""
    n = (30, int(260 / spacing_mm), int(360 / spacing_mm))
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = [-180.0, -130.0, -30.0]
    _, y, x = np.meshgrid(*[np.arange(k) * spacing_mm for k in n], indexing="ij")
    x, y = x - 180.0, y - 130.0
    soft = np.where((x / 170.0) ** 2 + (y / 110.0) ** 2 <= 1, -100.0, -1000.0)
    soft = np.where((x / 150.0) ** 2 + (y / 90.0) ** 2 <= 1, 45.0, soft).astype(np.float32)
    bone = (x - 60.0) ** 2 + y**2 <= 15.0**2
    mineral = np.where(bone, 600.0, 0.0).astype(np.float32)
    labels = np.where(bone, 4, 0).astype(np.uint8)
    return Anatomy(affine, mineral, soft, labels, labels.copy(), {}, np.zeros(3))


SCANNER = Scanner("test 100 kVp", 100.0, 1.55, -3.0, 18.0, 0.7)


@pytest.fixture(scope="module")
def scans():
    with_phantom = scan(body_anatomy(), SCANNER, np.random.default_rng(1), phantom=True)
    without = scan(body_anatomy(), SCANNER, np.random.default_rng(2), phantom=False)
    return with_phantom, without


def test_rods_are_found_where_they_are_and_fit_the_true_scale(scans):
    result = scans[0]
    found = find_rods(result.ct, BMAS)
    truth = result.labels.data  # the simulation's rods, labelled 101-105
    for rod in BMAS.rods:  # bmas200 labels rod n as 200 + n; the simulation as 100 + n
        mine, true = found.labels.data == rod.label, truth == rod.label - 100
        dice = (
            2
            * (mine & true).sum()
            / (mine.sum() + true[found.slices[0] : found.slices[1] + 1].sum())
        )
        assert dice > 0.95, (rod, dice)  # measured 0.989-0.995
    assert [r.visible for r in found.rods] == [False, True, True, True, True]  # HA 0 ~ block
    cal = phantom_calibration(result.ct, found.labels, BMAS)
    assert cal.r > 0.999
    for density in (0.0, 100.0, 200.0):  # against the simulated scanner's true line
        hu = SCANNER.water_hu + SCANNER.hu_per_mg_cm3 * density
        assert cal.density_mg_cm3(hu) == pytest.approx(density, abs=1.5)  # measured <= 0.52


def test_a_reversed_phantom_is_found_with_its_rods_in_their_places(scans):
    ct = scans[0].ct
    flipped = ct.with_data(np.ascontiguousarray(ct.data[:, :, ::-1]))  # HA 200 now on the left
    found = find_rods(flipped, BMAS)
    x_of = {rod.label: rod.centre_mm[0] for rod in found.rods}
    assert x_of[205] < x_of[201]
    cal = phantom_calibration(flipped, found.labels, BMAS)
    assert cal.r > 0.999


def test_no_phantom_no_rods(scans):
    with pytest.raises(CalibrationError, match="no B-MAS200 phantom found"):
        find_rods(scans[1].ct, BMAS)


def test_a_phantom_without_layout_or_a_sagittal_ct_is_refused(scans):
    ct = scans[0].ct
    plain = load_phantom("bmas200")
    object.__setattr__(plain, "layout", None)
    with pytest.raises(InputError, match="has no layout"):
        find_rods(ct, plain)
    sagittal = Volume(ct.data, ct.affine[:, [2, 1, 0, 3]], "HU", source="sag.nii.gz")
    with pytest.raises(InputError, match="needs axial slices"):
        find_rods(sagittal, BMAS)


def test_layout_is_checked():
    labels = [201, 202, 203]
    good = {"rod_diameter_mm": 10, "rod_pitch_mm": 30, "row_order": [203, 202, 201]}
    assert PhantomLayout.from_dict(good, labels).row_order == (203, 202, 201)
    with pytest.raises(InputError, match="row_order must list every rod"):
        PhantomLayout.from_dict(good | {"row_order": [201, 202]}, labels)
    with pytest.raises(InputError, match="rod_pitch_mm must exceed"):
        PhantomLayout.from_dict(good | {"rod_pitch_mm": 8}, labels)
    with pytest.raises(InputError, match="rod_diameter_mm must be a positive number"):
        PhantomLayout.from_dict(good | {"rod_diameter_mm": "ten"}, labels)


def test_cli_calibrate_with_the_bundled_phantom_needs_no_labels(scans, tmp_path):
    write_volume(scans[0].ct, tmp_path / "ct.nii.gz")
    write_volume(scans[1].ct, tmp_path / "no_phantom.nii.gz")
    out = tmp_path / "cal.json"
    args = ["calibrate", str(tmp_path / "ct.nii.gz"), "--phantom", "bmas200", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--save-rods", str(tmp_path / "rods.nii.gz")])
    assert result.exit_code == 0, result.output
    cal = Calibration.from_json(out)
    assert cal.method == "phantom" and cal.r > 0.999
    assert any("found automatically" in n for n in cal.notes)
    assert (tmp_path / "cal_rods.png").read_bytes()[:4] == b"\x89PNG"
    rods = read_labels(tmp_path / "rods.nii.gz")
    assert set(np.unique(rods.data).tolist()) == {0, 201, 202, 203, 204, 205}
    bad = CliRunner().invoke(
        app, ["calibrate", str(tmp_path / "no_phantom.nii.gz"), "--phantom", "bmas200",
              "--out", str(tmp_path / "x.json")]
    )  # fmt: skip
    assert bad.exit_code == 1 and "no B-MAS200 phantom found" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()
    plain = tmp_path / "plain.json"
    doc = json.loads(json.dumps({"name": "p", "material": "hydroxyapatite",
                                 "rods": [{"label": 1, "density_mg_cm3": 0}]}))  # fmt: skip
    plain.write_text(json.dumps(doc))
    no_layout = CliRunner().invoke(
        app, ["calibrate", str(tmp_path / "ct.nii.gz"), "--phantom", str(plain), "--out",
              str(tmp_path / "y.json")]
    )  # fmt: skip
    assert no_layout.exit_code == 1 and "has no layout" in no_layout.output
