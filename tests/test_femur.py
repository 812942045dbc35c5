"""BMD measures of a femur (xbmd.ct.femur) on an analytic femur of uniform density."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xbmd.ct.femur import (
    BELOW_LESSER_TROCHANTER_MM,
    measure_femur,
    neutral_projection,
    neutral_rotation,
    proximal_femur_mask,
)
from xbmd.ct.landmarks import FemurLandmarks, read_landmarks, write_landmarks
from xbmd.errors import InputError
from xbmd.volume import Volume

DENSITY = 400.0  # mg/cm3
NECK_SHAFT_DEG = 130.0


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _femur_frame(side: str) -> dict[str, np.ndarray]:
    """Landmarks of a right/left femur in its own neutral frame (head at origin), mm."""
    s = -1.0 if side == "right" else 1.0  # lateral direction along x
    a = np.deg2rad(180.0 - NECK_SHAFT_DEG)  # neck axis angle below horizontal
    neck = np.array([s * np.cos(a), 0.0, -np.sin(a)])
    trochanter = neck * 55.0  # where the neck meets the shaft axis
    return {
        "head": np.zeros(3),
        "neck": neck,
        "shaft_top": trochanter + np.array([0, 0, 15.0]),
        "shaft_bottom": trochanter + np.array([0, 0, -90.0]),
        "lt": trochanter + np.array([-s * 12.0, 0, -25.0]),
    }


def analytic_femur(side="left", rotation_deg=(0.0, 0.0, 0.0), head_mm=(0.0, 0.0, 0.0)):
    """Uniform-density femur (sphere + neck + shaft + lesser trochanter), rotated about the head."""
    f = _femur_frame(side)
    rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    head = np.asarray(head_mm, dtype=float)
    shape = (170, 110, 130)  # (z, y, x) at 1 mm
    origin = head - np.array([65.0, 55.0, 110.0])
    vol = Volume.from_geometry(np.zeros(shape, np.float32), (1, 1, 1), origin, unit="mg/cm3")
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    world = vol.index_to_world(np.stack([i, j, k], -1).reshape(-1, 3).astype(float))
    body = (world - head) @ rot  # rot.T @ (x - head): into the femur frame
    inside = (
        (np.linalg.norm(body, axis=-1) <= 22.0)
        | (_segment_distance(body, f["head"], f["neck"] * 55.0) <= 14.0)
        | (_segment_distance(body, f["shaft_top"], f["shaft_bottom"]) <= 15.0)
        | (np.linalg.norm(body - f["lt"], axis=-1) <= 9.0)
    ).reshape(shape)
    density = vol.with_data(np.where(inside, np.float32(DENSITY), np.float32(0)))
    labels = vol.with_data(inside.astype(np.uint8) * 4, unit="label")
    to_world = lambda p: rot @ p + head  # noqa: E731
    lm = FemurLandmarks(
        side=side,
        head_center_mm=head,
        head_radius_mm=22.0,
        neck_axis=rot @ f["neck"],
        shaft_axis=rot @ np.array([0, 0, 1.0]),
        head_neck_junction_mm=to_world(f["neck"] * 20.0),
        neck_center_mm=to_world(f["neck"] * 32.0),
        lesser_trochanter_mm=to_world(f["lt"]),
        greater_trochanter_mm=to_world(f["shaft_top"]),
    )
    return density, labels, lm


@pytest.mark.parametrize("side", ["left", "right"])
def test_neutral_rotation_maps_axes(side):
    _, _, lm = analytic_femur(side, rotation_deg=(10.0, -7.0, 25.0))
    r = neutral_rotation(lm)
    np.testing.assert_allclose(r @ lm.shaft_axis, [0, 0, 1], atol=1e-9)
    neck = r @ lm.neck_axis
    assert abs(neck[1]) < 1e-9  # in the coronal plane
    assert np.sign(neck[0]) == (1 if side == "left" else -1)  # lateral: +x left, -x right
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)


def test_abmd_matches_axis_aligned_sum():
    """In the neutral pose the AP projection is a plain sum along y: compare the ROI means."""
    density, labels, lm = analytic_femur("left")
    bmd = measure_femur(density, labels, 4, lm)
    proj = density.data.sum(axis=1) * 1e-4  # (z, x) g/cm2 at 1 mm
    x = density.origin_mm[0] + np.arange(proj.shape[1])
    z = density.origin_mm[2] + np.arange(proj.shape[0])
    zz, xx = np.meshgrid(z, x, indexing="ij")
    p = np.stack([xx, zz], -1)
    n = lm.neck_axis[[0, 2]] / np.linalg.norm(lm.neck_axis[[0, 2]])
    roi = (
        (proj > 0)
        & ((p - lm.head_neck_junction_mm[[0, 2]]) @ n >= 0)
        & (zz >= lm.lesser_trochanter_mm[2] - BELOW_LESSER_TROCHANTER_MM)
    )
    # mineral content (g) in the region is insensitive to how edge pixels are counted
    bmc_g = bmd.ct_abmd_g_cm2 * bmd.total_hip_area_cm2
    assert bmc_g == pytest.approx(proj[roi].sum() / 100.0, rel=0.01)
    # the mean depends on the edge: 0.25 mm pixels with a 0.5 mm chord threshold vs 1 mm voxels
    assert bmd.ct_abmd_g_cm2 == pytest.approx(proj[roi].mean(), rel=0.04)
    assert bmd.qct_vbmd_mg_cm3 == pytest.approx(DENSITY)  # uniform: exact
    # a shaft-like cylinder of radius 15 mm at 400 mg/cm3 averages pi*r/2 chord: 0.94 g/cm2
    assert 0.6 < bmd.ct_abmd_g_cm2 < 1.3
    assert 0.5 < bmd.neck_abmd_g_cm2 < 1.3


@pytest.mark.parametrize("side", ["left", "right"])
def test_measures_do_not_depend_on_the_pose_in_the_ct(side):
    density, labels, lm = analytic_femur(side)
    label_id = 4
    base = measure_femur(density, labels, label_id, lm)
    d2, l2, lm2 = analytic_femur(side, rotation_deg=(12.0, -8.0, 20.0))
    rotated = measure_femur(d2, l2, label_id, lm2)
    assert rotated.ct_abmd_g_cm2 == pytest.approx(base.ct_abmd_g_cm2, rel=0.015)
    assert rotated.neck_abmd_g_cm2 == pytest.approx(base.neck_abmd_g_cm2, rel=0.03)
    assert rotated.total_hip_area_cm2 == pytest.approx(base.total_hip_area_cm2, rel=0.02)
    assert rotated.qct_vbmd_mg_cm3 == pytest.approx(DENSITY)


def test_total_hip_region_excludes_head_and_distal_shaft():
    density, labels, lm = analytic_femur("left")
    proj = neutral_projection(density, labels, 4, lm)
    (hr, hc), (lr, _) = proj.geometry.project(
        np.stack([proj.landmarks_room.head_center_mm, proj.landmarks_room.lesser_trochanter_mm])
    )
    assert proj.silhouette[round(hr), round(hc)]
    assert not proj.total_hip_roi[round(hr), round(hc)]  # femoral head excluded
    rows = np.nonzero(proj.total_hip_roi.any(axis=1))[0]
    below_mm = (rows.max() - lr) * proj.geometry.pixel_spacing_mm[0]
    assert below_mm == pytest.approx(BELOW_LESSER_TROCHANTER_MM, abs=1.0)
    assert proj.neck_roi.sum() > 0 and not (proj.neck_roi & ~proj.silhouette).any()


def test_proximal_femur_mask_cuts_below_lesser_trochanter():
    density, labels, lm = analytic_femur("left")
    mask = proximal_femur_mask(labels, 4, lm)
    k = np.nonzero(mask.any(axis=(1, 2)))[0]
    z_low = density.origin_mm[2] + k.min()
    assert z_low == pytest.approx(lm.lesser_trochanter_mm[2] - BELOW_LESSER_TROCHANTER_MM, abs=1)
    assert mask.sum() < (labels.data == 4).sum()


def test_measure_refuses_hu_and_missing_label():
    density, labels, lm = analytic_femur("left")
    with pytest.raises(InputError, match="mg/cm3"):
        measure_femur(density.with_data(density.data, unit="HU"), labels, 4, lm)
    with pytest.raises(InputError, match="not found"):
        measure_femur(density, labels, 3, lm)


def test_landmarks_round_trip(tmp_path):
    _, _, lm = analytic_femur("right", rotation_deg=(3.0, 4.0, 5.0))
    write_landmarks({"right": lm}, tmp_path / "lm.json")
    back = read_landmarks(tmp_path / "lm.json")["right"]
    np.testing.assert_allclose(back.neck_axis, lm.neck_axis, atol=1e-5)
    np.testing.assert_allclose(back.lesser_trochanter_mm, lm.lesser_trochanter_mm, atol=1e-4)
    (tmp_path / "bad.json").write_text('{"femur": {"left": {"side": "left"}}}')
    with pytest.raises(InputError, match="missing landmark"):
        read_landmarks(tmp_path / "bad.json")
