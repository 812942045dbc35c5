"""The proximal femur of the virtual anatomy: construction, SDF primitives, landmarks, mineral.

:class:`FemurModel` builds one femur from its shape parameters (``sample_shape``'s
``shape["femur"][side]``): a spherical head, an elliptic waisted neck, a flaring shaft,
trochanters and crests fused by smooth unions, posed in its own supine leg position about the
head centre; its exact landmarks come from the construction. :func:`femur_voxels` fills its
voxels with mineral (mg/cm3) and marrow HU: a cortex whose thickness varies by region and
trabecular bone with compressive and tensile groups, Ward's triangle, a fatty shaft canal and
oriented band-pass texture.

Femur-local coordinates (s, m, a) = (along the shaft proximally, medial, anterior), origin where
the neck axis meets the shaft axis; the right femur's frame is the mirror image of the left one's.
"""

from __future__ import annotations

import numpy as np

from xbmd.ct.landmarks import FemurLandmarks
from xbmd.geometry import RigidTransform, femur_rotation_deg
from xbmd.synth import sdf
from xbmd.synth.anatomy_base import (
    SIDE_SIGN,
    TISSUE_HU,
    BoneVoxels,
    _cortex_fraction,
    _points_distance,
)
from xbmd.synth.model import BONE_LABELS
from xbmd.synth.sdf import F32, Field, Frame


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
