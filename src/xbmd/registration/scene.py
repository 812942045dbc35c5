"""The CT side of 2D-3D registration: its rigid bodies (pelvis, each femur) ready to render, their
centres, windows and landmarks, and their default AP poses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xbmd import units
from xbmd.ct.landmarks import FemurLandmarks
from xbmd.drr import RenderVolume, prepare_volume
from xbmd.errors import InputError
from xbmd.geometry import BodyPose, RigidTransform
from xbmd.volume import Volume

#: Body name -> the label-map bones it is made of (docs/data-format.md, manifest label_map).
BODY_BONES = {
    "pelvis": ("pelvis_right", "pelvis_left", "sacrum"),  # sacrum: when labelled on its own
    "femur_right": ("femur_right",),
    "femur_left": ("femur_left",),
}


BODY_NAMES = tuple(BODY_BONES)


#: The femur's window covers this much of it below the top of its label, mm (proximal femur; a
#: CT's femoral shaft ends where the radiograph's continues, so the shaft's end stays outside).
FEMUR_WINDOW_LENGTH_MM = 130.0


#: Soft tissue a bone displaces, HU (skeletal muscle).
MUSCLE_HU = 45.0


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


def default_pose(scene: Scene, name: str, pelvis: BodyPose | None = None) -> BodyPose:
    """The default AP pose: CT axes along the room axes, pelvis centre at the isocentre; a femur
    carried by ``pelvis`` (its head where the pelvis pose puts the CT's head centre)."""
    ids, centre = scene.label_ids[name], scene.centre(name)
    if name == "pelvis" or pelvis is None:
        return BodyPose(ids, centre, RigidTransform())
    return BodyPose(ids, pelvis.isocenter_mm, pelvis.transform).about(centre)
