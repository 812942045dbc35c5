"""`xbmd estimate`: crops as `xbmd prepare`, the model grid mapped back, outputs, refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from estimate_helpers import (
    HEADS,
    SIZE,
    SPACING_MM,
    fake_heads,
    fixed_prediction,
    pelvis_image,
)
from xbmd.cli import app
from xbmd.dataset.hip import CROP_SIZE_PX, FIELD_MARGIN_PX, HEAD_POSITION, hip_crop
from xbmd.errors import InputError
from xbmd.estimation.estimator import PF_AREA_RANGE_MM2, Estimator
from xbmd.estimation.result import model_to_image, warp_to_image
from xbmd.geometry import PerspectiveGeometry
from xbmd.model.bundle import load_bundle
from xbmd.similarity import field_mask
from xbmd.tscore import t_score, who_category

runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("side", ["right", "left"])
def test_windowed_crop_equals_filtering_the_whole_radiograph(side):
    """HipCrop.resample filters only its window and takes a precomputed field mask: the numbers
    of filtering the whole radiograph, shutter, image edge and mirror included."""
    rows, cols = 700, 900
    pixels = pelvis_image(rows, cols).astype(np.float32)
    pixels[:, :60] = 0.0  # a collimator shutter at the image's minimum
    geometry = PerspectiveGeometry(1100, 950, (rows, cols), (0.3, 0.25))
    crop = hip_crop(geometry, (150.2, 90.7 if side == "right" else 820.4), side)
    in_field = field_mask(pixels, FIELD_MARGIN_PX)
    values, valid = crop.resample(pixels, in_field)
    # reference: the anti-aliasing filter over the whole radiograph
    sigma = np.maximum(0.0, (np.abs(np.diag(crop.crop_to_image[:, :2])) - 1.0) / 2.0)
    grid = np.stack(np.mgrid[0:CROP_SIZE_PX, 0:CROP_SIZE_PX], axis=-1)
    coords = np.moveaxis(crop.to_image(grid), -1, 0)
    smooth = ndimage.gaussian_filter(pixels, sigma)
    ref = ndimage.map_coordinates(smooth, coords, order=1, mode="nearest")
    assert 0.2 < valid.mean() < 0.9  # the crop is partly outside the image and the field
    np.testing.assert_array_equal(crop.resample(pixels)[1], valid)
    np.testing.assert_allclose(values[valid], ref[valid], atol=1e-3)
    assert np.all(values[~valid] == 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_model_grid_maps_back_onto_the_head_and_mirrors_left_hips(side):
    """A blob at the head of the model's grid lands on the head in the radiograph; a blob on the
    lateral side (canonical: smaller column) lands on the patient's lateral side."""
    geometry = PerspectiveGeometry(1100, 950, (800, 1000), SPACING_MM)
    head = HEADS[side]
    crop = hip_crop(geometry, head, side)
    affine = model_to_image(crop, SIZE)
    f = CROP_SIZE_PX / SIZE
    head_model = (np.array(HEAD_POSITION) * CROP_SIZE_PX - (f - 1) / 2) / f
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]

    def centroid(at):
        blob = np.exp(-((rows - at[0]) ** 2 + (cols - at[1]) ** 2) / (2 * 1.5**2))
        warped = warp_to_image(blob, affine, geometry.size_px)
        rc = np.mgrid[0 : geometry.size_px[0], 0 : geometry.size_px[1]]
        return np.array([(warped * rc[k]).sum() / warped.sum() for k in (0, 1)])

    np.testing.assert_allclose(centroid(head_model), head, atol=0.5)  # image pixels
    lateral = centroid(head_model - [0, 12])
    assert (lateral[1] < head[1]) == (side == "right")  # the patient's right is the image left


# ------------------------------------------------------------------------------------------------
# The command


def test_estimate_writes_results_and_json(images, bundle_path, tmp_path, monkeypatch):
    fake_heads(monkeypatch, HEADS)
    out = tmp_path / "out"
    args = ["estimate", str(images / "pelvis.dcm"), "--model", str(bundle_path)]
    result = runner.invoke(app, [*args, "--out", str(out), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert [r["side"] for r in printed] == ["right", "left"]
    assert "pelvis.dcm  right  BMD" in result.stderr
    for side in ("right", "left"):
        folder = out / "pelvis" / side
        r = json.loads((folder / "result.json").read_text())
        assert r == printed[["right", "left"].index(side)]
        assert r["side"] == side and r["mirrored"] == (side == "left")
        for key in ("bmd_g_cm2", "bmd_drr_g_cm2", "qct_vbmd_mg_cm3", "t_score", "z_score"):
            assert isinstance(r[key], float), key
        assert r["reference"]["name"] == "nhanes3_white_female" and r["reference"]["source"]
        assert r["t_score"] == pytest.approx(t_score(r["bmd_g_cm2"]), abs=1e-3)
        # WHO categories only for confident estimates (70-year-old woman: age and sex known)
        expected = who_category(r["t_score"]) if r["confident"] else None
        assert r["who_category"] == expected and r["category_statement"]
        assert r["research_use_only"] == "research use only, not for diagnosis"
        assert r["patient"] == {"age_years": 70.0, "sex": "F"}
        assert r["head_px"] == pytest.approx(list(HEADS[side]))
        assert r["localiser_confidence"] == pytest.approx(0.9)
        assert np.asarray(r["crop_to_image"]).shape == (2, 3)
        assert (np.asarray(r["crop_to_image"])[1, 1] < 0) == (side == "left")
        assert r["unilateral_crop"] is False and isinstance(r["confident"], bool)
        assert isinstance(r["warnings"], list) and all(isinstance(w, str) for w in r["warnings"])
        assert r["model"]["path"] == str(bundle_path) and r["model"]["xbmd_version"]
        virtual = np.load(r["virtual_xray_npy"])
        assert virtual.dtype == np.float32 and virtual.shape == (SIZE, SIZE)
        assert r["virtual_xray_pixel_mm"] == pytest.approx(192 / SIZE)
        for key in ("virtual_xray_png", "overlay_png", "overview_png"):
            with Image.open(r[key]) as png:
                assert np.asarray(png.convert("L")).std() > 5, key  # not blank
            assert 5_000 < (folder / r[key]).stat().st_size < 200_000, key
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["side"] for row in rows] == ["right", "left"]
    assert float(rows[0]["bmd_g_cm2"]) == pytest.approx(printed[0]["bmd_g_cm2"])


def test_bad_files_are_reported_and_the_batch_goes_on(images, bundle_path, tmp_path, monkeypatch):
    fake_heads(monkeypatch, HEADS)
    out = tmp_path / "out"
    files = [images / n for n in ("corrupt.dcm", "ct.dcm", "missing.dcm", "pelvis.dcm")]
    args = ["estimate", *map(str, files), "--model", str(bundle_path), "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2, result.output
    assert f"{images / 'corrupt.dcm'}: truncated file (pixel data: " in result.stderr
    assert f"{images / 'ct.dcm'}: modality 'CT' is not a plain radiograph" in result.stderr
    assert f"{images / 'missing.dcm'}: no such file" in result.stderr
    printed = json.loads(result.stdout)
    assert [r.get("side") for r in printed] == ["right", "left", None, None, None]
    assert {r["image"] for r in printed[2:]} == {str(f) for f in files[:3]}
    assert (out / "pelvis" / "left" / "result.json").is_file()
    assert len(list(csv.DictReader((out / "failures.csv").open()))) == 3
    none_ok = runner.invoke(app, [*args[:3], "--model", str(bundle_path), "--out", str(out)])
    assert none_ok.exit_code == 1


def test_an_image_without_a_head_is_refused(images, bundle_path, tmp_path, monkeypatch):
    fake_heads(monkeypatch, {})
    args = ["estimate", str(images / "pelvis.dcm"), "--model", str(bundle_path)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "no femoral head found (is this a hip or pelvis X-ray?)" in result.stderr
    assert not (tmp_path / "pelvis").exists()


def test_png_needs_a_pixel_spacing(images, bundle_path, tmp_path, monkeypatch):
    fake_heads(monkeypatch, HEADS)
    args = ["estimate", str(images / "pelvis.png"), "--model", str(bundle_path)]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert refused.exit_code == 1
    assert "no pixel spacing" in refused.stderr and "--pixel-spacing" in refused.stderr
    accepted = runner.invoke(app, [*args, "--out", str(tmp_path), "--pixel-spacing", "0.35"])
    assert accepted.exit_code == 0, accepted.output
    r = json.loads((tmp_path / "pelvis" / "right" / "result.json").read_text())
    assert r["pixel_spacing_mm"] == [0.35, 0.35] and r["spacing_source"] == "user"
    assert r["patient"] == {"age_years": None, "sex": None} and r["z_score"] is None


# ------------------------------------------------------------------------------------------------
# Unilateral crops and the not-a-hip rules (Python API)


def test_small_images_are_unilateral_crops(images, estimator, monkeypatch):
    fake_heads(monkeypatch, {"left": (200.0, 250.0)})
    (r,) = estimator.estimate(images / "hip.dcm")
    assert r.unilateral_crop and r.side == "left" and r.crop.mirrored
    assert any("smaller than a pelvis" in w for w in r.warnings)
    fake_heads(monkeypatch, {})
    with pytest.raises(InputError, match=r"no femoral head found.*--unilateral"):
        estimator.estimate(images / "hip.dcm")
    (r,) = estimator.estimate(images / "hip.dcm", unilateral="right")
    assert r.localiser_confidence is None and not r.confident
    assert r.head_px == pytest.approx((HEAD_POSITION[0] * 500, HEAD_POSITION[1] * 500))
    fake_heads(monkeypatch, {"left": HEADS["left"]})
    (r,) = estimator.estimate(images / "pelvis.dcm")
    assert r.unilateral_crop and any("only the left femoral head" in w for w in r.warnings)


@pytest.mark.parametrize(
    ("area_mm2", "bmd_g_cm2", "confident", "why"),
    [
        (7500.0, 0.85, True, None),
        (0.3 * PF_AREA_RANGE_MM2[0], 0.85, False, "proximal-femur area"),
        (7500.0, 0.9 + 5 * 0.15, False, "beyond 4 SD"),
        (7500.0, -0.2, False, "no T-score"),
    ],
)
def test_implausible_predictions_are_not_confident(
    images, estimator, monkeypatch, area_mm2, bmd_g_cm2, confident, why
):
    fake_heads(monkeypatch, HEADS)
    monkeypatch.setattr(
        estimator.bundle,
        "predict",
        lambda x, v, tta=False, kvp=None: fixed_prediction(area_mm2, bmd_g_cm2),
    )
    results = estimator.estimate(images / "pelvis.dcm")
    for r in results:
        assert r.confident is confident
        assert r.bmd_drr_g_cm2 == pytest.approx(1.2)
        if why:
            assert any(why in w for w in r.warnings), r.warnings
        else:
            assert r.who_category == who_category(t_score(0.85))


def test_a_dicom_of_another_body_part_is_not_confident(images, estimator, monkeypatch):
    fake_heads(monkeypatch, HEADS)
    monkeypatch.setattr(
        estimator.bundle,
        "predict",
        lambda x, v, tta=False, kvp=None: fixed_prediction(7500.0, 0.85),
    )
    for r in estimator.estimate(images / "chest.dcm"):
        assert not r.confident and any("CHEST: not a hip" in w for w in r.warnings)


def test_the_real_localiser_runs_or_refuses_cleanly(images, bundle_path):
    """The untrained localiser finds heads at random or none: results or a clear refusal."""
    estimator = Estimator(load_bundle(bundle_path))
    try:
        results = estimator.estimate(images / "pelvis.dcm")
    except InputError as exc:
        assert "no femoral head found" in str(exc)
    else:
        assert 1 <= len(results) <= 2
        assert all(r.localiser_confidence >= 0.3 for r in results)
