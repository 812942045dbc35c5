"""Shared by the anatomy's builders (femur, pelvis, soft tissue) and their assembly.

The generator's materials (:data:`TISSUE_HU`) and side signs; evaluating a body part's SDF
primitives into one field (:func:`build_field`) and reading a field's distances on another grid
(``_field_distance``) or to a polyline (``_points_distance``); the voxels of one bone field
(:class:`BoneVoxels`) and the cortex fraction of a voxel below the bone surface.
"""

from __future__ import annotations

import numpy as np

from xbmd.synth import sdf
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


def build_field(grid: Grid, frame: Frame, prims: list[tuple], margin_mm: float) -> Field:
    """Evaluate primitives ``(fn, lo, hi, op, k)`` in order into one SDF field."""
    lo = np.min([np.asarray(q[1], float) for q in prims], axis=0)
    hi = np.max([np.asarray(q[2], float) for q in prims], axis=0)
    field = Field(grid, frame, lo, hi, margin_mm)
    for fn, plo, phi, op, k, *gap in prims:
        field.apply(fn, plo, phi, op, k, *gap)
    return field


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
