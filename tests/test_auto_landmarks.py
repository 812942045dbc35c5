"""Automatic femur landmarks from a femur label, against a virtual femur's exact landmarks."""

from __future__ import annotations

import numpy as np
import pytest

from xbmd.ct.auto_landmarks import case_landmarks, fit_femur_landmarks, write_qc_png
from xbmd.ct.femur import measure_femur
from xbmd.errors import InputError
from xbmd.synth import anatomy as anatomy_mod
from xbmd.synth.population import sample_patients
from xbmd.volume import Volume

FEMUR = {"left": 4, "right": 3}


@pytest.fixture(scope="module")
def femurs():
    """A virtual patient's anatomy on a 2 mm grid (coarse, for speed): labels, truth, mineral."""
    patient = sample_patients(1, 3)[0]
    rng = np.random.default_rng(patient.seed)
    shape = anatomy_mod.sample_shape(patient, rng)
    anatomy = anatomy_mod.build_anatomy(patient, shape, spacing_mm=(2.0, 2.0, 2.0), rng=rng)
    labels = Volume(anatomy.labels, anatomy.affine, "label", source="virtual labels")
    mineral = Volume(anatomy.mineral_mg_cm3, anatomy.affine, "mg/cm3")
    fits = {side: fit_femur_landmarks(labels, FEMUR[side], side) for side in FEMUR}
    return labels, mineral, anatomy.landmarks, fits


def _angle_deg(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


@pytest.mark.parametrize("side", ["left", "right"])
def test_landmarks_match_the_virtual_femur(femurs, side):
    _, _, truth, fits = femurs
    auto, true = fits[side].landmarks, truth[side]

    def err(name):
        return float(np.linalg.norm(getattr(auto, name) - getattr(true, name)))

    # measured on this 2 mm femur (left / right): head 0.03 / 0.03 mm, junction 0.14 / 0.10,
    # neck axis 0.27 / 0.18 deg, shaft axis 0.13 / 0.07 deg, LT 1.2 / 0.84 mm (height 0.09 /
    # 0.07), neck centre 2.3 / 4.2 mm, GT 4.7 / 5.9 mm; thresholds about 2-4x those
    assert err("head_center_mm") < 0.3
    assert abs(auto.head_radius_mm - true.head_radius_mm) < 0.5
    assert err("head_neck_junction_mm") < 0.6
    assert _angle_deg(auto.neck_axis, true.neck_axis) < 1.0
    assert _angle_deg(auto.shaft_axis, true.shaft_axis) < 0.5
    assert err("lesser_trochanter_mm") < 3.0
    lt_height = (auto.lesser_trochanter_mm - true.lesser_trochanter_mm) @ true.shaft_axis
    assert abs(lt_height) < 0.5
    assert err("neck_center_mm") < 8.0
    assert err("greater_trochanter_mm") < 12.0
    assert auto.extra["head_fit_rms_mm"] < 1.0 and 110 < auto.extra["neck_shaft_angle_deg"] < 150


@pytest.mark.parametrize("side", ["left", "right"])
def test_total_hip_abmd_from_automatic_landmarks_matches_the_truth(femurs, side):
    labels, mineral, truth, fits = femurs
    with_true = measure_femur(mineral, labels, FEMUR[side], truth[side]).ct_abmd_g_cm2
    with_auto = measure_femur(mineral, labels, FEMUR[side], fits[side].landmarks).ct_abmd_g_cm2
    assert abs(with_auto / with_true - 1) < 0.003  # measured -0.03 % (left and right)


def test_a_femur_named_on_the_wrong_side_is_refused(femurs):
    labels = femurs[0]
    with pytest.raises(InputError, match=r"named the right femur.*swapped labels"):
        fit_femur_landmarks(labels, FEMUR["left"], "right")


def test_a_femur_cut_off_below_the_trochanters_is_refused(femurs):
    labels, _, truth, _ = femurs
    lt_z = truth["left"].lesser_trochanter_mm[2]
    k_cut = int(np.ceil((lt_z - 15.0 - labels.affine[2, 3]) / labels.affine[2, 2]))
    data = labels.data.copy()
    data[:k_cut] = 0
    with pytest.raises(InputError, match=r"straight shaft|lesser trochanter"):
        fit_femur_landmarks(labels.with_data(data), FEMUR["left"], "left")


def test_not_a_femur_is_refused():
    _, y, x = np.mgrid[0:60, 0:40, 0:40]
    rod = ((x - 20) ** 2 + (y - 20) ** 2 <= 8**2).astype(np.uint8) * 4  # a plain cylinder
    labels = Volume.from_geometry(rod, (1.5, 1.5, 1.5), unit="label", source="rod.nii.gz")
    with pytest.raises(InputError, match=r"rod\.nii\.gz: label 4"):
        fit_femur_landmarks(labels, 4, "left")
    with pytest.raises(InputError, match="label 9 not found"):
        fit_femur_landmarks(labels, 9, "left")


def test_case_landmarks_reports_each_femur_and_writes_qc_pictures(femurs, tmp_path):
    labels = femurs[0]
    data = np.where(labels.data == FEMUR["right"], 0, labels.data)  # no right femur
    found, errors = case_landmarks(
        labels.with_data(data), {"femur_left": 4, "femur_right": 3}, tmp_path, "c1_"
    )
    assert set(found) == {"left"} and "no voxel of femur_right" in errors["right"]
    png = tmp_path / "c1_femur_left_landmarks.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    out = write_qc_png(femurs[3]["right"], labels, tmp_path / "right.png")
    assert out.exists()


def test_cli_writes_the_landmarks_json_and_qc_pictures(femurs, tmp_path):
    from typer.testing import CliRunner

    from xbmd.cli import app
    from xbmd.ct.landmarks import read_landmarks
    from xbmd.io.ct import write_volume

    labels, _, truth, _ = femurs
    write_volume(labels, tmp_path / "labels.nii.gz")
    result = CliRunner().invoke(
        app, ["landmarks", str(tmp_path / "labels.nii.gz"), "--out", str(tmp_path / "lm.json")]
    )
    assert result.exit_code == 0, result.output
    found = read_landmarks(tmp_path / "lm.json")
    assert np.linalg.norm(found["left"].head_center_mm - truth["left"].head_center_mm) < 0.3
    assert (tmp_path / "lm_femur_right_landmarks.png").exists()
    one = labels.with_data(np.where(labels.data == 3, 0, labels.data))
    write_volume(one, tmp_path / "one.nii.gz")
    partial = CliRunner().invoke(
        app, ["landmarks", str(tmp_path / "one.nii.gz"), "--out", str(tmp_path / "one.json")]
    )
    assert partial.exit_code == 2 and "FAILED right femur" in partial.output
    assert set(read_landmarks(tmp_path / "one.json")) == {"left"}
