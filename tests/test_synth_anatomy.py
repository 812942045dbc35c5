"""Anatomy generator of the virtual cohort: reproducible, anatomically ordered, plausible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xbmd.errors import InputError
from xbmd.synth import anatomy as A
from xbmd.synth import sdf
from xbmd.synth.anatomy_base import _field_distance, build_field
from xbmd.synth.femur_model import FemurModel
from xbmd.synth.model import BONE_LABELS, Patient
from xbmd.synth.pelvis_model import PelvisModel

SPACING = (3.0, 3.0, 3.0)


def patient(sex="F", seed=1, age=70.0, bmi=26.0, z=0.0) -> Patient:
    height = 162.0 if sex == "F" else 176.0
    weight = bmi * (height / 100.0) ** 2
    return Patient(f"T{seed}", age, sex, height, weight, {"left": 0.8, "right": 0.8}, z, seed)


def build(p: Patient, spacing=SPACING):
    shape = A.sample_shape(p, np.random.default_rng(p.seed))
    return shape, A.build_anatomy(p, shape, spacing, np.random.default_rng(p.seed + 1))


@pytest.fixture(scope="module")
def female():
    return build(patient("F", seed=3))


@pytest.fixture(scope="module")
def male():
    return build(patient("M", seed=4, bmi=31.0, z=-1.0))


def world(anatomy, k, j, i) -> np.ndarray:
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    return ijk @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]


def voxel(anatomy, point_mm) -> tuple[int, int, int]:
    i, j, k = np.round(np.linalg.solve(anatomy.affine[:3, :3], point_mm - anatomy.affine[:3, 3]))
    return int(k), int(j), int(i)


def test_deterministic():
    p = patient("F", seed=9)
    shape = A.sample_shape(p, np.random.default_rng(5))
    assert shape == A.sample_shape(p, np.random.default_rng(5))
    a = A.build_anatomy(p, shape, (4.0, 4.0, 4.0), np.random.default_rng(2))
    b = A.build_anatomy(p, shape, (4.0, 4.0, 4.0), np.random.default_rng(2))
    for name in ("mineral_mg_cm3", "soft_tissue_hu", "labels", "mineral_owner"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    np.testing.assert_array_equal(a.affine, b.affine)


def test_patients_differ(female, male):
    (sf, af), (sm, am) = female, male
    assert sf["femur"]["left"] != sm["femur"]["left"]
    assert sf["femur"]["left"]["head_radius_mm"] < sm["femur"]["left"]["head_radius_mm"] + 3
    assert sf["pelvis"]["subpubic_angle_deg"] != sm["pelvis"]["subpubic_angle_deg"]
    assert af.mineral_mg_cm3.shape != am.mineral_mg_cm3.shape
    # left and right femurs of one patient differ a little
    left, right = sf["femur"]["left"], sf["femur"]["right"]
    assert left != right
    assert abs(left["neck_shaft_angle_deg"] - right["neck_shaft_angle_deg"]) < 10


def test_json_serialisable(female):
    shape, anatomy = female
    assert json.loads(json.dumps(shape)) == shape
    json.dumps(anatomy.meta)
    assert anatomy.meta["femur"] == shape["femur"]


def test_grid_and_dtypes(female):
    _, a = female
    assert a.mineral_mg_cm3.dtype == np.float32 and a.soft_tissue_hu.dtype == np.float32
    assert a.labels.dtype == np.uint8 and a.mineral_owner.dtype == np.uint8
    np.testing.assert_allclose(a.affine[:3, :3], np.diag(SPACING))
    assert a.labels.shape == a.mineral_owner.shape == a.soft_tissue_hu.shape
    np.testing.assert_allclose(a.pelvis_center_mm, 0.0, atol=1e-6)
    soft = a.soft_tissue_hu
    # air all around the body in x and y: the grid covers the whole cross-section
    for face in (soft[:, 0], soft[:, -1], soft[:, :, 0], soft[:, :, -1]):
        assert np.all(face == -1000.0)


def test_labels_on_their_sides(female):
    _, a = female
    for name, label in BONE_LABELS.items():
        k, j, i = np.nonzero(a.labels == label)
        assert k.size > 100, name
        x = world(a, k, j, i)[:, 0]
        # patient's left is +x (LPS)
        assert (x.mean() > 0) == name.endswith("left"), name


def test_owner_covers_mineral(female):
    _, a = female
    owned = a.mineral_owner > 0
    assert np.all(a.mineral_mg_cm3[~owned] == 0)
    assert np.all(owned[a.mineral_mg_cm3 > 0])
    assert set(np.unique(a.mineral_owner)) == {0, 1, 2, 3, 4}
    labelled = a.labels > 0
    assert np.all(a.mineral_owner[labelled & owned] == a.labels[labelled & owned])


def test_landmarks(female):
    shape, a = female
    for side in ("left", "right"):
        lm = a.landmarks[side]
        label = BONE_LABELS[f"femur_{side}"]
        assert a.labels[voxel(a, lm.head_center_mm)] == label
        assert a.labels[voxel(a, lm.neck_center_mm)] == label
        k, j, i = np.nonzero(a.mineral_owner == label)
        pts = world(a, k, j, i)
        for tip in (lm.greater_trochanter_mm, lm.lesser_trochanter_mm):
            assert np.min(np.linalg.norm(pts - tip, axis=1)) < 2 * SPACING[0]
        # the neck axis points from the head laterally, the shaft axis proximally
        assert np.sign(lm.neck_axis[0]) == (1 if side == "left" else -1)
        assert lm.shaft_axis[2] > 0.9
        nsa = np.degrees(np.arccos(lm.neck_axis @ lm.shaft_axis))
        assert abs(nsa - shape["femur"][side]["neck_shaft_angle_deg"]) < 1.0
        assert lm.head_radius_mm == shape["femur"][side]["head_radius_mm"]
    centre = 0.5 * (a.landmarks["left"].head_center_mm + a.landmarks["right"].head_center_mm)
    np.testing.assert_allclose(a.pelvis_center_mm, centre)


def test_joint_space_separates_head_and_acetabulum(female):
    """On a fine grid around the hip, the pelvis keeps the sampled joint space from the head."""
    shape, _ = female
    pelvis = PelvisModel(shape, 0.5)
    for side in ("left", "right"):
        femur = FemurModel(side, shape["femur"][side], pelvis.head_centre(side))
        head = femur.landmarks().head_center_mm
        r = femur.p["head_radius_mm"] + 8.0
        grid = sdf.Grid(head - r, np.full(3, 0.5), (int(4 * r),) * 3)
        f_field = build_field(grid, femur.frame, femur.primitives(), 2.0)
        p_field = build_field(grid, pelvis.frame, pelvis.primitives(), 2.0)
        A.carve_joint(p_field, f_field, shape["pelvis"]["joint_space_mm"])
        f_d = _field_distance(f_field, p_field.slices)
        inside_femur = f_d < 0
        assert (p_field.d < 0).sum() > 1000  # the cup is there
        assert p_field.d[inside_femur].min() > shape["pelvis"]["joint_space_mm"] - 0.4


def test_cortical_shaft_ring(female):
    _, a = female
    for side in ("left", "right"):
        lm = a.landmarks[side]
        centre = lm.lesser_trochanter_mm - 60.0 * lm.shaft_axis
        # the canal is at the centroid of the slice's femur voxels
        k = voxel(a, centre)[0]
        sl = a.mineral_owner[k] == BONE_LABELS[f"femur_{side}"]
        jj, ii = np.nonzero(sl)
        cj, ci = round(float(jj.mean())), round(float(ii.mean()))
        ring = a.mineral_mg_cm3[k][sl]
        assert a.mineral_mg_cm3[k, cj, ci] < 150.0  # marrow canal
        assert ring.max() > 700.0  # cortex


def test_mineral_levels(female, male):
    for _, a in (female, male):
        m, owner = a.mineral_mg_cm3, a.mineral_owner
        assert 0.0 <= m.min() and m.max() < 1250.0
        for label in BONE_LABELS.values():
            assert m[owner == label].max() > 700.0  # cortical bone, diluted at 3 mm
        for side in ("left", "right"):
            lm = a.landmarks[side]
            k, j, i = voxel(a, lm.head_center_mm)
            head = m[k - 2 : k + 3, j - 2 : j + 3, i - 2 : i + 3]
            assert 100.0 < np.median(head) < 550.0  # trabecular head


def test_soft_tissue(female, male):
    for shape, a in (female, male):
        hu = a.soft_tissue_hu
        assert hu.min() >= -1000.0 and hu.max() < 200.0
        assert np.any(np.abs(hu - shape["body"]["fat_hu"]) < 1.0)
        assert np.any(np.abs(hu - shape["body"]["muscle_hu"]) < 1.0)
        assert np.any((hu > -1000) & (hu < -500))  # bowel gas or edges


def test_fatter_patients_are_wider():
    thin = build(patient("F", seed=5, bmi=20.0), (4.0, 4.0, 4.0))[1]
    fat = build(patient("F", seed=5, bmi=36.0), (4.0, 4.0, 4.0))[1]
    assert fat.soft_tissue_hu.shape[2] > thin.soft_tissue_hu.shape[2]


def test_bad_input():
    p = patient()
    shape = A.sample_shape(p, np.random.default_rng(0))
    with pytest.raises(InputError, match="spacing_mm"):
        A.build_anatomy(p, shape, (0.0, 1.0, 1.0))
    with pytest.raises(InputError, match="sex"):
        A.sample_shape(Patient("x", 60, "X", 170, 70, {}, 0.0, 1), np.random.default_rng(0))
