"""BMD measures of a proximal femur from a calibrated CT: the ground-truth labels of xbmd.

Definitions (docs/bmd-definitions.md explains them with a figure):

Neutral pose
    The femur rotated about its head centre so that the shaft axis points up (+z, superior) and the
    neck axis lies in the coronal (x-z) plane, pointing laterally: the standardised position of
    Uemura et al. (Arch Osteoporos 2022), with anteversion and rotation removed.
DXA-like total-hip aBMD (``ct_abmd_g_cm2``)
    Parallel AP projection of the femur's mineral (label-restricted) in the neutral pose on
    0.25 mm pixels; region = femur pixels distal to the head-neck junction (the line through the
    junction perpendicular to the neck axis) and above the line 20 mm below the lesser trochanter
    tip (perpendicular to the shaft); aBMD = mean of the projection over that region, g/cm2.
Femoral-neck aBMD (``neck_abmd_g_cm2``)
    Same projection; a DXA-like neck box 15 mm along the neck axis centred on the neck centre,
    femur pixels only.
Proximal-femur vBMD (``qct_vbmd_mg_cm3``)
    Mean calibrated density (mg/cm3) over femur-label voxels above the plane 20 mm below the lesser
    trochanter tip, perpendicular to the shaft axis: head, neck, trochanters. The same region is the
    proximal-femur (PF) DRR's volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xbmd import units
from xbmd.ct.landmarks import FemurLandmarks
from xbmd.drr import prepare_volume, render
from xbmd.errors import GeometryError, InputError
from xbmd.geometry import ParallelGeometry, RigidTransform, translation_matrix
from xbmd.volume import Volume, bounding_box

#: Pixel size of the neutral-pose projection (Uemura et al. 2022), mm.
NEUTRAL_PIXEL_MM = 0.25
#: The total-hip region and the PF volume end this far below the lesser trochanter tip, mm.
BELOW_LESSER_TROCHANTER_MM = 20.0
#: Width of the femoral-neck box along the neck axis, mm (Hologic-like).
NECK_BOX_WIDTH_MM = 15.0
#: Half-length of the neck box across the neck, mm (long enough to span any neck).
NECK_BOX_HALF_LENGTH_MM = 30.0
#: A projected pixel belongs to the femur when its chord through the label exceeds this, mm.
SILHOUETTE_CHORD_MM = 0.5


@dataclass(frozen=True)
class FemurBmd:
    """BMD measures of one femur. Areas in cm2, volumes in cm3."""

    side: str
    ct_abmd_g_cm2: float
    neck_abmd_g_cm2: float
    qct_vbmd_mg_cm3: float
    total_hip_area_cm2: float
    neck_area_cm2: float
    pf_volume_cm3: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class NeutralProjection:
    """The neutral-pose projection and its regions, for display and checks (row, col) images."""

    abmd_g_cm2: np.ndarray  # (rows, cols) projected mineral, g/cm2
    silhouette: np.ndarray  # bool, femur pixels
    total_hip_roi: np.ndarray  # bool
    neck_roi: np.ndarray  # bool
    geometry: ParallelGeometry
    landmarks_room: FemurLandmarks  # landmarks in the neutral room frame


def neutral_rotation(landmarks: FemurLandmarks) -> np.ndarray:
    """3x3 rotation taking CT-world directions to the neutral frame (see module docstring).

    Shaft axis -> +z; neck axis -> in the x-z plane, towards the patient's side (lateral: -x for
    a right femur, +x for a left one, in LPS).
    """
    z_new = landmarks.shaft_axis
    neck = landmarks.neck_axis - (landmarks.neck_axis @ z_new) * z_new
    if np.linalg.norm(neck) < 1e-3:
        raise GeometryError("neck axis is parallel to the shaft axis: landmarks are not a femur")
    lateral = neck / np.linalg.norm(neck)
    x_new = -lateral if landmarks.side == "right" else lateral
    y_new = np.cross(z_new, x_new)
    return np.stack([x_new, y_new, z_new])  # rows: new axes in world coordinates


def neutral_pose(landmarks: FemurLandmarks) -> RigidTransform:
    """Pose (about the head centre) that puts the femur in the neutral pose, head at the origin."""
    m = np.eye(4)
    m[:3, :3] = neutral_rotation(landmarks)
    return RigidTransform.from_matrix(m)


def _neutral_detector(lm_room: FemurLandmarks, pixel_mm: float) -> ParallelGeometry:
    """A parallel AP detector covering head, neck, trochanters and the ROI's distal end."""
    pts = np.stack(
        [
            lm_room.head_center_mm,
            lm_room.greater_trochanter_mm,
            lm_room.lesser_trochanter_mm,
            lm_room.neck_center_mm,
        ]
    )
    margin = lm_room.head_radius_mm + 15.0
    x0, x1 = pts[:, 0].min() - margin, pts[:, 0].max() + margin
    z1 = pts[:, 2].max() + margin
    z0 = lm_room.lesser_trochanter_mm[2] - BELOW_LESSER_TROCHANTER_MM - 15.0
    cols = int(np.ceil((x1 - x0) / pixel_mm))
    rows = int(np.ceil((z1 - z0) / pixel_mm))
    # room origin (head centre) sits at this (row, col): columns grow with +x, rows with -z
    principal = (z1 / pixel_mm - 0.5, -x0 / pixel_mm - 0.5)
    return ParallelGeometry((rows, cols), pixel_mm, principal_point_px=principal)


def neutral_projection(
    density: Volume,
    labels: Volume,
    label_id: int,
    landmarks: FemurLandmarks,
    pixel_mm: float = NEUTRAL_PIXEL_MM,
) -> NeutralProjection:
    """Project the femur's mineral in the neutral pose and build the total-hip and neck regions.

    Parameters
    ----------
    density : Volume in mg/cm3 (a calibrated CT, or a true mineral map).
    labels : label map on the same grid; ``label_id`` is this femur's label.
    landmarks : this femur's landmarks in the CT world frame.
    """
    if density.unit != units.MG_CM3:
        raise InputError(f"femur measures need a density volume in mg/cm3, not {density.unit}")
    density, labels = crop_to_label(density, labels, label_id)
    pose = neutral_pose(landmarks)
    lm_room = landmarks.transformed(pose.matrix() @ translation_matrix(-landmarks.head_center_mm))
    geometry = _neutral_detector(lm_room, pixel_mm)
    vec = torch.as_tensor(pose.as_vector(), dtype=torch.float64)
    body = prepare_volume(
        density,
        "density",
        labels=labels,
        label_ids=[label_id],
        isocenter_mm=landmarks.head_center_mm,
    )
    mask = density.with_data((labels.data == label_id).astype(np.float32), unit=units.MG_CM3)
    chord = prepare_volume(mask, "density", isocenter_mm=landmarks.head_center_mm)
    with torch.no_grad():
        abmd = render(body, vec, geometry)[0].numpy()
        chord_mm = render(chord, vec, geometry)[0].numpy() / units.G_CM2_PER_MG_CM3_MM
    silhouette = chord_mm > SILHOUETTE_CHORD_MM
    total, neck = _regions(geometry, lm_room, silhouette)
    return NeutralProjection(abmd, silhouette, total, neck, geometry, lm_room)


def crop_to_label(
    volume: Volume, labels: Volume, label_id: int, margin_vox: int = 2
) -> tuple[Volume, Volume]:
    """``volume`` and ``labels`` cropped to the box of ``label_id`` plus a margin (same world)."""
    if not volume.same_grid(labels):
        raise InputError(f"label map {labels.source or ''} is not on the grid of the volume")
    box = bounding_box(labels.data == label_id, margin_vox)
    if box is None:
        raise InputError(f"label {label_id} not found in {labels.source or 'the label map'}")
    return volume.crop(box), labels.crop(box)


def _regions(
    geometry: ParallelGeometry, lm: FemurLandmarks, silhouette: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Total-hip and neck-box masks (rows, cols) in the neutral projection."""
    centres = geometry.pixel_centers_mm()[..., [0, 2]]  # (rows, cols, 2): room x, z
    along = lm.neck_axis[[0, 2]] / np.linalg.norm(lm.neck_axis[[0, 2]])
    across = np.array([-along[1], along[0]])
    beyond_junction = (centres - lm.head_neck_junction_mm[[0, 2]]) @ along >= 0
    z_cut = lm.lesser_trochanter_mm[2] - BELOW_LESSER_TROCHANTER_MM
    total = silhouette & beyond_junction & (centres[..., 1] >= z_cut)
    rel = centres - lm.neck_center_mm[[0, 2]]
    neck = (
        silhouette
        & (np.abs(rel @ along) <= NECK_BOX_WIDTH_MM / 2)
        & (np.abs(rel @ across) <= NECK_BOX_HALF_LENGTH_MM)
    )
    return total, neck


def proximal_femur_mask(labels: Volume, label_id: int, landmarks: FemurLandmarks) -> np.ndarray:
    """Boolean (K, J, I) mask of the femur voxels in the proximal-femur region (see module doc)."""
    k, j, i = np.nonzero(labels.data == label_id)
    mask = np.zeros(labels.data.shape, dtype=bool)
    if k.size == 0:
        raise InputError(f"label {label_id} not found in {labels.source or 'the label map'}")
    world = labels.index_to_world(np.stack([i, j, k], axis=1).astype(float))
    height = (world - landmarks.lesser_trochanter_mm) @ landmarks.shaft_axis
    keep = height >= -BELOW_LESSER_TROCHANTER_MM
    mask[k[keep], j[keep], i[keep]] = True
    return mask


def measure_femur(
    density: Volume,
    labels: Volume,
    label_id: int,
    landmarks: FemurLandmarks,
    pixel_mm: float = NEUTRAL_PIXEL_MM,
) -> FemurBmd:
    """All BMD measures of one femur from a density volume (mg/cm3) and its label.

    Examples
    --------
    >>> bmd = measure_femur(ct_mg_cm3, labels, 4, landmarks["left"])  # doctest: +SKIP
    >>> bmd.ct_abmd_g_cm2  # doctest: +SKIP
    0.83
    """
    proj = neutral_projection(density, labels, label_id, landmarks, pixel_mm)
    if proj.total_hip_roi.sum() == 0 or proj.neck_roi.sum() == 0:
        raise GeometryError(f"{landmarks.side} femur: the total-hip or neck region is empty")
    pf = proximal_femur_mask(labels, label_id, landmarks)
    pixel_cm2 = (pixel_mm / 10.0) ** 2
    voxel_cm3 = float(np.prod(density.spacing_mm)) / 1000.0
    return FemurBmd(
        side=landmarks.side,
        ct_abmd_g_cm2=float(proj.abmd_g_cm2[proj.total_hip_roi].mean()),
        neck_abmd_g_cm2=float(proj.abmd_g_cm2[proj.neck_roi].mean()),
        qct_vbmd_mg_cm3=float(density.data[pf].mean()),
        total_hip_area_cm2=float(proj.total_hip_roi.sum() * pixel_cm2),
        neck_area_cm2=float(proj.neck_roi.sum() * pixel_cm2),
        pf_volume_cm3=float(pf.sum() * voxel_cm3),
    )
