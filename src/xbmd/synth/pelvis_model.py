"""The pelvis of the virtual anatomy: construction, SDF primitives and mineral.

:class:`PelvisModel` builds both hemipelves (the left one, mirrored for the right) from
``sample_shape``'s ``shape["pelvis"]``: iliac wings (curved plates with a thick crest),
acetabular cups around the femoral heads, rami tubes around the obturator foramina, the
ischium, a sacrum plate with foramina, the coccyx and the L4-L5 vertebrae (part of the pelvis
labels, split at the midline like the sacrum). :func:`pelvis_voxels` fills its voxels with
mineral (mg/cm3) and marrow HU: a thin cortex, thicker under the acetabular roof, and trabecular
bone denser around the acetabulum, sparser in sacrum and spine.
"""

from __future__ import annotations

import numpy as np

from xbmd.geometry import RigidTransform
from xbmd.synth import sdf
from xbmd.synth.anatomy_base import SIDE_SIGN, TISSUE_HU, BoneVoxels, _cortex_fraction
from xbmd.synth.femur_model import FemurModel
from xbmd.synth.model import BONE_LABELS, DRAW_SIDES
from xbmd.synth.sdf import F32, Field, Frame


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
