"""Anatomy generator of the virtual cohort: the material maps of one synthetic patient's hips.

``sample_shape`` draws a patient's shape (bone sizes and angles, body build, density levels) from
adult distributions; ``build_anatomy`` turns it into an :class:`~xbmd.synth.model.Anatomy` on a
CT grid: bone mineral (mg/cm3), soft tissue HU, labels, mineral ownership and exact femur
landmarks.

Bones are smooth signed-distance functions (``xbmd.synth.sdf``): femurs from a spherical head, an
elliptic waisted neck, a flaring shaft, trochanters and crests fused by smooth unions; the pelvis
from iliac wings (curved plates with a thick crest), acetabular cups, rami tubes around the
obturator foramina, a sacrum plate with foramina and the L4-L5 vertebrae (part of the pelvis
labels, split at the midline like the sacrum). Mineral follows depth below the surface: a cortex
whose thickness varies by region, and trabecular bone with region-dependent density (compressive
and tensile groups, Ward's triangle, fatty shaft canal) and oriented band-pass texture.

Frames: world = patient LPS, mm; the pelvis centre (midpoint of the femoral head centres) is the
world origin. Femur-local coordinates (s, m, a) = (along the shaft proximally, medial, anterior),
origin where the neck axis meets the shaft axis; the right femur's frame is the mirror image of
the left one's.
"""

from __future__ import annotations

import itertools

import numpy as np

from xbmd.ct.landmarks import FemurLandmarks
from xbmd.errors import InputError
from xbmd.geometry import RigidTransform, femur_rotation_deg
from xbmd.synth import sdf
from xbmd.synth.model import BONE_LABELS, DRAW_SIDES, Anatomy, Patient
from xbmd.synth.sdf import F32, Field, Frame, Grid

#: +1 for the patient's left (+x in LPS), -1 for the right.
SIDE_SIGN = {"left": 1.0, "right": -1.0}
#: Soft-tissue HU (without mineral) of the generator's materials.
TISSUE_HU = {
    "air": -1000.0,
    "skin": 30.0,
    "muscle": 45.0,
    "cartilage": 50.0,
    "urine": 8.0,
    "organ": 40.0,
    "bowel_wall": 35.0,
    "cortex_matrix": 60.0,
}
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
    >>> shape = sample_shape(patient, np.random.default_rng(patient.seed))  # doctest: +SKIP
    >>> shape["femur"]["left"]["neck_shaft_angle_deg"]
    127.4
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


# ----------------------------------------------------------------------------- femur


class FemurModel:
    """One proximal femur: its frame, its construction points and its SDF primitives.

    All construction points are femur-local (s, m, a) mm (see the module docstring).
    """

    def __init__(self, side: str, p: dict, head_world: np.ndarray) -> None:
        self.side, self.p = side, p
        nsa, av = np.radians(p["neck_shaft_angle_deg"]), np.radians(p["anteversion_deg"])
        phi = np.pi - nsa
        towards_head = np.array([np.cos(phi), np.sin(phi) * np.cos(av), np.sin(phi) * np.sin(av)])
        self.neck_length = p["offset_mm"] / np.sin(phi)  # head centre to the shaft axis
        self.head = self.neck_length * towards_head
        self.n = -towards_head  # neck axis, head -> trochanters
        self.e_sup = sdf.unit(np.array([1.0, 0, 0]) - self.n[0] * self.n)
        self.e_ant = np.cross(self.n, self.e_sup)
        self.e_ant *= np.sign(self.e_ant[2])
        self.frame = self._frame(head_world)
        self._derive()

    def _frame(self, head_world: np.ndarray) -> Frame:
        """World frame from the shaft valgus and the supine pose of the leg about the head."""
        lat, beta = SIDE_SIGN[self.side], np.radians(self.p["shaft_valgus_deg"])
        axes = np.array(
            [
                [lat * np.sin(beta), 0.0, np.cos(beta)],  # shaft, proximally
                [-lat * np.cos(beta), 0.0, np.sin(beta)],  # medial
                [0.0, -1.0, 0.0],  # anterior
            ]
        )
        rot = femur_rotation_deg(
            self.side,
            self.p["pose_flexion_deg"],
            self.p["pose_abduction_deg"],
            self.p["pose_internal_rotation_deg"],
        )
        axes = axes @ RigidTransform(rotation_deg=rot).rotation_matrix.T
        origin = np.asarray(head_world, float) - self.head @ axes
        return Frame(origin=origin, axes=axes)

    def _derive(self) -> None:
        """Neck profile, trochanters and the other construction points."""
        p, rh, r0 = self.p, self.p["head_radius_mm"], self.p["shaft_radius_mm"]
        self.b_sup = p["neck_waist_ratio"] * rh
        self.b_ant = p["neck_aspect"] * self.b_sup
        self.t_hnj = float(np.sqrt(rh**2 - (0.5 * (self.b_sup + self.b_ant)) ** 2))
        self.t_nc = self.t_hnj + 0.3 * (self.neck_length - self.t_hnj)
        self.t_end = self.neck_length + 6.0
        s_head = self.head[0]
        self.s_top = 8.0
        self.s_lt = s_head - p["lt_below_head_mm"]
        self.s_bottom = self.s_lt - 150.0
        self.gt_r = np.array([1.45, 0.9, 1.3]) * r0
        # the tip (top of the posterosuperior hook) lies gt_height_mm above the head centre
        self.gt_c = np.array([s_head + p["gt_height_mm"] - 1.05 * self.gt_r[0], 0.0, -0.25 * r0])
        self.gt_c[1] = -1.83 * r0 - 2.0 + self.gt_r[1]
        self.gt_hook_r = self.gt_r * np.array([0.55, 0.6, 0.5])
        self.gt_hook_c = self.gt_c + self.gt_r * np.array([0.5, 0.45, -0.45])
        lt_base = np.array([self.s_lt + 10.0, 0.3 * r0, -0.45 * r0])
        lt_tip = np.array([self.s_lt, 1.45 * r0, -0.95 * r0])
        self.lt = (np.array([lt_base, lt_tip]), np.array([0.95, 0.45]) * r0)
        self.lt_tip = lt_tip + 0.45 * r0 * sdf.unit(lt_tip - lt_base)
        gc, gr = self.gt_c, self.gt_r
        crest = [
            [gc[0] - 0.2 * gr[0], gc[1], gc[2] - 0.75 * gr[2]],
            [self.s_lt + 5, 0.35 * r0, -0.75 * r0],
        ]
        line = [
            [gc[0] - 0.1 * gr[0], gc[1] + 0.1 * gr[1], 0.62 * gr[2]],
            [self.s_lt + 2, 0.6 * r0, 0.55 * r0],
        ]
        aspera = [[self.s_lt - 10, 0.1 * r0, -0.85 * r0], [self.s_bottom, 0.0, -0.9 * r0]]
        self.ridges = [
            (np.array(crest), np.array([0.38, 0.32]) * r0, 4.0),
            (np.array(line), np.array([0.2, 0.2]) * r0, 3.0),
            (np.array(aspera), np.array([0.22, 0.22]) * r0, 3.0),
        ]
        self.fovea = self.head + (rh + 1.5) * sdf.unit([-0.55, 0.8, -0.2])
        h, n, up = self.head, self.n, self.e_sup
        self.compressive = np.array(
            [
                h + 0.75 * rh * sdf.unit([0.95, -0.3, 0.0]),
                h + 0.2 * self.t_nc * n - 0.2 * self.b_sup * up,
                h + self.t_nc * n - 0.55 * self.b_sup * up,
                [self.s_lt + 10.0, 0.75 * r0, 0.0],
            ]
        )
        self.tensile = np.array(
            [
                h + 0.7 * rh * sdf.unit([-0.7, 0.7, 0.0]),
                h + 0.3 * self.t_nc * n + 0.35 * self.b_sup * up,
                h + self.t_nc * n + 0.6 * self.b_sup * up,
                h + self.neck_length * n + 0.8 * self.b_sup * up,
                [gc[0] - 0.6 * gr[0], -1.5 * r0, 0.0],
            ]
        )
        self.calcar = np.array(
            [h + self.t_nc * n - 0.95 * self.b_sup * up, [self.s_lt - 5, 0.95 * r0, 0]]
        )
        self.ward = h + (self.t_nc + 8.0) * n - 0.1 * self.b_sup * up

    # -- SDF -------------------------------------------------------------------------------

    def _neck(self, s, m, a):
        ps, pm, pa = s - F32(self.head[0]), m - F32(self.head[1]), a - F32(self.head[2])
        n, up, ant = (x.astype(F32) for x in (self.n, self.e_sup, self.e_ant))
        t = ps * n[0] + pm * n[1] + pa * n[2]
        v1 = ps * up[0] + pm * up[1] + pa * up[2]
        v2 = ps * ant[0] + pm * ant[1] + pa * ant[2]
        flare = sdf.smoothstep(self.t_nc, self.t_end, t) ** 2
        headward = sdf.smoothstep(self.t_nc, self.t_nc - 18.0, t)
        b1 = F32(self.b_sup) * (1.0 + 0.62 * flare + 0.12 * headward)
        b2 = F32(self.b_ant) * (1.0 + 0.38 * flare + 0.12 * headward)
        # the base flares more inferiorly: the calcar arch into the medial shaft
        d = sdf.ellipse(v1 + F32(0.28 * self.b_sup) * flare, v2, b1, b2)
        return sdf.smax(d, np.maximum(t - F32(self.t_end), -t), 3.0)

    def _shaft(self, s, m, a):
        r0 = self.p["shaft_radius_mm"]
        top = sdf.smoothstep(self.s_lt - 15.0, self.s_top, s)
        d = sdf.ellipse(
            m + F32(0.28 * r0) * top, a, r0 * (1.0 + 0.55 * top), 0.9 * r0 * (1.0 + 0.4 * top)
        )
        return sdf.smax(d, s - F32(self.s_top), 8.0)

    def primitives(self) -> list[tuple]:
        """(fn, lo, hi, op, k) in construction order (local boxes, mm)."""
        rh, r0 = self.p["head_radius_mm"], self.p["shaft_radius_mm"]
        h = self.head
        neck_pts = np.array([h, h + self.t_end * self.n])
        neck_r = 1.75 * self.b_sup
        wide = 1.9 * r0
        prims = [
            (
                self._shaft,
                [self.s_bottom, -wide - 3, -wide],
                [self.s_top + 3, wide, wide],
                "union",
                0.0,
            ),
            (self._neck, *sdf.tube_box(neck_pts, [neck_r, neck_r]), "union", 0.55 * r0),
            (
                self._ellipsoid(self.gt_c, self.gt_r),
                self.gt_c - self.gt_r,
                self.gt_c + self.gt_r,
                "union",
                5.0,
            ),
            (
                self._ellipsoid(self.gt_hook_c, self.gt_hook_r),
                self.gt_hook_c - self.gt_hook_r,
                self.gt_hook_c + self.gt_hook_r,
                "union",
                4.0,
            ),
            (self._tube(*self.lt), *sdf.tube_box(*self.lt), "union", 5.0),
        ]
        for pts, radii, k in self.ridges:
            prims.append((self._tube(pts, radii), *sdf.tube_box(pts, radii), "union", k))
        prims.append((self._ellipsoid(h, [rh] * 3), h - rh, h + rh, "union", 2.5))
        fr = 0.22 * rh
        prims.append(
            (
                self._ellipsoid(self.fovea, [fr] * 3),
                self.fovea - fr,
                self.fovea + fr,
                "subtract",
                1.0,
            )
        )
        return prims

    @staticmethod
    def _ellipsoid(c, r):
        return lambda u, v, w: sdf.ellipsoid(u, v, w, c, r)

    @staticmethod
    def _tube(points, radii):
        return sdf.tube_parts(points, radii)

    # -- landmarks ---------------------------------------------------------------------------

    def landmarks(self) -> FemurLandmarks:
        """Exact landmarks (LPS mm) of this construction."""
        f = self.frame
        gt_top = self.gt_hook_c + np.array([self.gt_hook_r[0], 0.0, 0.0])
        return FemurLandmarks(
            side=self.side,
            head_center_mm=f.to_world(self.head),
            head_radius_mm=self.p["head_radius_mm"],
            neck_axis=self.n @ f.axes,
            shaft_axis=f.axes[0],
            head_neck_junction_mm=f.to_world(self.head + self.t_hnj * self.n),
            neck_center_mm=f.to_world(self.head + self.t_nc * self.n),
            lesser_trochanter_mm=f.to_world(self.lt_tip),
            greater_trochanter_mm=f.to_world(gt_top),
            extra={"neck_length_mm": round(float(self.neck_length), 3)},
        )


class BoneVoxels:
    """The voxels of one bone field that hold some bone, as flat arrays.

    index : (k, j, i) grid indices; fraction : bone volume fraction (0, 1]; mineral : mg/cm3 of
    the whole voxel; soft_hu : HU of the bone's non-mineral part (marrow, matrix); owner : the
    BONE_LABELS id per voxel.
    """

    def __init__(self, field: Field, pv_mm: float) -> None:
        kk, jj, ii = np.nonzero(field.d < 0.5 * pv_mm)
        self.d = field.d[kk, jj, ii]
        lo = field.index_lo
        self.index = (kk + lo[2], jj + lo[1], ii + lo[0])
        g = field.grid
        world = np.stack(
            [g.axis_mm(0)[self.index[2]], g.axis_mm(1)[self.index[1]], g.axis_mm(2)[self.index[0]]],
            axis=1,
        )
        self.local = field.frame.to_local(world).astype(F32).T  # (3, n)
        self.fraction = np.clip(0.5 - self.d / F32(pv_mm), 0.0, 1.0).astype(F32)
        self.mineral = np.zeros_like(self.d)
        self.soft_hu = np.zeros_like(self.d)
        self.owner = np.zeros(self.d.shape, np.uint8)


def _points_distance(points, u, v, w) -> np.ndarray:
    """Distance (mm) to the polyline through ``points``."""
    return sdf.tube(u, v, w, points, np.zeros(len(points)))


def _cortex_fraction(depth, thickness, pv_mm) -> np.ndarray:
    """Fraction of a voxel at ``depth`` below the surface that lies in a cortex ``thickness``."""
    return np.clip((thickness - np.maximum(depth, 0.0)) / F32(pv_mm) + 0.5, 0.0, 1.0)


def femur_voxels(model: FemurModel, field: Field, pv_mm: float, dens: dict, tiles) -> BoneVoxels:
    """Mineral (mg/cm3) and marrow HU of a femur's voxels from its SDF ``field``.

    Cortex thickness: thin (~1 mm) around head, neck and trochanters, thick in the inferior
    neck and calcar, thickening down the shaft. Trabecular density: densest in the head and the
    compressive group, the tensile group arching laterally, Ward's triangle and the greater
    trochanter sparser, nothing in the shaft canal below the lesser trochanter.
    """
    bv = BoneVoxels(field, pv_mm)
    p = model.p
    s, m, a = bv.local
    depth = -bv.d
    h = model.head.astype(F32)
    t = (s - h[0]) * F32(model.n[0]) + (m - h[1]) * F32(model.n[1]) + (a - h[2]) * F32(model.n[2])
    shaft_w = sdf.smoothstep(model.s_lt + 8.0, model.s_lt - 40.0, s)
    calcar = np.exp(-0.5 * (_points_distance(model.calcar, s, m, a) / 7.0) ** 2)
    thick = (
        p["cortex_thin_mm"]
        + (p["cortex_shaft_mm"] - p["cortex_thin_mm"]) * shaft_w
        + (p["cortex_calcar_mm"] - p["cortex_thin_mm"]) * calcar * (1.0 - shaft_w)
    )
    cort = _cortex_fraction(depth, thick, pv_mm)
    head_w = sdf.smoothstep(model.t_hnj + 3.0, model.t_hnj - 8.0, t)
    comp = np.exp(-((_points_distance(model.compressive, s, m, a) / (0.5 * model.b_sup)) ** 2))
    tens = np.exp(-((_points_distance(model.tensile, s, m, a) / (0.3 * model.b_sup)) ** 2))
    wd2 = sum((c - F32(w)) ** 2 for c, w in zip((s, m, a), model.ward, strict=True))
    ward = np.exp(-0.5 * wd2 / 64.0)
    gt_in = sdf.ellipsoid(s, m, a, model.gt_c, model.gt_r) / F32(model.gt_r.min())
    gt_w = sdf.smoothstep(0.0, -0.5, gt_in)
    canal = sdf.smoothstep(model.s_lt + 5.0, model.s_lt - 30.0, s)
    endosteal = np.exp(-np.maximum(depth - thick, 0.0) / 2.5)
    base, head = p["trabecular_base_mg_cm3"], p["trabecular_head_mg_cm3"]
    trab = (
        base * (1.0 - 0.55 * ward) * (1.0 - 0.35 * gt_w)
        + (head - base) * head_w
        + 1.2 * base * comp * (1.0 - 0.5 * head_w)
        + 0.6 * base * tens
        + 0.5 * base * np.exp(-(((t - (model.t_hnj - 3.0)) / 1.2) ** 2)) * head_w  # physeal scar
    ) * (1.0 - canal * (1.0 - 0.5 * endosteal))
    along_neck = np.clip(tens + 0.6 * sdf.smoothstep(model.t_end, model.t_nc, t) * (1 - comp), 0, 1)
    texture = (1.0 - along_neck) * tiles[0](s, m, a) + along_neck * tiles[1](s, m, a)
    trab = np.maximum(trab * (1.0 + 0.45 * texture), 0.0)
    cort_dens = dens["cortical_mg_cm3"] * (0.85 + 0.15 * shaft_w)
    scale = F32(p["density_factor"])
    bv.mineral = (bv.fraction * (cort * cort_dens + (1.0 - cort) * trab) * scale).astype(F32)
    marrow = dens["marrow_hu_femur"] - 25.0 * canal
    bv.soft_hu = (cort * TISSUE_HU["cortex_matrix"] + (1.0 - cort) * marrow).astype(F32)
    bv.owner[:] = BONE_LABELS[f"femur_{model.side}"]
    return bv


def build_field(grid: Grid, frame: Frame, prims: list[tuple], margin_mm: float) -> Field:
    """Evaluate primitives ``(fn, lo, hi, op, k)`` in order into one SDF field."""
    lo = np.min([np.asarray(q[1], float) for q in prims], axis=0)
    hi = np.max([np.asarray(q[2], float) for q in prims], axis=0)
    field = Field(grid, frame, lo, hi, margin_mm)
    for fn, plo, phi, op, k, *gap in prims:
        field.apply(fn, plo, phi, op, k, *gap)
    return field


# ----------------------------------------------------------------------------- pelvis


def _mirror(fn):
    return lambda u, v, w: fn(-u, v, w)


def _mirror_box(lo, hi):
    return np.array([-hi[0], lo[1], lo[2]]), np.array([-lo[0], hi[1], hi[2]])


def _quadratic_fit(u, v, w, ridge: float = 1e-2):
    """Least-squares w = c . (1, u, v, u^2, uv, v^2), u and v in units of 100 mm."""
    a = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)
    c = np.linalg.solve(a.T @ a + ridge * np.eye(6), a.T @ w)
    return lambda uu, vv: (
        c[0] + c[1] * uu + c[2] * vv + c[3] * uu * uu + c[4] * uu * vv + c[5] * vv * vv
    )


class PelvisModel:
    """Both hemipelves, sacrum, coccyx and L4-L5 in the pelvis frame (left side built, mirrored).

    Pelvis-local coordinates: origin at the pelvis centre, x towards the left head centre, y
    posterior, z superior (the world axes before the pelvis's tilt, obliquity and rotation).
    """

    def __init__(self, shape: dict, pv_mm: float) -> None:
        self.p, self.g, self.step = shape["pelvis"], shape["size"], max(min(pv_mm, 2.0), 0.5)
        self.hx = 0.5 * self.p["head_separation_mm"]
        self.rc = {
            s: shape["femur"][s]["head_radius_mm"] + self.p["joint_space_mm"] for s in DRAW_SIDES
        }
        rot = RigidTransform(
            rotation_deg=(self.p["tilt_deg"], self.p["obliquity_deg"], self.p["rotation_deg"])
        ).rotation_matrix
        self.frame = Frame(origin=np.zeros(3), axes=rot.T)

    def head_centre(self, side: str) -> np.ndarray:
        """World position (LPS mm) of the acetabular (= femoral head) centre."""
        return self.frame.to_world([SIDE_SIGN[side] * self.hx, 0.0, 0.0])

    def primitives(self) -> list[tuple]:
        prims = []
        for side in DRAW_SIDES:
            for fn, lo, hi, op, k in self._hemipelvis(self.rc[side]):
                if side == "right":
                    fn, (lo, hi) = _mirror(fn), _mirror_box(lo, hi)
                prims.append((fn, lo, hi, op, k))
        gap = self.p["symphysis_gap_mm"]
        slab = (lambda u, v, w: F32(0.5 * gap) - np.abs(u), [-gap, -80, -80], [gap, -10, 0])
        prims.append((*slab, "subtract", 0.0))
        prims += self._sacrum_and_spine()
        for side in DRAW_SIDES:
            c = np.array([SIDE_SIGN[side] * self.hx, 0.0, 0.0])
            r = self.rc[side]
            prims.append(
                (
                    lambda u, v, w, c=c, r=r: sdf.ellipsoid(u, v, w, c, [r] * 3),
                    c - r,
                    c + r,
                    "subtract",
                    0.0,
                )
            )
        return prims

    def _keypoints(self, rc: float) -> dict[str, np.ndarray]:
        """Landmarks of the left hemipelvis (pelvis-local mm) that shape wing and rami."""
        g, hx, ch, fl = self.g, self.hx, self.p["crest_height_mm"], self.p["wing_flare_mm"]
        pts = {
            "aiis": (hx + 6 * g, -34 * g, 24 * g),
            "asis": (hx + 0.55 * fl, -50 * g, 0.58 * ch),
            "tubercle": (hx + fl, -16 * g, 0.9 * ch),
            "crest_top": (hx - 8 * g, 36 * g, ch),
            "psis": (42 * g, 76 * g, 0.64 * ch),
            "piis": (46 * g, 72 * g, 0.42 * ch),
            "sciatic_notch": (hx - 24 * g, 46 * g, 14 * g),
            "acetabulum_post": (hx - 8 * g, 20 * g, 0.55 * rc),
            "acetabulum_ant": (hx + 4 * g, -20 * g, 0.5 * rc),
        }
        return {k: np.array(v, float) for k, v in pts.items()}

    def _ilium(self, rc: float) -> sdf.Plate:
        """The iliac wing: a bowl-shaped plate, thin in the fossa, thick at crest and columns."""
        g, kp = self.g, self._keypoints(rc)
        pts = np.array(list(kp.values()))
        centre = pts.mean(axis=0)
        normal = np.linalg.svd(pts - centre)[2][2]
        normal *= -np.sign(normal[0])  # into the pelvis (medial)
        ua = kp["asis"] - kp["psis"]
        ua = sdf.unit(ua - (ua @ normal) * normal)
        va = np.cross(normal, ua)
        va *= np.sign(va[2])
        frame = Frame(origin=centre, axes=np.stack([ua, va, normal]))
        loc = frame.to_local(pts)
        quad = _quadratic_fit(loc[:, 0] / 100, loc[:, 1] / 100, loc[:, 2])
        bowl_c = frame.to_local((kp["asis"] + kp["tubercle"] + kp["crest_top"] + kp["aiis"]) / 4)
        bowl_c = 0.5 * bowl_c + 0.5 * loc.mean(axis=0)
        si = frame.to_local(0.5 * (kp["psis"] + kp["piis"]))
        roof = frame.to_local(0.5 * (kp["acetabulum_post"] + kp["acetabulum_ant"]))

        def surface(u, v):
            bump = np.exp(-((u - bowl_c[0]) ** 2 + (v - bowl_c[1]) ** 2) / F32(2 * (38 * g) ** 2))
            return quad(u / 100, v / 100) - F32(9 * g) * bump

        def thickness(u, v, d2):
            rim = np.exp(np.minimum(d2, 0.0) / F32(7 * g))
            near = lambda c, s: np.exp(-((u - c[0]) ** 2 + (v - c[1]) ** 2) / F32(2 * s**2))  # noqa: E731
            return (
                F32(2.6 * g)
                + F32(7.0 * g) * rim
                + F32(16 * g) * near(si, 22 * g)
                + F32(22 * g) * near(roof, 26 * g)
            )

        outline = sdf.closed_spline(loc[:, :2], 10)
        return sdf.Plate(frame, outline, surface, thickness, step_mm=self.step)

    def _hemipelvis(self, rc: float) -> list[tuple]:
        """Primitives of the left hemipelvis: wing, columns, cup, rami, ischium."""
        g, hx, p = self.g, self.hx, self.p
        kp = self._keypoints(rc)
        wing = self._ilium(rc)
        wlo, whi = wing.box(
            float(np.abs(wing.frame.to_local(np.array(list(kp.values())))[:, 2]).max() + 30 * g)
        )
        inc, av = (
            np.radians(p["acetabular_inclination_deg"]),
            np.radians(p["acetabular_anteversion_deg"]),
        )
        opening = np.array([np.sin(inc) * np.cos(av), -np.sin(inc) * np.sin(av), -np.cos(inc)])
        h = np.array([hx, 0.0, 0.0])
        outer_c, outer_r = h + np.array([-2, 2, 3]) * g, rc + np.array([8, 9, 10]) * g

        def cup(u, v, w):
            d = sdf.ellipsoid(u, v, w, outer_c, outer_r)
            plane = (u - F32(hx)) * F32(opening[0]) + v * F32(opening[1]) + w * F32(opening[2])
            return sdf.smax(d, plane + F32(0.22 * rc), 2.5)

        sym = 0.5 * p["symphysis_gap_mm"]
        inlet, ch = p["inlet_scale"], p["crest_height_mm"]
        pubic_c, pubic_r = np.array([sym + 9 * g, -40 * g, -32 * g]), np.array([9, 10, 22]) * g
        tubes = [  # (points, radii, blend k): sciatic buttress, pelvic brim, ischial spine
            (
                [
                    [hx - 6 * g, 14 * g, 14 * g],
                    [hx - 28 * g, 40 * g, 28 * g],
                    [50 * g, 62 * g, 0.5 * ch],
                ],
                [13 * g, 12 * g, 14 * g],
                6.0,
            ),
            (
                [
                    [20 * g * inlet, 38 * g, 0.66 * ch],
                    [52 * g * inlet, 28 * g, 38 * g],
                    [(hx - 22 * g) * inlet, 6 * g, 10 * g],
                    [hx - 32 * g, -26 * g, -6 * g],
                    [sym + 14 * g, -44 * g, -17 * g],
                ],
                [6 * g] * 5,
                4.0,
            ),
            (
                [[hx - 26 * g, 34 * g, -26 * g], [hx - 40 * g, 44 * g, -28 * g]],
                [6 * g, 2.5 * g],
                3.0,
            ),
        ]
        ring, ring_r, top, lateral, tuber_c = self._obturator_ring(sym)
        tuber_r = np.array([12, 16, 12]) * g
        tubes.append((ring, ring_r, 4.0))
        tubes.append(([[hx - 14 * g, -12 * g, -8 * g], top], [10 * g, 9 * g], 6.0))  # ramus root
        tubes.append(([[hx - 6 * g, 16 * g, -14 * g], lateral], [14 * g, 12 * g], 6.0))  # ischium
        prims = [(wing, wlo, whi, "union", 0.0)]
        prims.append((cup, outer_c - outer_r, outer_c + outer_r, "union", 8.0))
        for pts, radii, k in tubes:
            pts = np.asarray(pts, float)
            prims.append((FemurModel._tube(pts, radii), *sdf.tube_box(pts, radii), "union", k))
        for c, r, k in ((pubic_c, pubic_r, 5.0), (tuber_c, tuber_r, 6.0)):
            prims.append((FemurModel._ellipsoid(c, r), c - r, c + r, "union", k))
        return prims

    def _obturator_ring(self, sym: float):
        """The bone ring around the left obturator foramen (an oval hole): superior pubic ramus,
        pubic body, ischiopubic ramus and ischium, as a closed tube of varying radius.

        Returns the ring's points and radii, its top and lateral points (where the ramus root
        and the ischium body from the acetabulum join it) and the ischial tuberosity centre.
        """
        g, p = self.g, self.p
        tilt = np.radians(np.clip(0.5 * p["subpubic_angle_deg"] - 20.0, 0.0, 40.0))
        e1 = sdf.unit([np.sin(tilt), 0.1, np.cos(tilt)])  # long axis, up and lateral
        e2 = np.array([1.0, 0.6, 0.0])
        e2 = sdf.unit(e2 - (e2 @ e1) * e1)  # across: from pubis to ischium
        a1, a2 = 24 * g, (19 if p["subpubic_angle_deg"] > 75 else 17) * g
        centre = np.array([sym + 19 * g + a2 * e2[0], -14 * g, -42 * g])
        theta = np.linspace(0, 2 * np.pi, 25)
        # radius by direction: ramus above, pubic body medial, thin ramus below, ischium lateral
        radius = g * (9.0 + 1.5 * np.cos(theta) - 2.0 * np.sin(theta) ** 2 + 2.5 * np.sin(theta))
        radius += g * 2.0 * np.clip(-np.sin(theta), 0, 1)  # pubic body side is thick
        pts = (
            centre
            + ((a1 + radius) * np.cos(theta))[:, None] * e1
            + ((a2 + radius) * np.sin(theta))[:, None] * e2
        )
        top = centre + (a1 + 8 * g) * e1 + 0.35 * a2 * e2
        lateral = centre + (a2 + 10 * g) * e2 + 0.3 * a1 * e1
        tuberosity = centre + 0.85 * (a2 + 6 * g) * e2 - 0.8 * (a1 + 6 * g) * e1 + [0, 8 * g, 0]
        return pts, radius, top, lateral, tuberosity

    def _sacrum_plate(self) -> tuple[sdf.Plate, Frame]:
        """Sacrum: a kyphotic tapering plate with four pairs of foramina; its frame."""
        g, p = self.g, self.p
        top = np.array([0.0, 40 * g, 0.7 * p["crest_height_mm"]])
        down = sdf.unit([0.0, 0.55, -1.0])
        frame = Frame(origin=top, axes=np.stack([[1.0, 0, 0], -down, np.cross([1.0, 0, 0], -down)]))
        wd, length, curve = p["sacrum_half_width_mm"], p["sacrum_length_mm"], p["sacrum_curve_mm"]
        half = [
            (0, 3 * g),
            (0.5 * wd, 2 * g),
            (wd, -8 * g),
            (0.98 * wd, -0.3 * length),
            (0.78 * wd, -0.52 * length),
            (0.45 * wd, -0.72 * length),
            (0.18 * wd, -0.92 * length),
        ]
        right = [(-u, v) for u, v in half[:0:-1]]
        outline = sdf.closed_spline(np.array(half + [(0, -length)] + right)[::-1], 8)
        kappa = curve / (0.5 * length) ** 2

        def surface(u, v):
            return F32(kappa) * ((v + F32(0.5 * length)) ** 2 - F32((0.5 * length) ** 2))

        def thickness(u, v, d2):
            along = np.clip(1.0 + v / F32(length), 0.0, 1.0)
            return (F32(12 * g) + F32(34 * g) * along) * (
                1.0 - 0.3 * np.minimum((u / F32(wd)) ** 2, 1.0)
            )

        holes = []
        for i in range(4):
            fu, fv, fr = (0.52 - 0.06 * i) * wd, -(0.16 + 0.19 * i) * length, (6.5 - 0.9 * i) * g
            holes += [(fu, fv, fr), (-fu, fv, fr)]
        return sdf.Plate(frame, outline, surface, thickness, holes, step_mm=self.step), frame

    def _vertebra(self, centre, axis, scale: float) -> list[tuple]:
        """A lumbar vertebra: body (rounded elliptic cylinder), pedicles, laminae, processes."""
        g = self.g * scale
        ax = sdf.unit(axis)
        post = sdf.unit(np.array([0.0, 1.0, 0.0]) - ax[1] * ax)
        frame = Frame(origin=np.asarray(centre, float), axes=np.stack([[1.0, 0, 0], post, ax]))
        rx, ry, hh = 25 * g, 17 * g, 13 * g

        def body(u, v, w):
            lu, lv, lw = (
                frame.axes[i, 0] * (u - F32(frame.origin[0]))
                + frame.axes[i, 1] * (v - F32(frame.origin[1]))
                + frame.axes[i, 2] * (w - F32(frame.origin[2]))
                for i in range(3)
            )
            return sdf.smax(sdf.ellipse(lu, lv, F32(rx), F32(ry)), np.abs(lw) - F32(hh), 3.0)

        arch = []
        for sgn in (1.0, -1.0):
            arch.append(
                (
                    [
                        [sgn * 0.55 * rx, 0.7 * ry, 0.2 * hh],
                        [sgn * 0.55 * rx, ry + 12 * g, 0.3 * hh],
                        [0.0, ry + 24 * g, 0.0],
                    ],
                    [5 * g, 5 * g, 5 * g],
                )
            )
            arch.append(
                (
                    [
                        [sgn * 0.55 * rx, ry + 10 * g, 0.3 * hh],
                        [sgn * (rx + 22 * g), ry + 6 * g, 0.5 * hh],
                    ],
                    [6 * g, 4 * g],
                )
            )
        arch.append(([[0.0, ry + 22 * g, 0.0], [0.0, ry + 44 * g, -8 * g]], [5 * g, 4 * g]))
        prims = [(body, frame.origin - 30 * g, frame.origin + 30 * g, "union", 0.0)]
        for pts, radii in arch:
            world = frame.to_world(np.asarray(pts, float))
            prims.append(
                (FemurModel._tube(world, radii), *sdf.tube_box(world, radii), "union", 3.0)
            )
        return prims

    def _sacrum_and_spine(self) -> list[tuple]:
        """Sacrum (after carving the sacroiliac joint space), coccyx, L5 and L4."""
        g = self.g
        plate, frame = self._sacrum_plate()
        lo, hi = plate.box(40 * g)
        gap = 2.5 * g
        prims = [(plate, lo, hi, "joint", 0.0, gap)]
        length = self.p["sacrum_length_mm"]
        cocc = frame.to_world(
            np.array(
                [
                    [0, -length - 4 * g, 3 * g],
                    [0, -length - 14 * g, 7 * g],
                    [0, -length - 24 * g, 13 * g],
                ]
            )
        )
        prims.append(
            (
                FemurModel._tube(cocc, [6 * g, 4.5 * g, 3 * g]),
                *sdf.tube_box(cocc, [6 * g]),
                "union",
                2.0,
            )
        )
        up = frame.axes[1]
        l5_axis = sdf.unit(up + np.array([0.0, 0.0, 1.0]))
        l5 = frame.origin + up * 3 * g + l5_axis * 22 * g
        l4_axis = sdf.unit(l5_axis + np.array([0.0, 0.4, 1.0]))
        l4 = l5 + l4_axis * 37 * g
        return prims + self._vertebra(l5, l5_axis, 1.0) + self._vertebra(l4, l4_axis, 0.98)


def pelvis_voxels(model: PelvisModel, field: Field, pv_mm: float, dens: dict, tile) -> BoneVoxels:
    """Mineral (mg/cm3) and marrow HU of the pelvis voxels from its SDF ``field``.

    A thin cortex (about 1 mm) everywhere, thicker under the acetabular roof (the sourcil);
    trabecular bone denser around the acetabulum, sparser in sacrum and vertebrae.
    """
    bv = BoneVoxels(field, pv_mm)
    p = model.p
    x, y, z = bv.local
    depth = -bv.d
    roof = np.zeros_like(depth)
    near_cup = np.zeros_like(depth)
    for side in DRAW_SIDES:
        dx = x - F32(SIDE_SIGN[side] * model.hx)
        r = np.sqrt(dx * dx + y * y + z * z) + F32(1e-3)
        rc = model.rc[side]
        shell = sdf.smoothstep(rc + 7.0, rc + 1.0, r)
        roof = np.maximum(roof, shell * sdf.smoothstep(0.15, 0.7, z / r))
        near_cup = np.maximum(near_cup, sdf.smoothstep(rc + 25.0, rc + 5.0, r))
    thick = p["cortex_mm"] * (1.0 + 1.3 * roof)
    cort = _cortex_fraction(depth, thick, pv_mm)
    axial = sdf.smoothstep(70.0, 40.0, np.abs(x)) * sdf.smoothstep(0.0, 30.0, y)  # sacrum, spine
    trab = p["trabecular_mg_cm3"] * (1.0 + 0.35 * near_cup - 0.3 * axial)
    trab = np.maximum(trab * (1.0 + 0.45 * tile(x, y, z)), 0.0)
    bv.mineral = (bv.fraction * (cort * dens["cortical_mg_cm3"] * 0.95 + (1 - cort) * trab)).astype(
        F32
    )
    marrow = dens["marrow_hu_pelvis"]
    bv.soft_hu = (cort * TISSUE_HU["cortex_matrix"] + (1.0 - cort) * marrow).astype(F32)
    bv.owner = np.where(x < 0, BONE_LABELS["pelvis_right"], BONE_LABELS["pelvis_left"]).astype(
        np.uint8
    )
    return bv


# ----------------------------------------------------------------------------- soft tissue


class BodyModel:
    """The body outline (skin, subcutaneous fat, muscle envelope) slice by slice, world mm.

    The torso is a superellipse per slice (rounder in front, flattened at the back where the
    patient lies on the table) whose half-axes follow z; below the perineum it gives way to two
    thighs (smooth union, so the crotch is organic). Fat is a band of ``fat_mm`` under the skin.
    """

    def __init__(self, shape: dict, pelvis: PelvisModel, femurs: dict) -> None:
        b, p, g = shape["body"], shape["pelvis"], shape["size"]
        ms, hx, ch, fl = b["muscle_scale"], pelvis.hx, p["crest_height_mm"], p["wing_flare_mm"]
        self.fat, self.visc = b["fat_mm"], b["visceral_mm"]
        self.z_lt = min(float(f.landmarks().lesser_trochanter_mm[2]) for f in femurs.values())
        self.z_crotch = self.z_lt - 30.0 * g
        zk = [ch + 60, ch, 0.5 * ch, 0.0, -50 * g, self.z_crotch, self.z_crotch - 60]
        self.knots = np.array(zk)
        self.ax = np.array([hx + fl + 2, hx + fl + 12, hx + fl + 22, hx + 78, hx + 72, hx + 50, 20])
        self.ax = (self.ax - hx) * ms + hx
        self.ay_ant = (
            np.array([92, 85, 72, 62, 66, 64, 20]) * g * ms
            + np.array([1, 1, 0.6, 0.2, 0, 0, 0]) * self.visc
        )
        self.ay_post = np.array([120, 124, 126, 124, 116, 96, 20]) * g * ms
        self.thigh_x = hx + 14 * g
        self.thigh_r = np.array([74.0, 78.0]) * g * ms

    def distances(self, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        """(outer skin, muscle envelope) signed distances (mm) on one slice at height ``z``."""
        ax, aa, ap = (
            float(np.interp(z, self.knots[::-1], a[::-1]))
            for a in (self.ax, self.ay_ant, self.ay_post)
        )
        shrink = float(np.clip((z - (self.z_crotch - 40.0)) / 70.0, 0.0, 1.0))
        taper = float(np.clip(1.0 + (z - self.z_crotch) / 900.0, 0.85, 1.0))
        out = []
        for extra in (self.fat, 0.0):
            torso = _superellipse(x, y, (ax + extra) * max(shrink, 0.05), aa + extra, ap + extra)
            torso = torso + F32(80.0 * (1.0 - shrink))  # gone below the perineum
            thighs = [
                sdf.ellipse(
                    x - F32(s * self.thigh_x), y - F32(10.0), *(taper * self.thigh_r + extra)
                )
                for s in (-1.0, 1.0)
            ]
            thighs = np.minimum(*thighs) + F32(
                40.0 * float(np.clip((z - self.z_crotch) / 80.0, 0, 1))
            )
            out.append(sdf.smin(torso, thighs, 30.0))
        return out[0], out[1]

    def extent(self) -> tuple[float, float, float]:
        """Half-width, anterior and posterior reach of the skin (mm) over all slices."""
        return (
            max(self.ax.max(), self.thigh_x + self.thigh_r[0]) + self.fat,
            self.ay_ant.max() + self.fat,
            self.ay_post.max() + self.fat,
        )


def _superellipse(x, y, ax: float, ay_ant: float, ay_post: float) -> np.ndarray:
    """Radial signed distance (mm) to a superellipse, exponent 2.3 in front, 3 at the back."""
    post = y > 0
    ay = np.where(post, F32(ay_post), F32(ay_ant))
    ex = np.where(post, F32(3.0), F32(2.3))
    r = np.sqrt(x * x + y * y)
    safe = np.maximum(r, F32(1e-3))
    cx = np.where(r < 1e-3, F32(1.0), x / safe)
    boundary = 1.0 / (np.abs(cx / F32(ax)) ** ex + np.abs(y / safe / ay) ** ex) ** (1.0 / ex)
    return r - boundary


def _body_hu(grid: Grid, body: BodyModel, shape: dict) -> tuple[np.ndarray, np.ndarray]:
    """Skin/fat/muscle HU over the grid and the depth below the muscle envelope (mm).

    The outline is computed on slices every ~3 mm and interpolated linearly in z.
    """
    b = shape["body"]
    pv = F32(grid.spacing_mm[:2].mean())
    x, y = grid.axis_mm(0)[None, :], grid.axis_mm(1)[:, None]
    zs = grid.axis_mm(2)
    step = max(1, round(3.0 / float(grid.spacing_mm[2])))
    ks = list(range(0, len(zs), step))
    if ks[-1] != len(zs) - 1:
        ks.append(len(zs) - 1)
    samples = {k: body.distances(x, y, float(zs[k])) for k in ks}
    hu = np.empty(grid.shape, F32)
    inner = np.empty(grid.shape, F32)
    for lo, hi in itertools.pairwise(ks):
        for k in range(lo, hi + 1):
            w = F32((k - lo) / (hi - lo))
            d_out = samples[lo][0] * (1 - w) + samples[hi][0] * w
            inner[k] = samples[lo][1] * (1 - w) + samples[hi][1] * w
            hu[k] = np.where(d_out > -1.5, F32(TISSUE_HU["skin"]), F32(b["fat_hu"]))
            hu[k][inner[k] <= 0] = b["muscle_hu"]
            air = np.clip(0.5 + d_out / pv, 0.0, 1.0)  # partial volume at the skin
            hu[k] += air * (F32(TISSUE_HU["air"]) - hu[k])
    return hu, inner


def _muscle_seeds(pelvis: PelvisModel, shape: dict) -> list[np.ndarray]:
    """Centre lines (world mm) of the muscle groups; fat planes run where two are equidistant."""
    g, hx, ch = shape["size"], pelvis.hx, shape["pelvis"]["crest_height_mm"]
    left = [
        [[40, 125, ch + 20], [hx, 105, 10], [hx + 35, 70, -80]],  # gluteus maximus
        [[hx + 45, 20, ch], [hx + 55, 15, 20]],  # gluteus medius / minimus
        [[30, 25, ch + 60], [55, 5, 0.6 * ch], [hx - 12, -50, 5], [hx - 5, -20, -60]],  # iliopsoas
        [[hx - 35, 10, -20], [hx - 28, 25, -50]],  # obturator internus
        [[hx + 20, -50, -60], [hx + 22, -45, -220]],  # quadriceps
        [[hx - 45, -5, -70], [hx - 30, 5, -220]],  # adductors
        [[hx, 60, -90], [hx + 10, 45, -220]],  # hamstrings
        [[hx + 45, -45, 30], [hx + 50, -30, -100]],  # tensor fasciae latae
        [[28, 110, ch + 60], [25, 110, 0.7 * ch]],  # erector spinae
        [[35, -85, ch + 60], [18, -70, 0.2 * ch]],  # rectus abdominis
        [[hx + 20, -10, ch + 30], [hx + 30, -5, 0.9 * ch]],  # obliques
    ]
    seeds = []
    for pts in left:
        pts = np.asarray(pts, float) * np.array([1.0, g, 1.0])
        for s in (1.0, -1.0):
            seeds.append(pelvis.frame.to_world(pts * np.array([s, 1.0, 1.0])))
    return seeds


def _upsample_linear(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear upsampling of a (K, J, I) array by an integer ``factor``, cropped to ``shape``.

    Coarse sample c sits on fine index c * factor (same origin), so grids stay aligned.
    """
    out = coarse.astype(F32, copy=False)
    if factor == 1:
        return out[: shape[0], : shape[1], : shape[2]]
    for axis, n in enumerate(shape):
        a = np.moveaxis(out, axis, 0)
        b = np.concatenate([a[1:], a[-1:]], axis=0)
        new = np.empty((a.shape[0] * factor, *a.shape[1:]), F32)
        for r in range(factor):
            w = F32(r / factor)
            new[r::factor] = a * (1 - w) + b * w if r else a
        out = np.moveaxis(new[:n], 0, axis)
    return np.ascontiguousarray(out)


def _coarse_grid(grid: Grid, target_mm: float) -> tuple[Grid, int]:
    """A grid ``factor`` times coarser with the same origin (factor 1 if already coarse)."""
    factor = max(1, round(target_mm / float(grid.spacing_mm.max())))
    shape = tuple(-(-n // factor) + 1 for n in grid.shape)
    return Grid(grid.origin_mm, grid.spacing_mm * factor, shape), factor


def _fat_planes(cgrid: Grid, pelvis: PelvisModel, shape: dict) -> np.ndarray:
    """Gap (mm) between the nearest and second-nearest muscle centre line, on ``cgrid``.

    Computed ~4 mm coarse and upsampled: the gap is a smooth field.
    """
    vgrid, factor = _coarse_grid(cgrid, 4.0)
    x, y, z = (vgrid.axis_mm(a) for a in range(3))
    u, v, w = x[None, None, :], y[None, :, None], z[:, None, None]
    d1 = np.full(vgrid.shape, 1e4, F32)
    d2 = np.full(vgrid.shape, 1e4, F32)
    for seed in _muscle_seeds(pelvis, shape):
        d = _points_distance(seed, u, v, w)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return _upsample_linear(d2 - d1, factor, cgrid.shape)


def _region(grid: Grid, frame: Frame, lo, hi):
    """Grid slices and local coordinates (float32) of the grid box around local box [lo, hi]."""
    f = Field.__new__(Field)
    f.grid, f.frame, f.margin_mm = grid, frame, 0.0
    wlo, whi = frame.world_box(np.asarray(lo, float), np.asarray(hi, float))
    f.index_lo, f.index_hi = grid.index_box(wlo, whi)
    if np.any(f.index_hi <= f.index_lo):
        return None, None
    full = tuple(
        slice(0, int(b - a)) for a, b in zip(f.index_lo[::-1], f.index_hi[::-1], strict=True)
    )
    return f.slices, f.coords(full)


def _noise_block(rng: np.random.Generator, shape, spacing_mm, period_mm: float) -> np.ndarray:
    """Smooth isotropic noise (unit variance) of features ~``period_mm``, shape (K, J, I).

    Drawn on a grid ~period/4 coarse and upsampled linearly: cheap, and smooth enough.
    """
    from scipy.ndimage import gaussian_filter

    spacing = np.asarray(spacing_mm, float)
    factor = max(1, round(period_mm / 4.0 / float(spacing.min())))
    cshape = tuple(-(-n // factor) + 1 for n in shape)
    sigma = period_mm / 4.0 / (spacing[::-1] * factor)
    coarse = gaussian_filter(rng.standard_normal(cshape).astype(F32), sigma, mode="wrap")
    coarse /= coarse.std() + 1e-9
    return _upsample_linear(coarse, factor, shape)


def _abdomen(content, inner, cgrid: Grid, factor: int, pelvis, pfield, shape: dict, rng) -> None:
    """Abdominal cavity above the brim (in place on coarse ``content``): mesenteric fat, small
    bowel loops, caecum and sigmoid colon with stool and gas, kept off the iliacus and psoas."""
    b, g, p = shape["body"], shape["size"], shape["pelvis"]
    hx, ch, fat = pelvis.hx, p["crest_height_mm"], b["fat_hu"]
    lo = np.array([-(hx + 40), -110 * g - b["visceral_mm"], 0.25 * ch])
    hi = np.array([hx + 40, 60 * g, ch + 80])
    sl, uvw = _region(cgrid, pelvis.frame, lo, hi)
    if sl is None:
        return
    u, v, w = uvw
    radii = [hx + 20, 75 * g + 0.6 * b["visceral_mm"], 0.9 * ch]
    cav = sdf.ellipsoid(u, v, w, [0, -15 * g, ch + 20], radii)
    bone_d = _field_distance(pfield, sl, factor)
    psoas = np.minimum(
        *(_points_distance(pelvis.frame.to_local(s), u, v, w) for s in _psoas_lines(pelvis, g))
    )
    inside = (cav < 0) & (bone_d > 16.0 * g) & (psoas > 22.0 * g) & (inner[sl] < -12.0)
    loops = _noise_block(rng, u.shape, cgrid.spacing_mm, 34.0)
    gasn = _noise_block(rng, u.shape, cgrid.spacing_mm, 14.0)
    hu = np.where(loops > 0.35, F32(TISSUE_HU["bowel_wall"]), F32(fat + 10.0))
    colon = _colon_distance(u, v, w, hx, ch, g)
    stool = F32(-40.0) + F32(60.0) * gasn
    hu = np.where(colon < 0, np.where(gasn > 1.3 - b["bowel_gas"], F32(-1000.0), stool), hu)
    hu = np.where((colon >= 0) & (colon < 2.5), F32(TISSUE_HU["bowel_wall"]), hu)
    hu = np.where((loops > 0.6) & (gasn > 2.0 - 0.8 * b["bowel_gas"]), F32(-1000.0), hu)
    content[sl] = np.where(inside, hu, content[sl])


def _field_distance(field: Field, sl, factor: int = 1) -> np.ndarray:
    """The field's SDF at the voxels of slices ``sl`` of a grid ``factor`` times coarser than
    the field's (same origin), (K, J, I); FAR_MM outside the field's box."""
    picks, inside = [], []
    for s, lo, n in zip(sl, field.index_lo[::-1], field.d.shape, strict=True):
        fine = np.arange(s.start, s.stop) * factor - lo
        ok = (fine >= 0) & (fine < n)
        picks.append(np.clip(fine, 0, n - 1))
        inside.append(ok)
    out = field.d[np.ix_(*picks)]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return np.where(mask, out, F32(sdf.FAR_MM))


def _psoas_lines(pelvis: PelvisModel, g: float) -> list[np.ndarray]:
    """World centre lines of the psoas muscles, beside the spine and over the brim."""
    ch = pelvis.p["crest_height_mm"]
    pts = np.array(
        [[38 * g, 15 * g, ch + 80], [45 * g, 5 * g, 0.6 * ch], [pelvis.hx - 20, -30, 10]]
    )
    return [pelvis.frame.to_world(pts * np.array([s, 1, 1])) for s in (1.0, -1.0)]


def _colon_distance(u, v, w, hx: float, ch: float, g: float) -> np.ndarray:
    """Distance (mm, negative in the lumen) to caecum/ascending colon and sigmoid (pelvis frame)."""
    caecum = np.array([[-(hx - 5), -35 * g, 0.45 * ch], [-(hx + 5), -20 * g, ch + 80]])
    sigmoid = sdf.bezier(
        [
            [hx, -30 * g, ch + 80],
            [hx - 10, -40 * g, 0.4 * ch],
            [0, -60 * g, 0.6 * ch],
            [-20 * g, 40 * g, 0.4 * ch],
            [0, 55 * g, 0.2 * ch],
        ],
        10,
    )
    return np.minimum(
        sdf.tube(u, v, w, caecum, [28 * g, 25 * g]), sdf.tube(u, v, w, sigmoid, [16 * g] * 10)
    )


def _pelvic_contents(content, cgrid: Grid, factor: int, pelvis, pfield, shape: dict) -> None:
    """Pelvic fat, bladder, rectum, uterus or prostate, ischioanal fat (in place, coarse)."""
    b, g, ch = shape["body"], shape["size"], pelvis.p["crest_height_mm"]
    hx, fat = pelvis.hx, F32(shape["body"]["fat_hu"])
    lo, hi = np.array([-(hx + 10), -75 * g, -100 * g]), np.array([hx + 10, 90 * g, 0.45 * ch])
    sl, uvw = _region(cgrid, pelvis.frame, lo, hi)
    if sl is None:
        return
    u, v, w = uvw
    bone_d = _field_distance(pfield, sl, factor)
    fill = b["bladder_fill"] ** (1 / 3)
    true_pelvis = sdf.ellipsoid(u, v, w, [0, 18 * g, -18 * g], [hx - 26 * g, 58 * g, 42 * g])
    region = np.where((true_pelvis < 0) & (bone_d > 9.0 * g), fat, content[sl])
    bladder = sdf.ellipsoid(
        u, v, w, [0, 0, -8 * g + 10 * (fill - 1)], np.array([40, 30, 30]) * g * fill
    )
    region = np.where(bladder < 2.5, F32(TISSUE_HU["bowel_wall"]), region)
    region = np.where(bladder < 0, F32(TISSUE_HU["urine"]), region)
    rectum = sdf.tube(
        u, v, w, np.array([[0, 62, 25], [0, 50, -10], [0, 36, -62]]) * g, [14 * g] * 3
    )
    region = np.where(rectum < 2.5, F32(TISSUE_HU["bowel_wall"]), region)
    region = np.where(rectum < 0, F32(-60.0), region)
    if shape["sex"] == "F":
        organ = sdf.ellipsoid(u, v, w, [0, 32 * g, 22 * g], np.array([28, 20, 34]) * g)
    else:
        organ = sdf.ellipsoid(u, v, w, [0, -10 * g, -48 * g], np.array([20, 15, 15]) * g)
    region = np.where(organ < 0, F32(TISSUE_HU["organ"]), region)
    for s in (1.0, -1.0):
        ischioanal = sdf.ellipsoid(
            u, v, w, [s * 40 * g, 48 * g, -66 * g], np.array([18, 30, 26]) * g
        )
        region = np.where((ischioanal < 0) & (bone_d > 3.0), fat, region)
    content[sl] = region


def soft_tissue_hu(grid: Grid, body: BodyModel, pelvis: PelvisModel, pfield: Field, shape, rng):
    """HU without mineral over the whole grid (K, J, I), float32: air, skin, fat, muscle with
    intermuscular fat planes, abdominal and pelvic contents, hip joint cartilage.

    The deep contents are built on a ~2 mm grid and upsampled linearly (soft-tissue edges blur
    by about a millimetre, as a CT's would); skin and fat are exact at the grid's spacing.
    """
    hu, inner = _body_hu(grid, body, shape)
    cgrid, factor = _coarse_grid(grid, 2.0)
    b = shape["body"]
    content = np.full(cgrid.shape, F32(b["muscle_hu"]))
    gap = _fat_planes(cgrid, pelvis, shape)
    content[gap < F32(3.0 + 0.04 * b["fat_mm"])] = b["fat_hu"]  # >= 4 mm grid: no gaps
    del gap
    inner_c = inner[::factor, ::factor, ::factor]
    inner_c = np.pad(
        inner_c, [(0, n - m) for n, m in zip(cgrid.shape, inner_c.shape, strict=True)], mode="edge"
    )
    _abdomen(content, inner_c, cgrid, factor, pelvis, pfield, shape, rng)
    _pelvic_contents(content, cgrid, factor, pelvis, pfield, shape)
    np.copyto(hu, _upsample_linear(content, factor, grid.shape), where=inner < -3.0)
    for side in DRAW_SIDES:
        c, r = np.array([SIDE_SIGN[side] * pelvis.hx, 0, 0]), pelvis.rc[side] + 1.0
        sl, uvw = _region(grid, pelvis.frame, c - r, c + r)
        if sl is not None:
            u, v, w = uvw
            inside = (u - F32(c[0])) ** 2 + v * v + w * w < F32(r * r)
            hu[sl][inside] = TISSUE_HU["cartilage"]
    return hu


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
