"""Anatomy generator of the virtual cohort: the material maps of one synthetic patient's hips.

``sample_shape`` draws a patient's shape (bone sizes and angles, body build, density levels) from
adult distributions; ``build_anatomy`` turns it into an :class:`~xbmd.synth.model.Anatomy` on a
CT grid: bone mineral (mg/cm3), soft tissue HU, labels, mineral ownership and exact femur
landmarks. This module holds those two and the assembly (grid, joint spaces, textures, merging
the bones); the parts are built elsewhere:

- ``femur_model``: each proximal femur (:class:`FemurModel`, :func:`femur_voxels`);
- ``pelvis_model``: hemipelves, sacrum, coccyx, L4-L5 (:class:`PelvisModel`, :func:`pelvis_voxels`);
- ``soft_tissue``: body outline, fat, muscles, abdominal and pelvic contents
  (:class:`BodyModel`, :func:`soft_tissue_hu`);
- ``anatomy_base``: what they share (materials, fields from primitives, a bone's voxels);
- ``sdf``: the signed-distance functions all bones are made of.

Frames: world = patient LPS, mm; the pelvis centre (midpoint of the femoral head centres) is the
world origin. Each part has its own local frame (see its module).
"""

from __future__ import annotations

import numpy as np

from xbmd.errors import InputError
from xbmd.synth import sdf
from xbmd.synth.anatomy_base import TISSUE_HU, BoneVoxels, _field_distance, build_field
from xbmd.synth.femur_model import FemurModel, femur_voxels
from xbmd.synth.model import DRAW_SIDES, Anatomy, Patient
from xbmd.synth.pelvis_model import PelvisModel, pelvis_voxels
from xbmd.synth.sdf import F32, Field, Grid
from xbmd.synth.soft_tissue import BodyModel, soft_tissue_hu

SHAPE_VERSION = 1


# ----------------------------------------------------------------------------- shape sampling


def _n(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def sample_shape(patient: Patient, rng: np.random.Generator) -> dict:
    """Shape parameters of one patient, drawn from plausible adult distributions.

    Sizes scale with height and sex, the bone architecture (cortical thickness, trabecular density)
    with age, sex and ``patient.bone_z``; body fat with BMI. Left and right femurs share the
    patient's build and differ a little. Returns a JSON-serialisable dict (floats, str, dicts);
    lengths in mm, angles in degrees, densities in mg/cm3, HU for soft tissue.

    Examples
    --------
    >>> from xbmd.synth.population import sample_patients
    >>> patient = sample_patients(1, seed=0)[0]
    >>> shape = sample_shape(patient, np.random.default_rng(patient.seed))
    >>> 110 < shape["femur"]["left"]["neck_shaft_angle_deg"] < 145
    True
    """
    if patient.sex not in ("F", "M"):
        raise InputError(f"patient sex must be 'F' or 'M', not {patient.sex!r}")
    female = patient.sex == "F"
    size = (patient.height_cm / (162.0 if female else 176.0)) ** 0.9 * np.exp(rng.normal(0, 0.03))
    levels = _density_levels(patient, rng)
    femur_mean = _femur_means(rng, female, size, levels)
    femur = {side: _femur_side(rng, femur_mean) for side in DRAW_SIDES}
    return {
        "version": SHAPE_VERSION,
        "sex": patient.sex,
        "size": round(float(size), 4),
        "density": levels,
        "femur": femur,
        "pelvis": _pelvis_shape(rng, female, size, levels),
        "body": _body_shape(rng, patient, size),
    }


def _density_levels(patient: Patient, rng: np.random.Generator) -> dict:
    """Trabecular and cortical levels from age, sex and Z-score (1.0 = healthy 50-year-old)."""
    years = max(patient.age_years - 50.0, 0.0)
    female = patient.sex == "F"
    z = float(np.clip(patient.bone_z, -4.0, 4.0))
    # calibrated so that the DXA-like total-hip aBMD of the build lands near the population's
    # (the final per-side scalar to the target aBMD stays close to 1)
    male = 1.04 if female else 1.11
    trab = male * np.exp(-(0.011 if female else 0.007) * years) * (1.0 + 0.14 * z)
    cort_thick = male * (1.0 - (0.0065 if female else 0.004) * years) * (1.0 + 0.07 * z)
    cort_dens = 1090.0 - (2.2 if female else 1.4) * years + 18.0 * z
    return {
        "trabecular_level": round(float(np.clip(trab * np.exp(rng.normal(0, 0.06)), 0.3, 1.6)), 4),
        "cortical_thickness_level": round(float(np.clip(cort_thick, 0.45, 1.4)), 4),
        "cortical_mg_cm3": round(float(np.clip(cort_dens + rng.normal(0, 15), 820, 1180)), 1),
        "marrow_hu_femur": round(_n(rng, -15.0 - 0.5 * years, 8.0, -60.0, 5.0), 1),
        "marrow_hu_pelvis": round(_n(rng, 12.0 - 0.3 * years, 8.0, -25.0, 30.0), 1),
    }


def _femur_means(rng, female: bool, size: float, levels: dict) -> dict:
    """The patient's femur build, shared by both sides before the side differences."""
    tl, cl = levels["trabecular_level"], levels["cortical_thickness_level"]
    return {
        "head_radius_mm": _n(rng, 22.4 if female else 25.0, 0.9, 19.0, 28.5) * size,
        "neck_shaft_angle_deg": _n(rng, 128.0, 5.0, 114.0, 143.0),
        "anteversion_deg": _n(rng, 12.0, 7.0, -8.0, 35.0),
        "offset_mm": _n(rng, 39.0 if female else 44.0, 3.5, 30.0, 54.0) * size,
        "neck_waist_ratio": _n(rng, 0.68, 0.03, 0.6, 0.76),
        "neck_aspect": _n(rng, 0.84, 0.04, 0.74, 0.95),
        "shaft_radius_mm": _n(rng, 13.4 if female else 14.8, 0.8, 11.5, 17.5) * size,
        "shaft_valgus_deg": _n(rng, 8.0, 1.5, 4.0, 12.0),
        "gt_height_mm": _n(rng, -4.0, 4.0, -14.0, 6.0) * size,
        "lt_below_head_mm": _n(rng, 57.0, 4.0, 46.0, 68.0) * size,
        "cortex_shaft_mm": _n(rng, 6.0, 0.5, 4.2, 7.8) * cl * size,
        "cortex_calcar_mm": _n(rng, 4.6, 0.4, 3.2, 6.0) * cl,
        "cortex_thin_mm": _n(rng, 1.25, 0.12, 0.8, 1.7) * cl,
        "trabecular_head_mg_cm3": _n(rng, 400.0, 25.0, 320.0, 480.0) * tl,
        "trabecular_base_mg_cm3": _n(rng, 215.0, 15.0, 160.0, 270.0) * tl,
    }


def _femur_side(rng: np.random.Generator, mean: dict) -> dict:
    """One side: the patient's build with small left-right differences and its own pose."""
    jitter = {
        "head_radius_mm": 0.25,
        "neck_shaft_angle_deg": 1.5,
        "anteversion_deg": 3.0,
        "offset_mm": 1.0,
        "shaft_radius_mm": 0.25,
        "shaft_valgus_deg": 0.6,
        "gt_height_mm": 1.0,
        "lt_below_head_mm": 1.0,
    }
    side = {k: v + (rng.normal(0, jitter[k]) if k in jitter else 0.0) for k, v in mean.items()}
    side["density_factor"] = float(np.exp(rng.normal(0, 0.025)))
    # supine pose of the leg in the CT: slight flexion, abduction and (mostly external) rotation
    side["pose_flexion_deg"] = _n(rng, 3.0, 3.0, -5.0, 12.0)
    side["pose_abduction_deg"] = _n(rng, 2.0, 2.5, -5.0, 9.0)
    side["pose_internal_rotation_deg"] = _n(rng, -5.0, 6.0, -25.0, 12.0)
    return {k: round(float(v), 4) for k, v in side.items()}


def _pelvis_shape(rng, female: bool, size: float, levels: dict) -> dict:
    """Pelvis sizes and orientation; the female pelvis is wider, shallower, with a wider arch."""
    p = {
        "head_separation_mm": _n(rng, 176.0 if female else 180.0, 6.0, 150.0, 210.0) * size,
        "crest_height_mm": _n(rng, 92.0 if female else 102.0, 5.0, 75.0, 120.0) * size,
        "wing_flare_mm": _n(rng, 50.0 if female else 44.0, 4.0, 32.0, 64.0) * size,
        "inlet_scale": _n(rng, 1.07 if female else 0.97, 0.03, 0.88, 1.18),
        "subpubic_angle_deg": _n(rng, 86.0 if female else 64.0, 6.0, 50.0, 105.0),
        "sacrum_half_width_mm": _n(rng, 53.0 if female else 50.0, 3.0, 42.0, 62.0) * size,
        "sacrum_length_mm": _n(rng, 98.0 if female else 108.0, 6.0, 80.0, 125.0) * size,
        "sacrum_curve_mm": _n(rng, 11.0 if female else 15.0, 3.0, 4.0, 24.0) * size,
        "acetabular_inclination_deg": _n(rng, 42.0, 3.5, 33.0, 52.0),
        "acetabular_anteversion_deg": _n(rng, 19.0 if female else 16.0, 5.0, 5.0, 32.0),
        "joint_space_mm": _n(rng, 3.0, 0.35, 2.2, 3.9),
        "symphysis_gap_mm": _n(rng, 4.5, 0.6, 3.2, 6.5),
        "tilt_deg": _n(rng, 0.0, 4.0, -12.0, 12.0),
        "obliquity_deg": _n(rng, 0.0, 1.0, -3.0, 3.0),
        "rotation_deg": _n(rng, 0.0, 2.0, -6.0, 6.0),
        "cortex_mm": _n(rng, 1.1, 0.12, 0.7, 1.6) * levels["cortical_thickness_level"],
        "trabecular_mg_cm3": _n(rng, 175.0, 15.0, 120.0, 230.0) * levels["trabecular_level"],
    }
    return {k: round(float(v), 4) for k, v in p.items()}


def _body_shape(rng, patient: Patient, size: float) -> dict:
    """Body build: subcutaneous fat from BMI (thicker in women), muscle bulk, organs."""
    female = patient.sex == "F"
    bmi = patient.bmi
    fat = (2.1 * (bmi - 15.5) + (7.0 if female else 0.0)) * np.exp(rng.normal(0, 0.15))
    b = {
        "fat_mm": float(np.clip(fat, 5.0, 55.0)),
        "visceral_mm": float(np.clip((bmi - 22.0) * (2.0 if female else 3.2), 0.0, 60.0)),
        "muscle_scale": _n(rng, (0.94 if female else 1.04) * size, 0.05, 0.75, 1.3),
        "fat_hu": _n(rng, -100.0, 6.0, -115.0, -85.0),
        "muscle_hu": _n(rng, 45.0 - 0.15 * max(patient.age_years - 50, 0), 4.0, 25.0, 60.0),
        "bladder_fill": _n(rng, 1.0, 0.3, 0.45, 1.6),
        "bowel_gas": _n(rng, 0.5, 0.2, 0.1, 1.0),
        "texture_seed": int(rng.integers(0, 2**31 - 1)),
    }
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in b.items()}


# ----------------------------------------------------------------------------- assembly


def _make_grid(spacing_mm, body: BodyModel, pelvis: PelvisModel, femurs: dict) -> Grid:
    """Grid covering the body outline (+5 mm) from 15 mm above the crests to 110 mm below the
    lesser trochanters; world 0 (the pelvis centre) is a voxel centre, centred in x."""
    h = np.asarray(spacing_mm, float)
    half_x, ant, post = body.extent()
    kp = pelvis._keypoints(pelvis.rc["left"])
    crest = max(pelvis.frame.to_world(kp["crest_top"] * [s, 1, 1])[2] for s in (1, -1))
    crest = max(crest, pelvis.frame.to_world(kp["tubercle"])[2]) + 8.0 * pelvis.g
    z_lt = min(float(f.landmarks().lesser_trochanter_mm[2]) for f in femurs.values())
    lo = np.array([-(half_x + 5), -(ant + 5), z_lt - 110.0])
    hi = np.array([half_x + 5, post + 5, crest + 15.0])
    lo_i, hi_i = np.floor(lo / h).astype(int), np.ceil(hi / h).astype(int)
    n = hi_i - lo_i + 1
    return Grid(origin_mm=lo_i * h, spacing_mm=h, shape=(int(n[2]), int(n[1]), int(n[0])))


def carve_joint(pelvis_field: Field, femur_field: Field, gap_mm: float) -> None:
    """Keep the pelvis at least ``gap_mm`` from the femur everywhere (in place): the hip's joint
    space around the head, and clearance for the neck where rim or ischium come close."""
    femur_d = _field_distance(femur_field, pelvis_field.slices)
    np.maximum(pelvis_field.d, F32(gap_mm) - femur_d, out=pelvis_field.d)


def _check_spacing(spacing_mm) -> np.ndarray:
    h = np.asarray(spacing_mm, float)
    if h.shape != (3,) or not np.all(np.isfinite(h)) or np.any(h < 0.25) or np.any(h > 8.0):
        raise InputError(f"spacing_mm must be 3 numbers in [0.25, 8] mm, not {spacing_mm!r}")
    return h


def _textures(rng: np.random.Generator, pv_mm: float, femurs: dict):
    """Trabecular textures: per femur one along the shaft and one along the neck; pelvis one."""

    def lookup(tile):
        return lambda u, v, w: sdf.tile_lookup(tile, pv_mm, u, v, w)

    fem = {}
    for side in DRAW_SIDES:
        along_shaft = sdf.oriented_noise(rng, pv_mm, [1.0, 0.0, 0.0])
        along_neck = sdf.oriented_noise(rng, pv_mm, femurs[side].n)
        fem[side] = (lookup(along_shaft), lookup(along_neck))
    pelvis = sdf.oriented_noise(rng, pv_mm, [0.0, 0.0, 1.0], elongation=1.5)
    return fem, lookup(pelvis)


def build_anatomy(
    patient: Patient,
    shape: dict,
    spacing_mm=(1.0, 1.0, 1.0),
    rng: np.random.Generator | None = None,
) -> Anatomy:
    """Material maps of ``patient`` with ``shape`` (from :func:`sample_shape`) on a CT grid.

    Parameters
    ----------
    patient : the patient (sex, build); ``patient.seed`` seeds the textures if ``rng`` is None.
    shape : shape parameters from :func:`sample_shape`.
    spacing_mm : (x, y, z) voxel spacing in mm (ITK i, j, k order).
    rng : generator for textures and bowel contents (deterministic given its state).

    Returns
    -------
    Anatomy with arrays of shape (K, J, I) on an axis-aligned grid covering the body; the pelvis
    centre (midpoint of the femoral head centres) is the world origin.

    Examples
    --------
    >>> shape = sample_shape(patient, np.random.default_rng(patient.seed))  # doctest: +SKIP
    >>> anatomy = build_anatomy(patient, shape, (1.0, 1.0, 1.0))  # doctest: +SKIP
    """
    h = _check_spacing(spacing_mm)
    if shape.get("version") != SHAPE_VERSION:
        raise InputError(f"shape version {shape.get('version')!r} is not {SHAPE_VERSION}")
    rng = np.random.default_rng(patient.seed) if rng is None else rng
    pv = float(h.mean())
    margin = max(3.0, 1.5 * float(h.max()))
    pelvis = PelvisModel(shape, pv)
    femurs = {s: FemurModel(s, shape["femur"][s], pelvis.head_centre(s)) for s in DRAW_SIDES}
    body = BodyModel(shape, pelvis, femurs)
    grid = _make_grid(h, body, pelvis, femurs)
    fem_tiles, pelvis_tile = _textures(rng, pv, femurs)
    pfield = build_field(grid, pelvis.frame, pelvis.primitives(), margin)
    bones = []
    for side in DRAW_SIDES:
        f = femurs[side]
        field = build_field(grid, f.frame, f.primitives(), margin)
        carve_joint(pfield, field, shape["pelvis"]["joint_space_mm"])
        bones.append(femur_voxels(f, field, pv, shape["density"], fem_tiles[side]))
        del field
    bones.insert(0, pelvis_voxels(pelvis, pfield, pv, shape["density"], pelvis_tile))
    soft = soft_tissue_hu(grid, body, pelvis, pfield, shape, rng)
    del pfield
    mineral, owner, labels = _compose(bones, soft)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(h)
    affine[:3, 3] = grid.origin_mm
    landmarks = {s: femurs[s].landmarks() for s in DRAW_SIDES}
    centre = 0.5 * (landmarks["left"].head_center_mm + landmarks["right"].head_center_mm)
    meta = dict(shape)
    meta["generator"] = {
        "spacing_mm": [float(v) for v in h],
        "tissue_hu": TISSUE_HU,
        "pelvis_includes": "hemipelves, sacrum, coccyx, L5 and lower L4 (split at the midline)",
    }
    return Anatomy(affine, mineral, soft, labels, owner, landmarks, centre, meta)


def _compose(bones: list[BoneVoxels], soft: np.ndarray):
    """Merge bones into (mineral, owner, labels); ``soft`` gets marrow/matrix mixed in (in place).

    A voxel touched by two bones (only possible at a joint at coarse spacing) goes wholly to the
    bone with the larger volume fraction, so no voxel's mineral is shared.
    """
    frac = np.zeros(soft.shape, F32)
    mineral = np.zeros(soft.shape, F32)
    owner = np.zeros(soft.shape, np.uint8)
    bone_soft = np.zeros(soft.shape, F32)
    for bv in bones:
        win = bv.fraction > frac[bv.index]
        idx = tuple(i[win] for i in bv.index)
        frac[idx] = bv.fraction[win]
        mineral[idx] = bv.mineral[win]
        owner[idx] = bv.owner[win]
        bone_soft[idx] = bv.soft_hu[win]
    touched = frac > 0
    soft[touched] = (1 - frac[touched]) * soft[touched] + frac[touched] * bone_soft[touched]
    labels = np.where(frac >= 0.5, owner, 0).astype(np.uint8)
    owner[mineral <= 0] = 0
    return mineral, owner, labels
