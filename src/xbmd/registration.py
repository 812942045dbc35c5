"""2D-3D registration of a calibrated CT to one radiograph, one rigid body at a time.

The bodies are the pelvis (both hip bones, and whatever else the label map puts with them) and
each femur; each has six pose parameters about its own centre (docs/geometry.md): the midpoint of
the femoral heads for the pelvis, the head centre for a femur.

Method (docs/registration.md):

1. Initial poses: a user-given pose, or the default AP pose (CT axes parallel to the room axes,
   pelvis centre on the central ray at the isocentre, whose depth the DICOM geometry gives). A
   template match of the pelvis's DRR gradients over the radiograph finds its in-plane position.
2. Pelvis first: multi-resolution search on a pyramid of the radiograph (2.4, 1.2, 0.6 mm detector
   pixels for a 0.3 mm detector): a global, derivative-free CMA-ES search (the ``cma`` package,
   several starts, populations rendered as one batch) on the coarsest level, then gradient
   refinement of the similarity through the differentiable renderer on the finer levels.
3. Each femur then starts with its head in the registered acetabulum (the CT's femur-in-acetabulum
   position carried by the pelvis pose); its rotation is searched widely (legs rotate +-25 degrees)
   and its translation only a few mm. The pelvis and the other femur stay in the DRR.
4. Similarity: gradient correlation (or NCC) in a window around the body's projection, inside the
   collimated field (``xbmd.similarity``).
5. Quality: a body is flagged when its final similarity is low, a parameter ended at the edge of
   its search range, or a femoral head left its acetabulum.

``strategy`` selects the search: 'cma+gradient' (default), 'cma' (CMA-ES at every level) or
'gradient' (gradient descent at every level); the benchmark compares them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from xbmd import units
from xbmd.drr import RenderVolume, prepare_volume, render
from xbmd.errors import GeometryError, InputError
from xbmd.geometry import BodyPose, PerspectiveGeometry, RigidTransform
from xbmd.landmarks import FemurLandmarks
from xbmd.similarity import block_all, block_mean, field_mask, similarity
from xbmd.volume import Volume

#: Body name -> the label-map bones it is made of (docs/data-format.md, manifest label_map).
BODY_BONES = {
    "pelvis": ("pelvis_right", "pelvis_left", "sacrum"),  # sacrum: when labelled on its own
    "femur_right": ("femur_right",),
    "femur_left": ("femur_left",),
}
BODY_NAMES = tuple(BODY_BONES)
STRATEGIES = ("cma+gradient", "cma", "gradient")
#: Without DICOM geometry: a typical table bucky SDD and the hips about 15 cm above the detector.
DEFAULT_SDD_MM = 1100.0
DEFAULT_HIP_TO_DETECTOR_MM = 150.0
#: The femur's window covers this much of it below the top of its label, mm (proximal femur; a
#: CT's femoral shaft ends where the radiograph's continues, so the shaft's end stays outside).
FEMUR_WINDOW_LENGTH_MM = 130.0
#: A femoral head more than this far from where the pelvis puts it has left its acetabulum, mm.
MAX_HEAD_SHIFT_MM = 6.0
#: A body with less of its window (femur: its top 130 mm) inside the field than this is flagged:
#: a femur whose shaft is collimated away has no orientation to register.
MIN_VISIBLE_FRACTION = 0.75
#: Soft tissue a bone displaces, HU (skeletal muscle).
MUSCLE_HU = 45.0
POSES_FORMAT = "xbmd-registration"


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register. Angles in degrees, lengths in mm (detector mm for pixel sizes).

    Search ranges are one CMA-ES standard deviation per parameter (room axes: x and z in the
    detector plane, y along the beam); the search is bounded at ``bound_sigmas`` of them.
    """

    similarity: str = "gc"
    strategy: str = "cma+gradient"
    level_pixels_mm: tuple[float, ...] = (2.4, 1.2, 0.6)
    pelvis_levels: int = 2  # the pelvis is large: its pose is settled at 1.2 mm pixels
    cma_starts: int = 2
    cma_popsize: int = 12
    cma_generations: int = 30
    gradient_steps: int = 50
    gradient_rate: float = 0.04
    pelvis_sigma: tuple[float, float, float] = (5.0, 10.0, 25.0)  # rotation, in-plane, depth
    femur_sigma: tuple[float, float, float] = (10.0, 2.0, 2.0)
    refine_sigma_fraction: float = 0.15  # CMA-only strategy: sigma on finer levels
    bound_sigmas: float = 3.0
    window_margin_mm: float = 20.0
    inplane_search_mm: float = 60.0
    min_similarity: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(
                f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"
            )
        if self.similarity not in ("gc", "ncc"):
            raise InputError(f"similarity must be 'gc' or 'ncc', not {self.similarity!r}")


# ------------------------------------------------------------------------------------------------
# The CT side: bodies, centres and landmarks


@dataclass
class Scene:
    """A CT's rigid bodies, ready to render.

    bodies : name -> RenderVolume (restricted to the body's labels; see :func:`build_scene`),
        with its ``isocenter_mm`` set to the body's centre.
    label_ids : name -> label ids of the body.
    window_points_mm : name -> (N, 3) CT-world points whose projection bounds the comparison.
    landmarks_mm : name -> (M, 3) CT-world anatomical points for accuracy figures (femur: head
        centre, neck centre, head-neck junction, both trochanters; pelvis: acetabular centres,
        iliac-crest tops and ischial bottoms).
    """

    bodies: dict[str, RenderVolume]
    label_ids: dict[str, tuple[int, ...]]
    window_points_mm: dict[str, np.ndarray]
    landmarks_mm: dict[str, np.ndarray]

    def centre(self, name: str) -> np.ndarray:
        return np.asarray(self.bodies[name].isocenter_mm, dtype=float)


def build_scene(
    ct: Volume,
    labels: Volume,
    label_map: dict[str, int],
    landmarks: dict[str, FemurLandmarks] | None = None,
    bodies: tuple[str, ...] = BODY_NAMES,
) -> Scene:
    """Prepare the bodies of a CT and its label map for registration.

    ``ct`` in HU (preferred: the bodies render as the attenuation each bone adds to the muscle it
    displaces, as a radiograph sees them; no calibration needed) or a density in mg/cm3.

    ``label_map`` maps bone names (``pelvis_right``, ``pelvis_left``, ``femur_right``,
    ``femur_left``) to label ids. ``landmarks`` (per side) give the femoral head centres; without
    them a head centre is estimated from the label (the centre of its top 40 mm).
    """
    if not ct.same_grid(labels):
        raise InputError(f"label map {labels.source or ''} is not on the grid of the CT")
    values, quantity = _body_values(ct)
    present = set(np.unique(labels.data).tolist())
    ids = {}
    for name in bodies:
        wanted = [label_map[b] for b in BODY_BONES[name] if b in label_map]
        ids[name] = tuple(i for i in wanted if i in present)
        if not ids[name]:
            raise InputError(
                f"{labels.source or 'label map'}: no label of the {name.replace('_', ' ')} "
                f"({', '.join(BODY_BONES[name])} in the label map {label_map})"
            )
    heads = {}
    for side in ("right", "left"):
        name = f"femur_{side}"
        if landmarks and side in landmarks:
            heads[side] = np.asarray(landmarks[side].head_center_mm, dtype=float)
        elif name in ids:
            heads[side] = _estimated_head_centre(labels, ids[name])
    out = Scene({}, ids, {}, {})
    for name in bodies:
        if name == "pelvis":
            centre = (
                (heads["right"] + heads["left"]) / 2
                if len(heads) == 2
                else _centroid(labels, ids[name])
            )
        else:
            centre = heads[name.removeprefix("femur_")]
        out.bodies[name] = prepare_volume(
            values, quantity, labels=labels, label_ids=ids[name], isocenter_mm=centre
        )
        out.window_points_mm[name] = _window_points(labels, ids[name], name)
        out.landmarks_mm[name] = _body_landmarks(labels, label_map, name, landmarks, heads)
    return out


def _body_values(ct: Volume) -> tuple[Volume, str]:
    """What the bodies' DRRs show: in HU, the attenuation a bone adds to the muscle it displaces
    (mineral bright, fatty marrow a little dark, as in a radiograph); in mg/cm3, the mineral."""
    if ct.unit == units.HU:
        excess = (np.asarray(ct.data, np.float32) - np.float32(MUSCLE_HU)) * np.float32(
            units.MU_WATER_PER_CM / 1000.0
        )
        return ct.with_data(excess, unit=units.PER_CM), "attenuation"
    if ct.unit == units.MG_CM3:
        return ct, "density"
    raise InputError(f"{ct.source or 'CT'}: registration needs HU or mg/cm3, not {ct.unit}")


def _voxel_points(labels: Volume, ids, every: int = 1) -> np.ndarray:
    k, j, i = np.nonzero(np.isin(labels.data, ids))
    ijk = np.stack([i, j, k], axis=1)[::every].astype(float)
    return labels.index_to_world(ijk)


def _centroid(labels: Volume, ids) -> np.ndarray:
    return _voxel_points(labels, ids, 7).mean(axis=0)


def _estimated_head_centre(labels: Volume, ids) -> np.ndarray:
    pts = _voxel_points(labels, ids, 3)
    top = pts[pts[:, 2] >= pts[:, 2].max() - 40.0]
    return top.mean(axis=0)


def _window_points(labels: Volume, ids, name: str) -> np.ndarray:
    pts = _voxel_points(labels, ids, 5)
    if name.startswith("femur"):
        pts = pts[pts[:, 2] >= pts[:, 2].max() - FEMUR_WINDOW_LENGTH_MM]
    # the extreme points are enough to bound a projection
    keep = np.unique(np.concatenate([np.argmin(pts, 0), np.argmax(pts, 0)]))
    hull = pts[keep]
    step = max(1, len(pts) // 400)
    return np.concatenate([hull, pts[::step]])


def _body_landmarks(labels, label_map, name, landmarks, heads) -> np.ndarray:
    if name.startswith("femur"):
        side = name.removeprefix("femur_")
        lm = (landmarks or {}).get(side)
        if lm is None:
            return heads[side][None]
        return np.stack(
            [
                lm.head_center_mm,
                lm.neck_center_mm,
                lm.head_neck_junction_mm,
                lm.lesser_trochanter_mm,
                lm.greater_trochanter_mm,
            ]
        )
    pts = [h for h in heads.values()]
    for bone in BODY_BONES["pelvis"]:
        if bone in label_map and np.any(labels.data == label_map[bone]):
            p = _voxel_points(labels, [label_map[bone]], 3)
            pts += [p[np.argmax(p[:, 2])], p[np.argmin(p[:, 2])]]
    return np.stack(pts)


# ------------------------------------------------------------------------------------------------
# The radiograph side


def xray_geometry(xray) -> tuple[PerspectiveGeometry, list[str]]:
    """The perspective geometry of a radiograph (``xbmd.io.xray.XRay``) and warnings.

    Pixel spacing from the file (Imager Pixel Spacing); SDD and SOD from DICOM, else 1100 mm and
    SDD - 150 mm (hips 15 cm above the detector). The principal point is the detector centre.
    """
    warnings = []
    if xray.pixel_spacing_mm is None:
        raise InputError(
            f"{xray.source or 'X-ray'}: no pixel spacing; registration needs it "
            "(give it with --pixel-spacing)"
        )
    sdd = xray.meta.get("sdd_mm")
    sod = xray.meta.get("sod_mm")
    if not sdd:
        sdd = DEFAULT_SDD_MM
        warnings.append(f"no source-detector distance in the file: assumed {sdd:g} mm")
    if not sod or sod >= sdd:
        sod = sdd - DEFAULT_HIP_TO_DETECTOR_MM
        warnings.append(f"no source-patient distance in the file: assumed {sod:g} mm")
    return (
        PerspectiveGeometry(float(sdd), float(sod), xray.pixels.shape, xray.pixel_spacing_mm),
        warnings,
    )


@dataclass
class _Level:
    """One pyramid level: image, field mask and geometry at ``binning`` x the detector pixels."""

    binning: int
    image: np.ndarray
    mask: np.ndarray
    geometry: PerspectiveGeometry
    volume_factor: int


def _pyramid(
    pixels: np.ndarray, geometry: PerspectiveGeometry, settings: RegistrationSettings, voxel_mm
) -> list[_Level]:
    spacing = float(np.mean(geometry.pixel_spacing_mm))
    img = np.asarray(pixels, dtype=np.float32)
    inside = field_mask(img)
    if inside.mean() < 0.05:
        raise InputError("the radiograph's collimated field is almost empty")
    vals = img[inside]
    lo, mid, hi = np.percentile(vals, [5, 50, 95])
    img = (img - mid) / max(hi - lo, 1e-6)
    levels = []
    factors = [max(1, round(mm / spacing)) for mm in settings.level_pixels_mm]
    # a coarse detector may make two levels the same: keep the first of each
    for f in dict.fromkeys(factors):
        at_iso_mm = spacing * f / geometry.magnification
        levels.append(
            _Level(
                f,
                block_mean(img, f),
                block_all(inside, f),
                geometry.binned(f),
                max(1, int(at_iso_mm / voxel_mm + 0.25)),
            )
        )
    return levels


# ------------------------------------------------------------------------------------------------
# Results


@dataclass
class BodyResult:
    """The registered pose of one body and how much to trust it."""

    name: str
    pose: BodyPose
    similarity: float
    flagged: bool
    reasons: list[str] = field(default_factory=list)
    time_s: float = 0.0
    evaluations: int = 0
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.pose.to_dict() | {
            "similarity": round(self.similarity, 5),
            "quality": "flagged" if self.flagged else "good",
            "reasons": self.reasons,
            "time_s": round(self.time_s, 2),
            "evaluations": self.evaluations,
            "trace": self.trace,
        }


@dataclass
class Registration:
    """Poses of every registered body in one radiograph's geometry."""

    geometry: PerspectiveGeometry
    bodies: dict[str, BodyResult]
    similarity_kind: str = "gc"
    warnings: list[str] = field(default_factory=list)
    xray: str | None = None
    ct: str | None = None

    @property
    def flagged(self) -> bool:
        return any(b.flagged for b in self.bodies.values())

    def poses(self) -> dict[str, BodyPose]:
        return {n: b.pose for n, b in self.bodies.items()}

    def to_dict(self) -> dict:
        return {
            "format": POSES_FORMAT,
            "format_version": 1,
            "xray": self.xray,
            "ct": self.ct,
            "geometry": self.geometry.to_dict(),
            "similarity": self.similarity_kind,
            "quality": "flagged" if self.flagged else "good",
            "warnings": self.warnings,
            "poses": {n: b.to_dict() for n, b in self.bodies.items()},
        }

    def write(self, path: str | Path) -> None:
        """Write the JSON (atomically: a temporary file renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)


def read_poses(path: str | Path, xray: str | Path | None = None) -> dict[str, BodyPose]:
    """Body poses from a registration JSON (``xbmd register``) or a virtual case's truth.json.

    A truth.json holds one entry per radiograph; ``xray`` (its file name) picks the entry.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such poses file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    if isinstance(doc, dict) and "xrays" in doc:
        name = Path(xray).name if xray is not None else None
        entries = [e for e in doc["xrays"] if name in (e.get("dicom"), e.get("png"), e.get("name"))]
        if not entries:
            raise InputError(f"{path}: no poses for X-ray {name!r}")
        doc = entries[0]
    if not isinstance(doc, dict) or not isinstance(doc.get("poses"), dict):
        raise InputError(f"{path}: no 'poses' section (expected xbmd register output)")
    try:
        return {n: BodyPose.from_dict(d) for n, d in doc["poses"].items()}
    except GeometryError as e:
        raise InputError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Registration


class _Objective:
    """Similarity of one body's DRR (plus the fixed ones') to one pyramid level, in a window."""

    def __init__(self, body, fixed_bodies, level, window, kind):
        self.body = body.downsampled(level.volume_factor)
        r0, r1, c0, c1 = window
        self.geometry = level.geometry.window(r0, c0, r1 - r0, c1 - c0)
        self.image = torch.from_numpy(np.ascontiguousarray(level.image[r0:r1, c0:c1]))
        self.mask = torch.from_numpy(np.ascontiguousarray(level.mask[r0:r1, c0:c1]))
        self.kind = kind
        self.evaluations = 0
        self.fixed = torch.zeros(r1 - r0, c1 - c0)
        with torch.no_grad():
            for other, vec in fixed_bodies:
                pose = torch.as_tensor(vec, dtype=torch.float64)
                self.fixed += render(other.downsampled(level.volume_factor), pose, self.geometry)[0]

    def __call__(self, poses: torch.Tensor) -> torch.Tensor:
        self.evaluations += poses.shape[0]
        drr = render(self.body, poses, self.geometry) + self.fixed
        return similarity(drr, self.image, self.mask, self.kind)


def _window(points_room: np.ndarray, level: _Level, margin_mm: float) -> tuple[int, int, int, int]:
    rc = level.geometry.project(points_room)
    margin = margin_mm / float(np.mean(level.geometry.pixel_spacing_mm))
    rows, cols = level.image.shape
    r0 = int(max(0, np.floor(rc[:, 0].min() - margin)))
    r1 = int(min(rows, np.ceil(rc[:, 0].max() + margin) + 1))
    c0 = int(max(0, np.floor(rc[:, 1].min() - margin)))
    c1 = int(min(cols, np.ceil(rc[:, 1].max() + margin) + 1))
    if r1 - r0 < 8 or c1 - c0 < 8:
        raise GeometryError("the body projects outside the radiograph")
    return r0, r1, c0, c1


def _to_room(points_mm: np.ndarray, pose: BodyPose) -> np.ndarray:
    m = pose.to_room()
    return points_mm @ m[:3, :3].T + m[:3, 3]


def visible_fraction(points_mm: np.ndarray, pose: BodyPose, level: _Level) -> float:
    """Share of a body's window points whose projection falls inside the radiograph's field."""
    rc = np.rint(level.geometry.project(_to_room(points_mm, pose))).astype(int)
    rows, cols = level.mask.shape
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] >= 0) & (rc[:, 1] < cols)
    seen = np.zeros(len(rc), dtype=bool)
    seen[inside] = level.mask[rc[inside, 0], rc[inside, 1]]
    return float(seen.mean())


def _scales(sigma: tuple[float, float, float]) -> np.ndarray:
    rot, inplane, depth = sigma
    return np.array([rot, rot, rot, inplane, depth, inplane], dtype=float)


def _cma(objective, x0: np.ndarray, scale: np.ndarray, bound: float, settings, starts: int):
    """Maximise ``objective`` over x = x0 + u * scale, |u| <= bound, with CMA-ES; best x."""
    import cma

    best_u, best_f = np.zeros(6), -np.inf
    for start in range(starts):
        es = cma.CMAEvolutionStrategy(
            np.zeros(6),
            1.0,
            {
                "popsize": settings.cma_popsize,
                "bounds": [-bound, bound],
                "seed": settings.seed * 1000 + start + 1,
                "verbose": -9,
                "maxiter": settings.cma_generations,
                "tolfun": 1e-5,
                "tolx": 1e-3,
            },
        )
        while not es.stop():
            us = np.asarray(es.ask())
            poses = torch.as_tensor(x0 + us * scale, dtype=torch.float64)
            with torch.no_grad():
                f = objective(poses).double().numpy()
            es.tell(list(us), list(-f))
            i = int(np.argmax(f))
            if f[i] > best_f:
                best_u, best_f = us[i].copy(), float(f[i])
    return x0 + best_u * scale, best_f


def _gradient(objective, x0: np.ndarray, scale: np.ndarray, lower, upper, settings):
    """Maximise ``objective`` by Adam on normalised parameters from ``x0``; best x seen."""
    u = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    sc = torch.as_tensor(scale, dtype=torch.float64)
    base = torch.as_tensor(x0, dtype=torch.float64)
    opt = torch.optim.Adam([u], lr=settings.gradient_rate)
    # Adam's steps stay about lr long: anneal so the end point is not an oscillation
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, settings.gradient_steps, eta_min=settings.gradient_rate / 20
    )
    best_x, best_f = x0.copy(), -np.inf
    lo = torch.as_tensor((lower - x0) / scale)
    hi = torch.as_tensor((upper - x0) / scale)
    for _ in range(settings.gradient_steps):
        opt.zero_grad()
        f = objective((base + u * sc)[None])[0]
        if float(f.detach()) > best_f:
            best_x, best_f = (base + u * sc).detach().numpy().copy(), float(f.detach())
        (-f).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            u.copy_(torch.maximum(torch.minimum(u, hi), lo))
    with torch.no_grad():
        f = float(objective((base + u * sc)[None])[0])
    if f >= best_f:
        best_x, best_f = (base + u * sc).detach().numpy().copy(), f
    return best_x, best_f


def _register_body(
    name: str,
    scene: Scene,
    levels: list[_Level],
    init: BodyPose,
    fixed: list[tuple[RenderVolume, np.ndarray]],
    sigma: tuple[float, float, float],
    settings: RegistrationSettings,
) -> BodyResult:
    t0 = time.perf_counter()
    body = scene.bodies[name]
    scale = _scales(sigma)
    x_init = init.vector
    lower = x_init - settings.bound_sigmas * scale
    upper = x_init + settings.bound_sigmas * scale
    x, f = x_init.copy(), -np.inf
    trace, evaluations = [], 0
    for n, level in enumerate(levels):
        t_level = time.perf_counter()
        pose = BodyPose(init.label_ids, init.isocenter_mm, RigidTransform.from_vector(x))
        window = _window(
            _to_room(scene.window_points_mm[name], pose), level, settings.window_margin_mm
        )
        objective = _Objective(body, fixed, level, window, settings.similarity)
        use_cma = settings.strategy == "cma" or (settings.strategy == "cma+gradient" and n == 0)
        if use_cma:
            frac = 1.0 if n == 0 else settings.refine_sigma_fraction
            bound = settings.bound_sigmas / frac
            # the search box stays the global one: clip the CMA bound around the current x
            room = np.minimum((upper - x) / (scale * frac), (x - lower) / (scale * frac))
            bound = float(max(min(bound, room.min()), 0.5))
            x, f = _cma(
                objective, x, scale * frac, bound, settings, settings.cma_starts if n == 0 else 1
            )
        else:
            x, f = _gradient(objective, x, scale, lower, upper, settings)
        evaluations += objective.evaluations
        trace.append(
            {
                "pixel_mm": round(float(np.mean(level.geometry.pixel_spacing_mm)), 3),
                "method": "cma" if use_cma else "gradient",
                "similarity": round(f, 5),
                "evaluations": objective.evaluations,
                "window_px": [window[1] - window[0], window[3] - window[2]],
                "volume_factor": level.volume_factor,
                "time_s": round(time.perf_counter() - t_level, 2),
            }
        )
    pose = BodyPose(init.label_ids, init.isocenter_mm, RigidTransform.from_vector(x))
    reasons = []
    if f < settings.min_similarity:
        reasons.append(f"similarity {f:.3f} below {settings.min_similarity:g}")
    at_edge = np.abs(x - x_init) >= 0.98 * settings.bound_sigmas * scale
    if at_edge.any():
        names = np.array(["rx", "ry", "rz", "tx", "ty", "tz"])[at_edge]
        reasons.append(f"{', '.join(names)} at the edge of the search range")
    visible = visible_fraction(scene.window_points_mm[name], pose, levels[-1])
    if visible < MIN_VISIBLE_FRACTION:
        reasons.append(
            f"only {100 * visible:.0f} % of the {name.replace('_', ' ')} inside the collimated "
            "field: too little of it to pose it"
        )
    if name.startswith("femur"):
        shift = np.linalg.norm(x[3:] - x_init[3:])
        if shift > MAX_HEAD_SHIFT_MM:
            reasons.append(f"femoral head {shift:.1f} mm from its acetabulum")
    return BodyResult(
        name, pose, float(f), bool(reasons), reasons, time.perf_counter() - t0, evaluations, trace
    )


def default_pose(scene: Scene, name: str, pelvis: BodyPose | None = None) -> BodyPose:
    """The default AP pose: CT axes along the room axes, pelvis centre at the isocentre; a femur
    carried by ``pelvis`` (its head where the pelvis pose puts the CT's head centre)."""
    ids, centre = scene.label_ids[name], scene.centre(name)
    if name == "pelvis" or pelvis is None:
        return BodyPose(ids, centre, RigidTransform())
    return BodyPose(ids, pelvis.isocenter_mm, pelvis.transform).about(centre)


def _inplane_search(scene: Scene, level: _Level, pose: BodyPose, settings) -> BodyPose:
    """Shift the pelvis in the detector plane to where its DRR gradients best match (template
    matching of gradient magnitudes, skimage.feature.match_template)."""
    from skimage.feature import match_template

    body = scene.bodies["pelvis"]
    pts = _to_room(scene.window_points_mm["pelvis"], pose)
    r0, r1, c0, c1 = _window(pts, level, 0.0)
    geom = level.geometry.window(r0, c0, r1 - r0, c1 - c0)
    with torch.no_grad():
        drr = render(body.downsampled(level.volume_factor), torch.as_tensor(pose.vector), geom)[0]
    template = _gradient_magnitude(drr.numpy())
    image = _gradient_magnitude(level.image) * level.mask
    reach = int(settings.inplane_search_mm / float(np.mean(level.geometry.pixel_spacing_mm)))
    pr0, pc0 = max(0, r0 - reach), max(0, c0 - reach)
    region = image[pr0 : min(image.shape[0], r1 + reach), pc0 : min(image.shape[1], c1 + reach)]
    if region.shape[0] <= template.shape[0] or region.shape[1] <= template.shape[1]:
        return pose
    score = match_template(region, template)
    dr, dc = np.unravel_index(int(np.argmax(score)), score.shape)
    shift_r, shift_c = pr0 + dr - r0, pc0 + dc - c0
    mag = level.geometry.sdd_mm / (level.geometry.sod_mm + pose.transform.translation_mm[1])
    sr, sc = level.geometry.pixel_spacing_mm
    t = np.asarray(pose.transform.translation_mm) + np.array(
        [shift_c * sc / mag, 0.0, -shift_r * sr / mag]
    )
    return BodyPose(pose.label_ids, pose.isocenter_mm, replace(pose.transform, translation_mm=t))


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    return np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1))


def register(
    scene: Scene,
    pixels: np.ndarray,
    geometry: PerspectiveGeometry,
    *,
    settings: RegistrationSettings | None = None,
    init: dict[str, BodyPose] | None = None,
    bodies: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Registration:
    """Register the bodies of ``scene`` to one radiograph.

    Parameters
    ----------
    scene : from :func:`build_scene`.
    pixels : ndarray (rows, cols), the radiograph, bone bright (``XRay.pixels``).
    geometry : its PerspectiveGeometry (:func:`xray_geometry`), size equal to ``pixels.shape``.
    init : optional starting poses per body (any centre of rotation). The pelvis starts from its
        given pose (else the default AP pose, then an in-plane template search); a femur starts
        with the given rotation, but its head where the registered pelvis puts it.
    bodies : which bodies (default: all in the scene); the pelvis is always registered first.

    Returns
    -------
    Registration with per-body poses (about the scene's body centres), final similarity, and a
    quality flag with reasons.
    """
    settings = settings or RegistrationSettings()
    init = init or {}
    names = tuple(bodies or scene.bodies)
    if tuple(pixels.shape) != tuple(geometry.size_px):
        raise GeometryError(f"image {pixels.shape} and geometry {geometry.size_px} differ in size")
    if "pelvis" not in scene.bodies:
        raise InputError("registration starts with the pelvis: the scene has none")
    voxel_mm = float(min(np.linalg.norm(scene.bodies["pelvis"].affine[:3, :3], axis=0)))
    levels = _pyramid(pixels, geometry, settings, voxel_mm)
    done: dict[str, BodyResult] = {}
    rng = torch.random.fork_rng()
    with rng:
        torch.manual_seed(settings.seed)
        if "pelvis" in init:
            start = init["pelvis"].about(scene.centre("pelvis"))
        else:
            start = _inplane_search(scene, levels[0], default_pose(scene, "pelvis"), settings)
        if progress:
            progress("pelvis")
        done["pelvis"] = _register_body(
            "pelvis",
            scene,
            levels[: settings.pelvis_levels],
            start,
            [],
            settings.pelvis_sigma,
            settings,
        )
        femurs = [n for n in names if n.startswith("femur") and n in scene.bodies]
        for name in femurs:
            if progress:
                progress(name)
            carried = default_pose(scene, name, done["pelvis"].pose)
            if name in init:
                given = init[name].about(scene.centre(name))
                carried = BodyPose(
                    carried.label_ids,
                    carried.isocenter_mm,
                    RigidTransform(given.transform.rotation_deg, carried.transform.translation_mm),
                )
            fixed = [(scene.bodies[n], r.pose.vector) for n, r in done.items()]
            fixed += [
                (scene.bodies[o], default_pose(scene, o, done["pelvis"].pose).vector)
                for o in femurs
                if o != name and o not in done
            ]
            done[name] = _register_body(
                name, scene, levels, carried, fixed, settings.femur_sigma, settings
            )
    return Registration(geometry, {n: done[n] for n in names if n in done}, settings.similarity)


def projected_distance_mm(
    points_mm: np.ndarray, pose_a: BodyPose, pose_b: BodyPose, geometry: PerspectiveGeometry
) -> np.ndarray:
    """Distance (mm, at the detector) between the projections of CT points under two poses."""
    a = geometry.project(_to_room(points_mm, pose_a))
    b = geometry.project(_to_room(points_mm, pose_b))
    spacing = np.asarray(geometry.pixel_spacing_mm, dtype=float)
    return np.linalg.norm((a - b) * spacing, axis=1)


def rotation_error_deg(pose_a: BodyPose, pose_b: BodyPose) -> float:
    """Angle (degrees) of the rotation between two poses' orientations."""
    r = pose_a.transform.rotation_matrix @ pose_b.transform.rotation_matrix.T
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


__all__ = [
    "BODY_NAMES",
    "Registration",
    "RegistrationSettings",
    "Scene",
    "build_scene",
    "default_pose",
    "projected_distance_mm",
    "read_poses",
    "register",
    "rotation_error_deg",
    "xray_geometry",
]
