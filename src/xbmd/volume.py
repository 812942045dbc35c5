"""The ``Volume`` type: voxels with their geometry and unit.

Array layout follows ITK / scikit-image: ``data`` has shape (K, J, I) = (plane, row, column),
where the ITK index (i, j, k) addresses ``data[k, j, i]``. The 4x4 ``affine`` maps the homogeneous
index (i, j, k, 1) to patient LPS world coordinates in mm (see docs/geometry.md), so direction
cosines are part of the affine and are never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xbmd.units import check_unit


@dataclass
class Volume:
    """A 3D image in physical space.

    Parameters
    ----------
    data : ndarray of shape (K, J, I)
        Voxel values, float32 for intensities (HU, mg/cm3, 1/cm), integer for label maps.
    affine : ndarray of shape (4, 4)
        Index (i, j, k, 1) -> LPS mm. Columns 0..2 are direction x spacing, column 3 the origin.
    unit : str
        One of ``xbmd.units.VOLUME_UNITS``: 'HU', 'mg/cm3', '1/cm', 'label'.
    source : str, optional
        Where the volume was read from, for error messages.
    """

    data: np.ndarray
    affine: np.ndarray
    unit: str
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_unit(self.unit)
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D (K, J, I), got shape {self.data.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError("affine is singular (zero spacing or degenerate directions)")

    @classmethod
    def from_geometry(
        cls,
        data: np.ndarray,
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
        unit: str = "HU",
        source: str | None = None,
    ) -> Volume:
        """Build from ITK-style spacing (i, j, k order, mm), origin (LPS mm) and 3x3 direction."""
        d = (
            np.eye(3)
            if direction is None
            else np.asarray(direction, dtype=np.float64).reshape(3, 3)
        )
        affine = np.eye(4)
        affine[:3, :3] = d @ np.diag(np.asarray(spacing_mm, dtype=np.float64))
        affine[:3, 3] = origin_mm
        return cls(data=data, affine=affine, unit=unit, source=source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, J, I) = (plane, row, column) voxel counts."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Voxel counts in ITK index order (I, J, K)."""
        k, j, i = self.data.shape
        return (i, j, k)

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel spacing in mm, ITK index order (i, j, k)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines (columns: world direction of i, j, k)."""
        return self.affine[:3, :3] / self.spacing_mm

    @property
    def origin_mm(self) -> np.ndarray:
        """World (LPS, mm) position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def center_mm(self) -> np.ndarray:
        """World (LPS, mm) position of the geometric centre of the voxel grid."""
        centre_ijk = (np.asarray(self.size_ijk, dtype=np.float64) - 1.0) / 2.0
        return self.index_to_world(centre_ijk)

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous index (..., 3) in (i, j, k) order -> LPS mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz_mm: np.ndarray) -> np.ndarray:
        """LPS mm (..., 3) -> continuous index (..., 3) in (i, j, k) order."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz_mm, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and affine (within ``tol_mm``)."""
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, atol=tol_mm)
        )

    def with_data(self, data: np.ndarray, unit: str | None = None) -> Volume:
        """A volume on the same grid with new voxel values (and optionally a new unit)."""
        if data.shape != self.data.shape:
            raise ValueError(f"new data shape {data.shape} differs from grid {self.data.shape}")
        return Volume(
            data=data,
            affine=self.affine.copy(),
            unit=self.unit if unit is None else unit,
            source=self.source,
            meta=dict(self.meta),
        )

    def crop(self, box: tuple[slice, slice, slice]) -> Volume:
        """The sub-volume ``data[box]`` (a (K, J, I) box of unit-step slices), same world."""
        return Volume(
            data=np.ascontiguousarray(self.data[box]),
            affine=box_affine(self.affine, box),
            unit=self.unit,
            source=self.source,
            meta=dict(self.meta),
        )


Box = tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray, margin: int = 0) -> Box | None:
    """(K, J, I) slices around the True voxels of ``mask``, grown by ``margin`` voxels and
    clipped to the array; None when nothing is True."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)


def box_affine(affine: np.ndarray, box: Box) -> np.ndarray:
    """Affine of the sub-grid that starts at ``box``'s first voxel (same spacing, same world)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    start_ijk = np.array([box[2].start or 0, box[1].start or 0, box[0].start or 0], float)
    out[:3, 3] = affine[:3, :3] @ start_ijk + affine[:3, 3]
    return out
