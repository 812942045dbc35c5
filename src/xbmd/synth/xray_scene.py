"""Posing a virtual patient for an AP hip/pelvis radiograph and rendering its line integrals.

Rigid bodies (docs/geometry.md conventions, poses applied about each body's isocentre):

- ``pelvis`` (labels 1 and 2) with the soft tissue, about the midpoint of the femoral heads:
  pelvic tilt (rx), in-plane rotation (ry), axial rotation (rz), and a shift (table position,
  table height along the beam);
- ``femur_right`` (label 3) and ``femur_left`` (label 4), each about its femoral head centre:
  flexion, abduction and internal rotation relative to the pelvis, then carried by the pelvis.

Attenuation at the device's effective energy: soft tissue ``mu_water * (1 + HU/1000)`` and bone
mineral ``bone_excess_cm2_g * density``. A femur's own marrow and partial-volume soft tissue
move with it (its soft-tissue difference to muscle is rendered as part of the femur body), so a
rotated femur leaves no ghost of its canal behind.
"""

from __future__ import annotations

import numpy as np
import torch

from xbmd import units
from xbmd.drr import prepare_volume, render
from xbmd.geometry import (
    BodyPose,
    PerspectiveGeometry,
    RigidTransform,
    femur_rotation_deg,
    rounded,
)
from xbmd.synth.model import BONE_LABELS, Anatomy
from xbmd.volume import Box, Volume, bounding_box, box_affine

#: Body name -> label ids (of the label map and of Anatomy.mineral_owner).
BODIES = {
    "pelvis": (BONE_LABELS["pelvis_right"], BONE_LABELS["pelvis_left"]),
    "femur_right": (BONE_LABELS["femur_right"],),
    "femur_left": (BONE_LABELS["femur_left"],),
}
#: Detector field (rows x cols), mm: a 14 x 17 inch cassette in landscape, the AP pelvis field.
DETECTOR_MM = (350.0, 430.0)
#: Gap between the table top (patient's back) and the detector plane, mm (bucky tray).
TABLE_TO_DETECTOR_MM = 60.0
#: HU a femur's voxels take in the soft-tissue body when the femur moves (muscle).
MUSCLE_HU = 45.0
#: The soft tissue continues this far beyond both ends of the CT in the radiographs, mm.
SOFT_EXTEND_MM = 120.0
#: Render soft tissue and bones on this many output pixels per side, then upsample (smooth).
SOFT_FACTOR, BONE_FACTOR = 4, 2


def sample_motions(rng: np.random.Generator, standard: bool) -> dict:
    """Draw patient positioning for one radiograph (degrees, mm).

    ``standard`` is a well-positioned AP pelvis (femurs internally rotated ~10-15 degrees, pelvis
    square to the detector); otherwise the everyday spread of tilt, rotation and leg position.
    """
    if standard:
        pelvis = {
            "tilt_deg": rng.normal(0, 3),
            "inplane_deg": rng.normal(0, 1.5),
            "axial_rotation_deg": rng.normal(0, 2),
        }
        legs = {
            s: {
                "flexion_deg": rng.normal(2, 3),
                "abduction_deg": rng.normal(0, 3),
                "internal_rotation_deg": rng.normal(12, 5),
            }
            for s in ("right", "left")
        }
    else:
        pelvis = {
            "tilt_deg": rng.uniform(-10, 10),
            "inplane_deg": rng.uniform(-4, 4),
            "axial_rotation_deg": rng.uniform(-8, 8),
        }
        legs = {
            s: {
                "flexion_deg": rng.uniform(-5, 15),
                "abduction_deg": rng.uniform(-8, 12),
                "internal_rotation_deg": rng.uniform(-25, 25),
            }
            for s in ("right", "left")
        }
    pelvis["shift_mm"] = [rng.normal(0, 8), rng.normal(0, 10), rng.normal(-25, 10)]
    out = {"pelvis": pelvis, "femur": legs}
    return _floats(out)


def _floats(d):
    if isinstance(d, dict):
        return {k: _floats(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_floats(v) for v in d]
    return round(float(d), 4)


def body_poses(anatomy: Anatomy, motions: dict) -> dict[str, BodyPose]:
    """Rigid pose of every body for the sampled ``motions`` (femurs carried by the pelvis)."""
    p = motions["pelvis"]
    centre = np.asarray(anatomy.pelvis_center_mm, dtype=float)
    pelvis = RigidTransform(
        (p["tilt_deg"], p["inplane_deg"], p["axial_rotation_deg"]), tuple(p["shift_mm"])
    )
    poses = {"pelvis": BodyPose(BODIES["pelvis"], centre, pelvis)}
    for side in ("right", "left"):
        leg = motions["femur"][side]
        rot = RigidTransform(
            femur_rotation_deg(
                side, leg["flexion_deg"], leg["abduction_deg"], leg["internal_rotation_deg"]
            ),
            (0.0, 0.0, 0.0),
        )
        head = anatomy.landmarks[side].head_center_mm
        r_p = pelvis.rotation_matrix
        matrix = np.eye(4)
        matrix[:3, :3] = r_p @ rot.rotation_matrix
        matrix[:3, 3] = r_p @ (head - centre) + np.asarray(pelvis.translation_mm)
        poses[f"femur_{side}"] = BodyPose(
            BODIES[f"femur_{side}"], head, RigidTransform.from_matrix(matrix)
        )
    return poses


def sample_geometry(
    rng: np.random.Generator, anatomy: Anatomy, pixel_spacing_mm: float, sdd_mm: float | None = None
) -> PerspectiveGeometry:
    """AP geometry: SDD 100-120 cm (or the device's); the hip centres lie as far above the
    detector as the patient's back is behind them, plus the table-to-detector gap.

    Rows and columns are multiples of SOFT_FACTOR so the coarse renders upsample exactly.
    """
    sdd = float(rng.uniform(1000.0, 1200.0)) if sdd_mm is None else float(sdd_mm)
    back_mm = _posterior_skin_y(anatomy) - anatomy.pelvis_center_mm[1]
    sod = sdd - (back_mm + TABLE_TO_DETECTOR_MM)
    size = tuple(round(mm / pixel_spacing_mm / SOFT_FACTOR) * SOFT_FACTOR for mm in DETECTOR_MM)
    return PerspectiveGeometry(sdd, sod, size, pixel_spacing_mm)


def _posterior_skin_y(anatomy: Anatomy) -> float:
    rows = np.nonzero((anatomy.soft_tissue_hu > -500).any(axis=(0, 2)))[0]
    j = rows.max() if rows.size else anatomy.soft_tissue_hu.shape[1] // 2
    return float(anatomy.affine[1, 3] + anatomy.affine[1, 1] * j)


def _upsample(image: torch.Tensor, factor: int) -> np.ndarray:
    if factor == 1:
        return image.numpy()
    up = torch.nn.functional.interpolate(
        image[None], scale_factor=factor, mode="bilinear", align_corners=False
    )
    return up[0].numpy()


def _extended_soft_tissue(mu: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue attenuation on a 2x coarser grid, continued beyond the CT's ends in z.

    A radiograph's field reaches past the CT's slab (abdomen above, thighs below); repeating the
    end slices for SOFT_EXTEND_MM avoids a black band of "no patient" there. Soft tissue is
    rendered on coarse detector pixels anyway, so 2 mm voxels lose nothing and cost 8x less.
    """
    k, j, i = (n - n % 2 for n in mu.shape)
    coarse = mu[:k, :j, :i].reshape(k // 2, 2, j // 2, 2, i // 2, 2).mean(axis=(1, 3, 5))
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * 2
    out[:3, 3] = affine[:3, :3] @ [0.5, 0.5, 0.5] + affine[:3, 3]
    pad = int(np.ceil(SOFT_EXTEND_MM / np.linalg.norm(out[:3, 2])))
    out[:3, 3] -= out[:3, 2] * pad
    return np.pad(coarse, ((pad, pad), (0, 0), (0, 0)), mode="edge").astype(np.float32), out


def _volume(mu: np.ndarray, affine: np.ndarray, box: Box) -> Volume:
    """Attenuation Volume of ``mu``, which covers ``box`` of the anatomy grid."""
    return Volume(np.asarray(mu, np.float32), box_affine(affine, box), units.PER_CM, "anatomy")


class SceneBodies:
    """The attenuation bodies of one patient at one effective energy, built once per patient."""

    def __init__(self, anatomy: Anatomy, mu_water_per_cm: float, bone_excess_cm2_g: float):
        owner = anatomy.mineral_owner
        soft = anatomy.soft_tissue_hu.copy()
        femur_ids = BODIES["femur_right"] + BODIES["femur_left"]
        self.bones = {}
        for name, ids in BODIES.items():
            box = bounding_box(np.isin(owner, ids))
            inside = np.isin(owner[box], ids)
            mu = np.where(
                inside, anatomy.mineral_mg_cm3[box] * np.float32(bone_excess_cm2_g * 1e-3), 0
            )
            if ids[0] in femur_ids:
                # a femur's marrow and edge soft tissue move with it: its difference to muscle
                diff = np.where(inside, anatomy.soft_tissue_hu[box] - np.float32(MUSCLE_HU), 0)
                mu += np.float32(mu_water_per_cm / 1000.0) * diff
                soft[box][inside] = MUSCLE_HU
            self.bones[name] = prepare_volume(_volume(mu, anatomy.affine, box), "attenuation")
        mu_soft, affine = _extended_soft_tissue(
            units.hu_to_attenuation(soft, mu_water_per_cm), anatomy.affine
        )
        self.soft = prepare_volume(
            Volume(mu_soft, affine, units.PER_CM, "virtual anatomy, soft tissue"),
            "attenuation",
            isocenter_mm=anatomy.pelvis_center_mm,
        )

    def line_integral(
        self,
        poses: dict[str, BodyPose],
        geometry: PerspectiveGeometry,
        soft_scale: float = 1.0,
        bone_scale: float = 1.0,
    ) -> np.ndarray:
        """Total dimensionless line integral (rows, cols) for the given body poses.

        ``soft_scale`` and ``bone_scale`` rescale the soft-tissue and bone attenuation to another
        effective energy (ratios of mu_water and of bone_excess_cm2_g) without rebuilding.
        """

        def vec(p: BodyPose) -> torch.Tensor:
            return torch.as_tensor(p.transform.as_vector(), dtype=torch.float64)

        with torch.no_grad():
            soft = render(self.soft, vec(poses["pelvis"]), geometry.binned(SOFT_FACTOR))
            bodies, bone_poses = [], []
            for name, body in self.bones.items():
                body.isocenter_mm = poses[name].isocenter_mm
                bodies.append(body)
                bone_poses.append(vec(poses[name]))
            bone = render(bodies, bone_poses, geometry.binned(BONE_FACTOR))
        return (
            soft_scale * _upsample(soft, SOFT_FACTOR) + bone_scale * _upsample(bone, BONE_FACTOR)
        )[0]


def projected_landmarks(
    anatomy: Anatomy, poses: dict[str, BodyPose], geometry: PerspectiveGeometry
) -> dict:
    """Detector (row, col) of each femur's landmarks in this radiograph."""
    out = {}
    for side, lm in anatomy.landmarks.items():
        moved = lm.transformed(poses[f"femur_{side}"].to_room())
        names = (
            "head_center_mm",
            "neck_center_mm",
            "lesser_trochanter_mm",
            "greater_trochanter_mm",
            "head_neck_junction_mm",
        )
        rc = geometry.project(np.stack([getattr(moved, n) for n in names]))
        out[side] = {
            n.removesuffix("_mm") + "_px": rounded(p) for n, p in zip(names, rc, strict=True)
        }
    return out
