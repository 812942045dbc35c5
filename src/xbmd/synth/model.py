"""The data objects passed between the stages of the virtual-cohort generator.

population -> Patient -> anatomy -> Anatomy -> scanner (CT, phantom) and radiograph (X-rays).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from xbmd.ct.landmarks import FemurLandmarks
from xbmd.geometry import SIDES

if TYPE_CHECKING:
    from xbmd.synth.metal import MetalVoxels

#: Bone label ids of the virtual cohort (same ids as ``xbmd.ct.phantoms.LABELS``).
#: The order of every per-side seeded draw of the virtual cohort: left first, as since the first
#: cohorts (changing it would change every cohort and every figure made from one).
DRAW_SIDES = SIDES[::-1]
BONE_LABELS = {"pelvis_right": 1, "pelvis_left": 2, "femur_right": 3, "femur_left": 4}


@dataclass(frozen=True)
class Patient:
    """One synthetic patient, as drawn from the population model.

    total_hip_abmd_g_cm2 : the DXA-like total-hip aBMD this patient should have, per side
        ('left', 'right'), g/cm2; the generator scales the bone mineral to reach it.
    bone_z : the patient's age- and sex-matched Z-score (mean of both sides); drives bone
        architecture (cortical thickness, trabecular density) so that the final scaling is small.
    seed : per-patient seed for everything random about this patient.
    """

    patient_id: str
    age_years: float
    sex: str  # 'F' or 'M'
    height_cm: float
    weight_kg: float
    total_hip_abmd_g_cm2: dict[str, float]
    bone_z: float
    seed: int

    @property
    def bmi(self) -> float:
        return self.weight_kg / (self.height_cm / 100.0) ** 2


@dataclass
class Anatomy:
    """Material maps of one synthetic patient on a CT grid, before any scanner.

    All arrays have shape (K, J, I) = (slices S-I, rows A-P, columns L-R) on ``affine``
    (index (i, j, k, 1) -> LPS mm, as ``xbmd.volume.Volume``).

    mineral_mg_cm3 : float32, hydroxyapatite-equivalent bone mineral density, mg/cm3; 0 outside
        bone. Partial-volume voxels at bone edges hold the mineral of their bone fraction.
    soft_tissue_hu : float32, HU each voxel would have with its mineral removed (air -1000, fat
        about -100, muscle about +45, marrow inside bones, bowel gas): the scanner adds the
        mineral's HU on top, the X-ray converts it to attenuation.
    labels : uint8, BONE_LABELS ids (bone fraction >= 0.5), 0 elsewhere: the segmentation.
    mineral_owner : uint8, the BONE_LABELS id owning each voxel's mineral, non-zero wherever
        mineral_mg_cm3 > 0 (partial-volume edge voxels included), so that each bone can be
        rendered with all of its mineral when it is posed on its own.
    landmarks : 'left'/'right' -> FemurLandmarks, LPS mm.
    pelvis_center_mm : (3,) midpoint of the two femoral head centres, LPS mm.
    meta : the shape parameters that were drawn (JSON-serialisable), for truth.json.
    metal : an implant's metal (``xbmd.synth.metal.MetalVoxels``), or None (no implant).
    """

    affine: np.ndarray
    mineral_mg_cm3: np.ndarray
    soft_tissue_hu: np.ndarray
    labels: np.ndarray
    mineral_owner: np.ndarray
    landmarks: dict[str, FemurLandmarks]
    pelvis_center_mm: np.ndarray
    meta: dict = field(default_factory=dict)
    metal: MetalVoxels | None = None
