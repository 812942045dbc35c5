"""xbmd estimate: refusals, the quality gate, orientation, the clinical statement and batches.

Reuses test_estimate.py's fixtures: a synthetic 12-bit pelvis, an untrained bundle whose
predictions are replaced by fixed ones, and fixed head detections.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from estimate_helpers import HEADS, SPACING_MM, fake_heads, fixed_prediction, pelvis_image
from xbmd.cli import app
from xbmd.errors import InputError
from xbmd.estimation import orientation as orientation_module
from xbmd.estimation.clinical import clinical_scores
from xbmd.estimation.gate import JPEG_SAFE_QUALITY
from xbmd.io.xray import read_xray
from xbmd.io.xray_write import write_xray_dicom
from xbmd.model.localiser import HeadDetection

runner = CliRunner()


@pytest.fixture
def plausible(estimator, monkeypatch):
    """The estimator with a plausible fixed prediction (7500 mm2 region, 0.85 g/cm2)."""
    fake_heads(monkeypatch, HEADS)
    monkeypatch.setattr(
        estimator.bundle,
        "predict",
        lambda x, v, tta=False, kvp=None: fixed_prediction(7500.0, 0.85),
    )
    return estimator


def _dicom(folder, name: str, pixels=None, **extra) -> object:
    path = folder / name
    write_xray_dicom(
        pelvis_image() if pixels is None else pixels,
        path,
        pixel_spacing_mm=SPACING_MM,
        sdd_mm=1100,
        sod_mm=950,
        patient_age_years=70,
        patient_sex="F",
        bits_stored=12,
        extra=extra or None,
    )
    return path


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [0.01, 2.5, 50.0])
def test_absurd_pixel_spacing_is_refused(plausible, tmp_path, spacing):
    path = tmp_path / "p.dcm"
    write_xray_dicom(pelvis_image(), path, pixel_spacing_mm=spacing, bits_stored=12)
    with pytest.raises(InputError, match=r"p\.dcm: pixel spacing .* outside the 0\.05-2 mm"):
        plausible.estimate(path)


def test_a_binary_image_is_refused(plausible, tmp_path):
    binary = np.where(pelvis_image() > 2000, 4000, 0).astype(np.uint16)
    with pytest.raises(InputError, match="2 distinct grey values"):
        plausible.estimate(_dicom(tmp_path, "b.dcm", binary))


def test_absurd_geometry_is_refused(plausible, tmp_path):
    path = tmp_path / "g.dcm"
    write_xray_dicom(pelvis_image(), path, pixel_spacing_mm=SPACING_MM, sdd_mm=30000, sod_mm=100)
    with pytest.raises(InputError, match="source-detector distance 30000 mm"):
        plausible.estimate(path)


# ---- the gate ----------------------------------------------------------------------------------


def test_a_clean_radiograph_is_confident_with_a_category(plausible, images):
    for r in plausible.estimate(images / "pelvis.dcm"):
        assert r.confident and r.gate == [] and r.who_category == "normal"  # T = -0.75
        assert r.category_statement.startswith("normal")


def test_pixel_spacing_only_is_not_confident(plausible, tmp_path):
    path = _dicom(tmp_path, "ps.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = ds.ImagerPixelSpacing
    del ds.ImagerPixelSpacing
    ds.save_as(path)
    for r in plausible.estimate(path):
        assert not r.confident and r.who_category is None
        assert any("Pixel Spacing (0028,0030) only" in g for g in r.gate)


def test_heads_too_far_apart_for_the_spacing_are_not_confident(plausible, tmp_path):
    path = tmp_path / "far.dcm"
    # 1 mm pixels: the heads, 400 pixels apart, would be 400 mm apart
    write_xray_dicom(pelvis_image(), path, pixel_spacing_mm=1.0, bits_stored=12)
    for r in plausible.estimate(path):
        assert any("femoral heads are 402 mm apart" in g for g in r.gate), r.gate


def test_low_jpeg_quality_is_not_confident_and_high_is(plausible, tmp_path):
    pelvis = (pelvis_image() / 16).astype(np.uint8)
    for quality in (JPEG_SAFE_QUALITY - 20, 95):
        path = tmp_path / f"q{quality}.jpg"
        Image.fromarray(pelvis).save(path, quality=quality)
        assert read_xray(path).meta["jpeg_quality"] == quality
        (r, _) = plausible.estimate(path, pixel_spacing_mm=SPACING_MM, age_years=70, sex="F")
        low = quality < JPEG_SAFE_QUALITY
        assert any("JPEG-compressed" in g for g in r.gate) is low


def test_laterality_contradicting_a_one_hip_image_is_not_confident(
    plausible, tmp_path, monkeypatch
):
    path = _dicom(tmp_path, "lat.dcm", ImageLaterality="L")
    fake_heads(monkeypatch, {"right": HEADS["right"]})
    (r,) = plausible.estimate(path)
    assert r.side == "right" and any("Image Laterality L" in g for g in r.gate)


# ---- orientation -------------------------------------------------------------------------------


def test_a_mirrored_file_with_its_tag_gives_the_sides_right(plausible, tmp_path, monkeypatch):
    """Stored mirrored, tagged so: read back to the standard display, sides where they are."""
    pelvis = pelvis_image()
    path = _dicom(tmp_path, "m.dcm", pelvis[:, ::-1], PatientOrientation=["R", "F"])
    xray = read_xray(path)
    np.testing.assert_array_equal(xray.pixels, read_xray(_dicom(tmp_path, "s.dcm", pelvis)).pixels)
    assert "mirrored left-right" in xray.meta["reoriented"]


def test_an_upside_down_image_is_turned_and_not_confident(plausible, images, tmp_path, monkeypatch):
    """No tag (PNG): the localiser is surest upright; the estimate is made upright, its sides
    uncertain, and never confident."""
    flipped = np.rot90(pelvis_image(), 2)
    path = tmp_path / "turned.png"
    Image.fromarray(flipped.astype(np.uint16)).save(path)
    upright = {s: HeadDetection(s, *rc, 0.9) for s, rc in HEADS.items()}

    def locate(model, pixels):  # confident only on the upright image
        is_upright = np.array_equal(pixels, pelvis_image().astype(np.float32))
        return list(upright.values()) if is_upright else [HeadDetection("right", 10, 10, 0.55)]

    monkeypatch.setattr(orientation_module, "locate_heads", locate)
    results = plausible.estimate(path, pixel_spacing_mm=SPACING_MM, age_years=70, sex="F")
    assert [r.side for r in results] == ["right", "left"]
    for r in results:
        assert not r.confident and any("turned 180 degrees" in g for g in r.gate)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray((pelvis_image() / 16).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 3  # stored turned 180 degrees
    path = tmp_path / "exif.jpg"
    image.rotate(180).save(path, quality=95, exif=exif)
    xray = read_xray(path)
    assert "turned 180 degrees" in xray.meta["reoriented"]
    assert np.corrcoef(xray.pixels.ravel(), pelvis_image().ravel())[0, 1] > 0.99


# ---- what the clinician reads ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "sex", "category", "statement"),
    [
        (70, "F", "osteopenia", "osteopenia; the 95 % interval spans normal to osteopenia"),
        (40, "F", None, "within the expected range for age"),
        (None, "F", None, "need the patient's age and sex"),
        (70, None, None, "need the patient's age and sex"),
    ],
)
def test_who_category_only_from_50_with_sex_known(age, sex, category, statement):
    scores, _ = clinical_scores(0.80, (0.72, 0.88), sex, age, "nhanes3_white_female", True)
    assert scores["who_category"] == category and statement in scores["category_statement"]
    assert scores["t_score"] == pytest.approx((0.80 - 0.942) / 0.122, abs=1e-6)
    lo, hi = scores["t_score_interval"]
    assert lo < scores["t_score"] < hi


def test_no_category_when_not_confident():
    scores, _ = clinical_scores(0.80, None, "F", 70, "nhanes3_white_female", False)
    assert scores["who_category"] is None and "not confident" in scores["category_statement"]


# ---- batches -----------------------------------------------------------------------------------


def test_a_batch_writes_as_it_goes_skips_repeats_and_replaces_stale_files(
    images, bundle_path, tmp_path, monkeypatch
):
    fake_heads(monkeypatch, HEADS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "failures.csv").write_text("image,error\nold.dcm,from another run\n")
    odd = tmp_path / ".." / tmp_path.name / "odd ..name.dcm"
    (tmp_path / "odd ..name.dcm").write_bytes((images / "pelvis.dcm").read_bytes())
    args = [str(images / "pelvis.dcm"), str(images / "pelvis.dcm"), str(odd)]
    result = runner.invoke(
        app, ["estimate", *args, "--model", str(bundle_path), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert not (out / "failures.csv").exists()  # the previous run's is gone
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    reasons = sorted(row["reason"] for row in skipped)
    assert reasons[0].startswith("the same DICOM image (SOP Instance UID)")
    assert reasons[1].startswith("the same file again")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all((out / "pelvis" / s / "result.json").is_file() for s in HEADS)
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))


def test_an_output_path_that_is_a_file_is_one_line(images, bundle_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [str(images / "pelvis.dcm"), "--model", str(bundle_path), "--out", str(blocker / "o")]
    result = runner.invoke(app, ["estimate", *args])
    assert result.exit_code == 1 and "is a file" in result.output
    assert "Traceback" not in result.output


def test_result_json_says_research_use_only(plausible, images, tmp_path):
    from xbmd.estimation.output import write_results

    results = plausible.estimate(images / "pelvis.dcm")
    write_results(results, tmp_path, "p", figures=False)
    doc = json.loads((tmp_path / "p" / "right" / "result.json").read_text())
    assert doc["research_use_only"] == "research use only, not for diagnosis"
    assert doc["confident"] is True and doc["gate"] == []


def test_jpeg_in_dicom_quality_is_read(tmp_path):
    """A JPEG Baseline DICOM: its quality comes from the stream's quantisation table."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pelvis = (pelvis_image() / 16).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pelvis).save(buffer, format="JPEG", quality=30)
    path = _dicom(tmp_path, "j.dcm", pelvis.astype(np.uint16))
    ds = pydicom.dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    assert read_xray(path).meta["jpeg_quality"] == 30
