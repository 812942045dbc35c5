"""Contrast detection and phantom-less calibration that knows its limits; drr's warnings."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.calibration import Calibration
from xbmd.ct.contrast import detect_contrast, phantomless_with_labels
from xbmd.errors import CalibrationError
from xbmd.io.ct import write_volume
from xbmd.volume import Volume

SHAPE = (40, 120, 160)  # 1.5 mm voxels: 60 (S-I) x 180 x 240 mm
MUSCLE_HU, FAT_HU, BLOOD_HU = 45.0, -100.0, 320.0


def body(contrast: bool, seed: int = 0) -> tuple[Volume, Volume]:
    """Air around a fat-over-muscle body with a textured bone, a vessel (contrast or not) and a
    brightly enhanced organ that sits in muscle's HU window. Labels: muscle 80 (gluteus), aorta
    52, femur 75 (TotalSegmentator ids)."""
    rng = np.random.default_rng(seed)
    _, y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float32) * 1.5
    x, y = x - 120.0, y - 90.0
    hu = np.full(SHAPE, -1000.0, np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    outer = (x / 115) ** 2 + (y / 85) ** 2 <= 1
    inner = (x / 100) ** 2 + (y / 70) ** 2 <= 1
    hu[outer] = FAT_HU
    hu[inner] = MUSCLE_HU
    labels[inner & ((x / 80) ** 2 + (y / 55) ** 2 > 1)] = 80  # a muscle ring under the fat
    organ = (x / 78) ** 2 + (y / 53) ** 2 <= 1  # enhanced organs inside the muscle ring: 70 HU
    hu[organ] = 70.0 if contrast else MUSCLE_HU
    vessel = (x - 50) ** 2 + (y + 10) ** 2 <= 9.0**2
    hu[vessel] = BLOOD_HU if contrast else 50.0
    labels[vessel] = 52
    bone = (x + 55) ** 2 + (y - 20) ** 2 <= 16.0**2
    cortex = bone & ((x + 55) ** 2 + (y - 20) ** 2 > 12.5**2)
    hu[bone] = 250.0 + 120.0 * rng.standard_normal(int(bone.sum()))  # trabecular texture
    hu[cortex] = 1100.0
    labels[bone] = 75
    hu += rng.normal(0.0, 12.0, SHAPE).astype(np.float32)
    ct = Volume.from_geometry(hu, (1.5, 1.5, 1.5), unit="HU", source="ct.nii.gz")
    return ct, ct.with_data(labels, unit="label")


@pytest.fixture(scope="module")
def scans():
    return {c: body(c) for c in (True, False)}


def test_contrast_is_found_in_the_image_and_in_labelled_blood(scans):
    ct, labels = scans[True]
    image = detect_contrast(ct)
    assert image.contrast and image.method == "image"
    assert image.blood_hu == pytest.approx(BLOOD_HU, abs=15)
    by_label = detect_contrast(ct, labels)
    assert by_label.contrast and by_label.method == "labels" and "aorta" in by_label.evidence
    plain, plain_labels = scans[False]
    assert not detect_contrast(plain).contrast  # the textured bone is no vessel
    assert not detect_contrast(plain, plain_labels).contrast


def test_contrast_without_muscle_labels_is_refused_or_warned(scans):
    ct, labels = scans[True]
    with pytest.raises(CalibrationError, match="contrast medium detected"):
        phantomless_with_labels(ct, kvp=120)
    allowed, _ = phantomless_with_labels(ct, kvp=120, allow_contrast=True)
    assert any(n.startswith("WARNING: contrast-enhanced") for n in allowed.notes)
    labelled, check = phantomless_with_labels(ct, labels, kvp=120)
    assert check.method == "labels"
    muscle = next(p for p in labelled.points if p.name == "muscle")
    assert muscle.hu == pytest.approx(MUSCLE_HU, abs=2.0)  # the labelled muscle, not the organ
    automatic = next(p for p in allowed.points if p.name == "muscle")
    assert automatic.hu > MUSCLE_HU + 10.0  # the enhanced organ's 70 HU pulled the mode up


def test_without_contrast_nothing_changes(scans):
    ct, _ = scans[False]
    cal, check = phantomless_with_labels(ct, kvp=120)
    assert not check.contrast and not any("contrast" in n for n in cal.notes)


def test_cli_calibrate_phantomless_refuses_contrast_in_one_line(scans, tmp_path):
    ct, labels = scans[True]
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(labels, tmp_path / "seg.nii.gz")
    base = ["calibrate", str(tmp_path / "ct.nii.gz"), "--phantomless", "--kvp", "120", "--out"]
    refused = CliRunner().invoke(app, [*base, str(tmp_path / "a.json")])
    assert refused.exit_code == 1 and "contrast medium detected" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    with_labels = CliRunner().invoke(
        app, [*base, str(tmp_path / "b.json"), "--labels", str(tmp_path / "seg.nii.gz")]
    )
    assert with_labels.exit_code == 0, with_labels.output
    assert "labelled muscles" in with_labels.output
    allowed = CliRunner().invoke(app, [*base, str(tmp_path / "c.json"), "--allow-contrast"])
    assert allowed.exit_code == 0 and "WARNING" in allowed.output
    assert Calibration.from_json(tmp_path / "c.json").method == "phantomless"


def test_cli_drr_warns_about_density_outside_bone(scans, tmp_path):
    ct, labels = scans[True]
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(labels, tmp_path / "seg.nii.gz")
    Calibration.given(0.76, -3.0).to_json(tmp_path / "cal.json")
    base = ["drr", str(tmp_path / "ct.nii.gz"), "--calibration", str(tmp_path / "cal.json"),
            "--geometry", "parallel", "--size", "32", "32", "--out"]  # fmt: skip
    everything = CliRunner().invoke(app, [*base, str(tmp_path / "all.npy")])
    assert everything.exit_code == 0, everything.output
    assert "negative 'mineral'" in everything.output
    assert "contrast medium detected" in everything.output
    bone = CliRunner().invoke(
        app, [*base, str(tmp_path / "bone.npy"), "--labels", str(tmp_path / "seg.nii.gz"),
              "--label", "75"]
    )  # fmt: skip
    assert bone.exit_code == 0 and "warning" not in bone.output
    vessel = CliRunner().invoke(
        app, [*base, str(tmp_path / "v.npy"), "--labels", str(tmp_path / "seg.nii.gz"),
              "--label", "80"]
    )  # fmt: skip
    assert "not bone?" in vessel.output
