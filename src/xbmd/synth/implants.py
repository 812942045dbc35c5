"""Metal implants in virtual patients (``xbmd synth --implant-fraction F``).

A share of patients gets a metal implant on one side, one of three kinds (weights in
``IMPLANT_WEIGHTS``), built from the femur's exact landmarks on the anatomy's grid:

- ``hip_replacement`` (total hip replacement): the femoral head and neck resected at the neck's
  base; a titanium-alloy stem (cobalt-chromium in 15 %, as cemented stems are) flattened
  antero-posteriorly, from a lateral shoulder and a collar at the cut down the canal, tapering
  to its tip 120-145 mm below the neck-shaft junction, with a trunnion to a cobalt-chromium head
  (28, 32 or 36 mm) at the native head centre; a titanium hemispherical cup (3-4.5 mm shell)
  reamed into the acetabulum, opening at 38-50 degrees inclination and 10-25 degrees
  anteversion, with a polyethylene liner (-90 HU, not metal) around the head;
- ``nail`` (cephalomedullary nail, as for a trochanteric fracture): a nail of 15.5-17 mm
  proximally, 10-11.5 mm distally, from the tip of the greater trochanter down the canal, a
  10.5 mm threaded lag screw along the neck axis into the head (tip 8-12 mm below its surface)
  and a 5 mm distal locking screw across the shaft; titanium alloy, or stainless steel in 30 %;
- ``screws`` (three cannulated screws, as for a femoral-neck fracture): 7 mm, partially
  threaded, parallel to the neck axis in an inverted triangle, from the lateral cortex (with a
  washer) into the head; stainless steel or titanium alloy.

The metal replaces bone and soft tissue where it lies (:class:`xbmd.synth.metal.MetalVoxels`);
it is labelled ``IMPLANT_LABEL`` in labels.nii.gz (metal fraction at least 0.5) and moves with
the bone that carries it in the radiographs. Implants are drawn from their own random stream
(the patient's seed and ``IMPLANT_STREAM``), after the patient's mineral has been scaled to its
target, so the patient's anatomy, bone density and CT scanner are the same with or without
them; so are the radiographs' devices and poses with ``--sessions`` (each radiograph has its
own stream there), and the first radiograph's without (later ones differ: the metal changes
how many draws the first one's quantum noise takes from the shared stream). A larger
``--implant-fraction`` adds implants to more patients without changing those that had one.
"""

from __future__ import annotations

import numpy as np

from xbmd.synth import sdf
from xbmd.synth.anatomy_base import SIDE_SIGN, TISSUE_HU
from xbmd.synth.metal import METALS, MetalVoxels
from xbmd.synth.model import BONE_LABELS, Anatomy

IMPLANT_TYPES = ("hip_replacement", "nail", "screws")
IMPLANT_WEIGHTS = (0.5, 0.3, 0.2)
#: Label id of implant metal in labels.nii.gz (bones are 1-4, phantom rods 101-105).
IMPLANT_LABEL = 10
#: Child stream of the patient seed for the implant draws (``np.random.default_rng([seed, n])``).
IMPLANT_STREAM = 7304
#: HU of the polyethylene liner of a cup (density 0.94 g/cm3).
POLYETHYLENE_HU = -90.0
F32 = np.float32


def draw_implant(seed: int, fraction: float) -> dict | None:
    """Whether the patient of ``seed`` has an implant, and which: {'side', 'type', 'seed'} or
    None. Side and type are drawn whatever ``fraction`` is, so a patient keeps its implant when
    the fraction grows."""
    rng = np.random.default_rng([seed, IMPLANT_STREAM])
    u = float(rng.random())
    side = str(rng.choice(["left", "right"]))
    kind = str(rng.choice(IMPLANT_TYPES, p=IMPLANT_WEIGHTS))
    params_seed = int(rng.integers(0, 2**31 - 1))
    if u >= fraction:
        return None
    return {"side": side, "type": kind, "seed": params_seed}


# ---- the grid -------------------------------------------------------------------------------


class _Grid:
    """World coordinates of the anatomy's axis-aligned grid and boxes on it."""

    def __init__(self, anatomy: Anatomy) -> None:
        a = anatomy.affine
        if not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))):
            raise ValueError("implants need an axis-aligned anatomy grid")
        self.h = np.diag(a[:3, :3]).astype(float)  # (x, y, z)
        self.origin = a[:3, 3].astype(float)
        self.shape = anatomy.labels.shape  # (K, J, I)
        self.pv = float(np.mean(np.abs(self.h)))

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """(K, J, I) slices of the voxels between world points ``lo`` and ``hi``, or None."""
        ijk = [(np.asarray(p, float) - self.origin) / self.h for p in (lo, hi)]
        a = np.floor(np.minimum(*ijk)).astype(int)
        b = np.ceil(np.maximum(*ijk)).astype(int) + 1
        n = np.array(self.shape[::-1])
        a, b = np.clip(a, 0, n), np.clip(b, 0, n)
        if np.any(b <= a):
            return None
        return tuple(slice(int(a[ax]), int(b[ax])) for ax in (2, 1, 0))

    def coords(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x, y, z (float32) of the box's voxels, broadcastable to its (K, J, I)."""
        k, j, i = (np.arange(s.start, s.stop) for s in box)
        x = (self.origin[0] + i * self.h[0]).astype(F32)[None, None, :]
        y = (self.origin[1] + j * self.h[1]).astype(F32)[None, :, None]
        z = (self.origin[2] + k * self.h[2]).astype(F32)[:, None, None]
        return x, y, z


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _sphere(centre, radius):
    def fn(x, y, z):
        r2 = (x - F32(centre[0])) ** 2 + (y - F32(centre[1])) ** 2 + (z - F32(centre[2])) ** 2
        return np.sqrt(r2) - F32(radius)

    return fn


def _threaded_rod(a, b, r_core: float, r_thread: float, thread_from_b_mm: float, pitch_mm=2.5):
    """SDF (approximate) of a rod from ``a`` to ``b`` (round ends) of radius ``r_core``, threaded
    (radius up to ``r_thread``) over its last ``thread_from_b_mm`` towards ``b``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    length = float(np.linalg.norm(ab))

    def fn(x, y, z):
        pa = (x - F32(a[0]), y - F32(a[1]), z - F32(a[2]))
        t = np.clip((pa[0] * ab[0] + pa[1] * ab[1] + pa[2] * ab[2]) / F32(length**2), 0.0, 1.0)
        q = np.sqrt(sum((p - t * F32(v)) ** 2 for p, v in zip(pa, ab, strict=True)))
        along = t * F32(length)
        threaded = along >= F32(length - thread_from_b_mm)
        wave = 0.5 + 0.5 * np.sin(along * F32(2 * np.pi / pitch_mm))
        radius = F32(r_core) + threaded * F32(r_thread - r_core) * wave
        return q - radius

    return fn


def _tube(points, radii, squash=None):
    def fn(x, y, z):
        return sdf.tube(x, y, z, points, radii, squash)

    return fn


def _box_of(points, radius: float, margin: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    p = np.atleast_2d(np.asarray(points, float))
    return p.min(axis=0) - radius - margin, p.max(axis=0) + radius + margin


def _lateral_exit(anatomy: Anatomy, grid: _Grid, start, direction, femur_id: int, reach_mm):
    """The last point of the femur (label ``femur_id``) along ``start + t direction``,
    0 <= t <= reach_mm (the lateral cortex for a line along the neck axis)."""
    t = np.arange(0.0, reach_mm, 0.5)
    pts = np.asarray(start, float) + t[:, None] * np.asarray(direction, float)
    ijk = np.rint((pts - grid.origin) / grid.h).astype(int)
    n = np.array(grid.shape[::-1])
    ok = np.all((ijk >= 0) & (ijk < n), axis=1)
    hit = np.zeros(t.shape, bool)
    hit[ok] = anatomy.labels[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] == femur_id
    return pts[np.flatnonzero(hit)[-1]] if hit.any() else pts[-1]


def _distal_room_mm(grid: _Grid, point, shaft_axis) -> float:
    """Distance from ``point`` down the shaft (along -shaft_axis) to the grid's lower end, mm."""
    z_bottom = grid.origin[2] + 0.5 * abs(grid.h[2])
    return float((point[2] - z_bottom) / max(shaft_axis[2], 0.2))


# ---- the three kinds --------------------------------------------------------------------------


def _hip_replacement(anatomy: Anatomy, grid: _Grid, side: str, rng) -> tuple[list, list, dict]:
    lm = anatomy.landmarks[side]
    c, n, s, rh = lm.head_center_mm, lm.neck_axis, lm.shaft_axis, lm.head_radius_mm
    big = np.asarray(lm.extra.get("neck_length_mm", 45.0))
    o = c + float(big) * n
    lateral = np.array([SIDE_SIGN[side], 0.0, 0.0])
    inferior, anterior = np.array([0.0, 0.0, -1.0]), np.array([0.0, -1.0, 0.0])
    e_ap = _unit(np.cross(s, n))
    joint = float(anatomy.meta.get("pelvis", {}).get("joint_space_mm", 3.0))
    r_head = float(rng.choice([14.0, 16.0]) if rh < 23.5 else rng.choice([16.0, 18.0]))
    r_out = rh + joint + rng.uniform(1.0, 2.5)
    r_in = r_out - rng.uniform(3.0, 4.5)
    incl, av = np.radians(rng.uniform(38.0, 50.0)), np.radians(rng.uniform(10.0, 25.0))
    opening = _unit(
        np.cos(av) * (lateral * np.sin(incl) + inferior * np.cos(incl)) + np.sin(av) * anterior
    )
    t_cut = float(np.linalg.norm(lm.neck_center_mm - c)) + rng.uniform(2.0, 8.0)
    room = _distal_room_mm(grid, o, s)
    length = float(min(rng.uniform(120.0, 145.0), room - 12.0))
    stem_metal = "cocrmo" if rng.random() < 0.15 else "ti6al4v"
    collar = c + (t_cut + 1.0) * n
    b1, b2, tip = o - 15.0 * s, o - 0.45 * length * s, o - length * s
    shoulder = o + rng.uniform(8.0, 14.0) * s
    squash = (e_ap, 0.6)
    femur, pelvis = BONE_LABELS[f"femur_{side}"], BONE_LABELS[f"pelvis_{side}"]
    body_pts, body_r = [collar, b1, b2, tip], [9.5, 10.5, 8.0, 4.5]

    def shell(x, y, z):
        r = np.sqrt((x - F32(c[0])) ** 2 + (y - F32(c[1])) ** 2 + (z - F32(c[2])) ** 2)
        dome = (x - F32(c[0])) * F32(opening[0]) + (y - F32(c[1])) * F32(opening[1])
        dome = dome + (z - F32(c[2])) * F32(opening[2])
        return np.maximum(np.maximum(r - F32(r_out), F32(r_in) - r), dome)

    parts = [
        ("stem", stem_metal, femur, _tube(body_pts, body_r, squash), *_box_of(body_pts, 10.5)),
        ("stem_shoulder", stem_metal, femur, _tube([shoulder, b1], [7.5, 10.5], squash),
         *_box_of([shoulder, b1], 10.5)),
        ("trunnion", stem_metal, femur, _tube([c, collar], [6.0, 7.0]), *_box_of([c, collar], 7.0)),
        ("head", "cocrmo", femur, _sphere(c, r_head), *_box_of(c, r_head)),
        ("cup", "ti6al4v", pelvis, shell, *_box_of(c, r_out)),
    ]  # fmt: skip

    def resected(x, y, z):  # femoral head and neck above the cut
        rel = [x - F32(c[0]), y - F32(c[1]), z - F32(c[2])]
        t = rel[0] * F32(n[0]) + rel[1] * F32(n[1]) + rel[2] * F32(n[2])
        radial2 = sum(r**2 for r in rel) - t**2
        return (t < F32(t_cut)) & (radial2 < F32((1.8 * rh) ** 2))

    def reamed(x, y, z):
        return _sphere(c, r_out)(x, y, z) < 0

    def liner(x, y, z):  # polyethylene inside the shell, on its dome side
        dome = (x - F32(c[0])) * F32(opening[0]) + (y - F32(c[1])) * F32(opening[1])
        dome = dome + (z - F32(c[2])) * F32(opening[2])
        return (_sphere(c, r_in)(x, y, z) < 0) & (dome < 0)

    reach = 1.8 * rh + t_cut
    edits = [
        ("resect", (femur,), resected, *_box_of([c - rh * n, c + t_cut * n], reach)),
        ("ream", (pelvis, BONE_LABELS[f"pelvis_{_other(side)}"]), reamed, *_box_of(c, r_out)),
        ("liner", None, liner, *_box_of(c, r_in)),
    ]
    params = {
        "head_diameter_mm": 2 * r_head,
        "cup_outer_diameter_mm": round(2 * r_out, 2),
        "cup_shell_mm": round(r_out - r_in, 2),
        "cup_inclination_deg": round(float(np.degrees(incl)), 2),
        "cup_anteversion_deg": round(float(np.degrees(av)), 2),
        "neck_cut_from_head_centre_mm": round(t_cut, 2),
        "stem_length_mm": round(length, 1),
        "stem_material": stem_metal,
    }
    return parts, edits, params


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _nail(anatomy: Anatomy, grid: _Grid, side: str, rng) -> tuple[list, list, dict]:
    lm = anatomy.landmarks[side]
    c, n, s, rh = lm.head_center_mm, lm.neck_axis, lm.shaft_axis, lm.head_radius_mm
    o = c + float(lm.extra.get("neck_length_mm", 45.0)) * n
    femur = BONE_LABELS[f"femur_{side}"]
    metal = "ss316l" if rng.random() < 0.3 else "ti6al4v"
    entry = lm.greater_trochanter_mm - rng.uniform(0.0, 4.0) * s
    q = o - float((o - lm.lesser_trochanter_mm) @ s) * s
    r_prox, r_dist = rng.uniform(7.75, 8.5), rng.uniform(5.0, 5.75)
    proximal = float(np.linalg.norm(q - entry))
    mid = entry + min(55.0, 0.8 * proximal) * _unit(q - entry)
    distal = min(rng.uniform(170.0, 200.0) - proximal, _distal_room_mm(grid, q, s) - 8.0)
    tip = q - distal * s
    nail_pts = [entry, mid, q, tip]
    lag_tip = c - (rh - rng.uniform(8.0, 12.0)) * n
    lag_end = _lateral_exit(anatomy, grid, c, n, femur, 140.0) + rng.uniform(3.0, 8.0) * n
    across = _unit(n - (n @ s) * s)
    shaft_r = float(anatomy.meta.get("femur", {}).get(side, {}).get("shaft_radius_mm", 14.0))
    lock_c = tip + rng.uniform(20.0, 35.0) * s
    half = shaft_r + rng.uniform(4.0, 8.0)
    lock = [lock_c - half * across, lock_c + half * across]
    parts = [
        ("nail", metal, femur, _tube(nail_pts, [r_prox, r_prox, r_dist, r_dist]),
         *_box_of(nail_pts, r_prox)),
        ("lag_screw", metal, femur, _threaded_rod(lag_end, lag_tip, 5.25, 6.0, 22.0),
         *_box_of([lag_end, lag_tip], 6.0)),
        ("locking_screw", metal, femur, _tube(lock, [2.5, 2.5]), *_box_of(lock, 2.5)),
    ]  # fmt: skip
    params = {
        "material": metal,
        "nail_proximal_diameter_mm": round(2 * r_prox, 2),
        "nail_distal_diameter_mm": round(2 * r_dist, 2),
        "nail_length_mm": round(proximal + distal, 1),
        "lag_screw_tip_apex_mm": round(float(rh - np.linalg.norm(lag_tip - c)), 2),
    }
    return parts, [], params


def _screws(anatomy: Anatomy, grid: _Grid, side: str, rng) -> tuple[list, list, dict]:
    lm = anatomy.landmarks[side]
    c, n, s, rh = lm.head_center_mm, lm.neck_axis, lm.shaft_axis, lm.head_radius_mm
    femur = BONE_LABELS[f"femur_{side}"]
    metal = "ss316l" if rng.random() < 0.5 else "ti6al4v"
    up = _unit(s - (s @ n) * n)
    ap = _unit(np.cross(n, up))
    waist = float(anatomy.meta.get("femur", {}).get(side, {}).get("neck_waist_ratio", 0.68)) * rh
    d = rng.uniform(0.4, 0.5) * waist
    offsets = [-d * up, d * (0.5 * up + 0.87 * ap), d * (0.5 * up - 0.87 * ap)]
    parts, lengths = [], []
    for k, off in enumerate(offsets):
        tip = c + off - (rh - rng.uniform(5.0, 8.0)) * n
        end = _lateral_exit(anatomy, grid, c + off, n, femur, 140.0) + rng.uniform(2.0, 4.0) * n
        thread = rng.uniform(16.0, 32.0)
        washer = [end, end + 2.5 * n]
        parts.append(
            (f"screw_{k + 1}", metal, femur, _threaded_rod(end, tip, 2.4, 3.6, thread),
             *_box_of([end, tip], 3.6))
        )  # fmt: skip
        parts.append(
            (f"washer_{k + 1}", metal, femur, _tube(washer, [5.5, 5.5]), *_box_of(washer, 5.5))
        )
        lengths.append(round(float(np.linalg.norm(end - tip)), 1))
    params = {"material": metal, "screw_lengths_mm": lengths, "spread_mm": round(d, 2)}
    return parts, [], params


BUILDERS = {"hip_replacement": _hip_replacement, "nail": _nail, "screws": _screws}


# ---- into the anatomy -----------------------------------------------------------------------


def insert_implant(anatomy: Anatomy, plan: dict) -> dict:
    """Put the implant ``plan`` (from :func:`draw_implant`) into ``anatomy`` (in place):
    bone resected or reamed where the kind needs it, metal replacing what it displaces,
    ``anatomy.metal`` set, the metal labelled ``IMPLANT_LABEL``. Returns the implant's record
    for truth.json (side, type, label, parts and their materials, parameters)."""
    side, kind = plan["side"], plan["type"]
    if kind not in BUILDERS:
        raise ValueError(f"implant type must be one of {', '.join(IMPLANT_TYPES)}, not {kind!r}")
    rng = np.random.default_rng(plan["seed"])
    grid = _Grid(anatomy)
    parts, edits, params = BUILDERS[kind](anatomy, grid, side, rng)
    for name, owners, inside, lo, hi in edits:
        _edit(anatomy, grid, name, owners, inside, lo, hi)
    metal = _rasterise(grid, parts, seed=int(rng.integers(0, 2**31 - 1)))
    _displace(anatomy, metal)
    anatomy.metal = metal
    return {
        "side": side,
        "type": kind,
        "label": IMPLANT_LABEL,
        "parts": [{"name": p[0], "material": p[1]} for p in parts],
        "params": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in params.items()},
        "metal_voxels": int(metal.fraction.size),
    }


def _edit(anatomy: Anatomy, grid: _Grid, name: str, owners, inside, lo, hi) -> None:
    """Remove the bone of ``owners`` inside ``inside`` (resection, reaming; soft tissue there
    becomes muscle), or with ``owners`` None set the polyethylene liner's HU."""
    box = grid.box(lo, hi)
    if box is None:
        return
    region = np.broadcast_to(inside(*grid.coords(box)), anatomy.labels[box].shape)
    if owners is None:
        anatomy.soft_tissue_hu[box][region] = POLYETHYLENE_HU
        return
    bone = region & np.isin(anatomy.mineral_owner[box], owners)
    anatomy.mineral_mg_cm3[box][bone] = 0.0
    anatomy.mineral_owner[box][bone] = 0
    anatomy.soft_tissue_hu[box][bone] = TISSUE_HU["muscle"]
    anatomy.labels[box][bone & np.isin(anatomy.labels[box], owners)] = 0


def _rasterise(grid: _Grid, parts: list, seed: int) -> MetalVoxels:
    """Metal volume fraction of the parts' SDFs (partial volume over a voxel), the material
    and owner of the part that fills most of each voxel."""
    boxes = [grid.box(lo, hi) for *_, lo, hi in parts]
    union = tuple(
        slice(min(b[a].start for b in boxes if b), max(b[a].stop for b in boxes if b))
        for a in range(3)
    )
    shape = tuple(s.stop - s.start for s in union)
    frac = np.zeros(shape, F32)
    material = np.zeros(shape, np.uint8)
    owner = np.zeros(shape, np.uint8)
    for (_, metal, own, fn, _, _), box in zip(parts, boxes, strict=True):
        if box is None:
            continue
        d = np.broadcast_to(fn(*grid.coords(box)), tuple(s.stop - s.start for s in box))
        f = np.clip(0.5 - d / F32(grid.pv), 0.0, 1.0).astype(F32)
        rel = tuple(
            slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union, strict=True)
        )
        better = f > frac[rel]
        frac[rel] = np.where(better, f, frac[rel])
        material[rel] = np.where(better, METALS.index(metal), material[rel])
        owner[rel] = np.where(better, own, owner[rel])
    k, j, i = np.nonzero(frac)
    index = (k + union[0].start, j + union[1].start, i + union[2].start)
    return MetalVoxels(index, frac[k, j, i], material[k, j, i], owner[k, j, i], seed)


def _displace(anatomy: Anatomy, metal: MetalVoxels) -> None:
    """The metal displaces tissue: mineral and soft tissue scaled by (1 - f), the metal's part
    air (its attenuation is added by the CT and the radiographs); the metal's voxels move with
    its bone (owner), and are labelled where the metal fills at least half."""
    idx, f = metal.index, metal.fraction
    anatomy.mineral_mg_cm3[idx] *= 1.0 - f
    anatomy.soft_tissue_hu[idx] = (1.0 - f) * anatomy.soft_tissue_hu[idx] - 1000.0 * f
    anatomy.mineral_owner[idx] = metal.owner
    full = f >= 0.5
    anatomy.labels[tuple(a[full] for a in idx)] = IMPLANT_LABEL
