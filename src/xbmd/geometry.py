"""Geometry conventions of xbmd, in one place (explained with figures in docs/geometry.md).

World frame
    Patient LPS, in mm: +x towards the patient's Left, +y Posterior, +z Superior. This is the
    frame of DICOM and of ITK/SimpleITK, so CT affines need no flips on the way in.

Room frame (the X-ray frame)
    Axes parallel to LPS of a patient lying supine in the reference pose, origin at the isocentre,
    mm. A body (pelvis, a femur, a whole CT) is placed in it by a rigid pose applied around its
    isocentre: ``room = R @ (ct_world - isocentre) + t``.

Rigid pose
    Six numbers at the interface: rotations (rx, ry, rz) in degrees about the room axes x (L-R),
    y (A-P), z (S-I), applied extrinsically in the order x, then y, then z (R = Rz @ Ry @ Rx), and a
    translation (tx, ty, tz) in mm along room axes, applied after the rotation.

Projection
    AP view (default): source anterior at y = -SOD, beam travels +y (anterior -> posterior),
    detector plane at y = SDD - SOD. PA view: source posterior, beam -y.
    Detector pixels (row, col), both views displayed as a radiologist reads an AP film:
    column index grows towards the patient's Left (+x), so the patient's right is on the image left;
    row index grows towards Inferior (-z), so the head is at the top.
    Pixel (r, c) centre = detector centre + (c - pc) * spacing_col * e_col
                                          + (r - pr) * spacing_row * e_row,
    where (pr, pc) is the principal point, the foot of the perpendicular from the source
    (default: the detector centre). Parallel geometry uses the same detector axes, rays along
    the beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from xbmd.errors import GeometryError

#: The patient's sides, right first: the canonical orientation of a hip crop (a left hip is
#: mirrored to look like a right one) and the order of the localiser's heatmap channels.
SIDES = ("right", "left")
#: Extrinsic Euler order used everywhere (scipy lower-case = extrinsic).
EULER_ORDER = "xyz"
VIEWS = ("ap", "pa")

#: Detector axes in the room frame (same for AP and PA: images are shown as an AP film).
E_COL = np.array([1.0, 0.0, 0.0])  # column index grows towards patient Left
E_ROW = np.array([0.0, 0.0, -1.0])  # row index grows towards Inferior


def _beam_direction(view: str) -> np.ndarray:
    if view not in VIEWS:
        raise GeometryError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    return np.array([0.0, 1.0, 0.0]) if view == "ap" else np.array([0.0, -1.0, 0.0])


def translation_matrix(offset_mm: np.ndarray) -> np.ndarray:
    """4x4 homogeneous translation by ``offset_mm`` (3,)."""
    m = np.eye(4)
    m[:3, 3] = offset_mm
    return m


@dataclass(frozen=True)
class RigidTransform:
    """A rotation followed by a translation: ``y = R @ x + t``.

    Parameters
    ----------
    rotation_deg : (3,) array-like
        Extrinsic rotations about x, y, z in degrees, applied in that order.
    translation_mm : (3,) array-like
        Translation in mm, applied after the rotation.

    Examples
    --------
    >>> pose = RigidTransform((0, 0, 90), (10, 0, 0))
    >>> np.round(pose.apply([1.0, 0.0, 0.0]), 6).tolist()
    [10.0, 1.0, 0.0]
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation_deg", tuple(float(v) for v in self.rotation_deg))
        object.__setattr__(self, "translation_mm", tuple(float(v) for v in self.translation_mm))
        if len(self.rotation_deg) != 3 or len(self.translation_mm) != 3:
            raise GeometryError("a rigid pose needs 3 rotations (deg) and 3 translations (mm)")

    @classmethod
    def identity(cls) -> RigidTransform:
        return cls()

    @classmethod
    def from_vector(cls, params: np.ndarray) -> RigidTransform:
        """From (rx, ry, rz, tx, ty, tz) in degrees and mm."""
        p = np.asarray(params, dtype=np.float64).reshape(6)
        return cls(tuple(p[:3]), tuple(p[3:]))

    def as_vector(self) -> np.ndarray:
        """(rx, ry, rz, tx, ty, tz) in degrees and mm."""
        return np.array([*self.rotation_deg, *self.translation_mm])

    @property
    def rotation_matrix(self) -> np.ndarray:
        return Rotation.from_euler(EULER_ORDER, self.rotation_deg, degrees=True).as_matrix()

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation_matrix
        m[:3, 3] = self.translation_mm
        return m

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, tol: float = 1e-6) -> RigidTransform:
        """From a 4x4 rigid matrix; refuses scaling, shear, reflection."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1], atol=tol):
            raise GeometryError("a rigid transform must be a 4x4 matrix with last row 0 0 0 1")
        r = m[:3, :3]
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-5) or np.linalg.det(r) < 0:
            raise GeometryError("matrix is not a proper rotation (scaled, sheared or mirrored)")
        angles = Rotation.from_matrix(r).as_euler(EULER_ORDER, degrees=True)
        return cls(tuple(angles), tuple(m[:3, 3]))

    def compose(self, other: RigidTransform) -> RigidTransform:
        """``self ∘ other``: apply ``other`` first, then ``self``."""
        return RigidTransform.from_matrix(self.matrix() @ other.matrix())

    def inverse(self) -> RigidTransform:
        return RigidTransform.from_matrix(np.linalg.inv(self.matrix()))

    def apply(self, points_mm: np.ndarray) -> np.ndarray:
        """Transform points (..., 3) in mm."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.rotation_matrix.T + np.asarray(self.translation_mm)


def rounded(values, digits: int = 5) -> list[float]:
    """Plain floats rounded for JSON files."""
    return [round(float(x), digits) for x in values]


@dataclass(frozen=True)
class BodyPose:
    """Where one rigid body of a CT is in the room: ``room = R(rotation_deg) (x - isocenter) + t``.

    ``label_ids`` are the body's labels in the CT's label map; ``isocenter_mm`` is a CT-world point
    (LPS mm), the centre of rotation of ``transform``. The JSON form (``to_dict``) is the one of the
    virtual cohort's ``truth.json`` and of ``xbmd register`` (docs/data-format.md).
    """

    label_ids: tuple[int, ...]
    isocenter_mm: np.ndarray
    transform: RigidTransform

    def to_dict(self) -> dict:
        return {
            "label_ids": [int(i) for i in self.label_ids],
            "isocenter_mm": rounded(self.isocenter_mm),
            "rotation_deg": rounded(self.transform.rotation_deg),
            "translation_mm": rounded(self.transform.translation_mm),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BodyPose:
        try:
            return cls(
                tuple(int(i) for i in d.get("label_ids", ())),
                np.asarray(d["isocenter_mm"], dtype=float).reshape(3),
                RigidTransform(
                    tuple(float(x) for x in d["rotation_deg"]),
                    tuple(float(x) for x in d["translation_mm"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GeometryError(f"not a body pose ({exc}): {d!r}"[:300]) from None

    def to_room(self) -> np.ndarray:
        """4x4 CT-world -> room matrix."""
        return self.transform.matrix() @ translation_matrix(-np.asarray(self.isocenter_mm))

    def points_to_room(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) CT-world points (LPS mm) -> (N, 3) room points (mm) under this pose."""
        m = self.to_room()
        return np.asarray(points_mm, dtype=float) @ m[:3, :3].T + m[:3, 3]

    @property
    def vector(self) -> np.ndarray:
        """(rx, ry, rz, tx, ty, tz) about ``isocenter_mm``, for ``drr.render``."""
        return self.transform.as_vector()

    def about(self, isocenter_mm: np.ndarray) -> BodyPose:
        """The same placement expressed about another centre of rotation."""
        c = np.asarray(isocenter_mm, dtype=float)
        return BodyPose(
            self.label_ids, c, RigidTransform.from_matrix(self.to_room() @ translation_matrix(c))
        )


def femur_rotation_deg(
    side: str, flexion_deg: float = 0.0, abduction_deg: float = 0.0, internal_deg: float = 0.0
) -> tuple[float, float, float]:
    """Pose rotations (rx, ry, rz) in degrees for hip motions of one femur (docs/geometry.md).

    Flexion moves the knee anteriorly (-y), abduction moves it laterally, internal rotation turns
    the femur's anterior surface medially. With LPS axes the signs depend on the side:
    flexion = -rx for both sides; abduction = +ry on the right, -ry on the left; internal rotation
    = +rz on the right, -rz on the left. For combined motions the extrinsic x-y-z order applies.
    """
    if side not in SIDES:
        raise GeometryError(f"side must be 'right' or 'left', not {side!r}")
    sign = 1.0 if side == "right" else -1.0
    return (-flexion_deg, sign * abduction_deg, sign * internal_deg)


def pose_matrices(params: torch.Tensor) -> torch.Tensor:
    """Differentiable 4x4 matrices from pose vectors.

    Parameters
    ----------
    params : Tensor of shape (B, 6)
        (rx, ry, rz) in degrees, extrinsic x-y-z, then (tx, ty, tz) in mm.

    Returns
    -------
    Tensor of shape (B, 4, 4), same dtype and device, equal to ``RigidTransform.matrix()``.
    """
    if params.ndim != 2 or params.shape[1] != 6:
        raise GeometryError(f"pose parameters must have shape (B, 6), not {tuple(params.shape)}")
    rad = torch.deg2rad(params[:, :3])
    c, s = torch.cos(rad), torch.sin(rad)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1)
    b = params.shape[0]
    r = rz.view(b, 3, 3) @ ry.view(b, 3, 3) @ rx.view(b, 3, 3)
    top = torch.cat([r, params[:, 3:, None]], dim=2)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=params.dtype, device=params.device)
    return torch.cat([top, bottom.expand(b, 1, 4)], dim=1)


def body_to_room(pose: torch.Tensor, isocenter_mm: np.ndarray) -> torch.Tensor:
    """CT-world -> room matrices for poses applied around ``isocenter_mm`` (LPS mm, CT world).

    ``pose`` is (B, 6) pose vectors or (B, 4, 4) matrices; returns (B, 4, 4).
    """
    m = pose_matrices(pose) if pose.shape[-1] == 6 and pose.ndim == 2 else pose
    shift = torch.as_tensor(translation_matrix(-np.asarray(isocenter_mm)), dtype=m.dtype)
    return m @ shift


@dataclass(frozen=True)
class _Detector:
    size_px: tuple[int, int]
    pixel_spacing_mm: tuple[float, float]
    principal_point_px: tuple[float, float] | None
    view: str

    def _set_detector(self, size_px, pixel_spacing_mm, principal_point_px, view) -> None:
        """Store and check the detector fields (frozen dataclass: via object.__setattr__)."""
        spacing = (
            (float(pixel_spacing_mm),) * 2
            if np.isscalar(pixel_spacing_mm)
            else tuple(float(v) for v in pixel_spacing_mm)
        )
        object.__setattr__(self, "size_px", tuple(int(v) for v in size_px))
        object.__setattr__(self, "pixel_spacing_mm", spacing)
        object.__setattr__(self, "principal_point_px", principal_point_px)
        object.__setattr__(self, "view", view)
        rows, cols = self.size_px
        if rows < 1 or cols < 1:
            raise GeometryError(f"detector size must be positive, got {self.size_px}")
        if min(self.pixel_spacing_mm) <= 0:
            raise GeometryError(f"pixel spacing must be positive, got {self.pixel_spacing_mm} mm")
        _beam_direction(self.view)

    @property
    def principal_point(self) -> tuple[float, float]:
        """(row, col) pixel coordinates of the foot of the central ray."""
        if self.principal_point_px is not None:
            return self.principal_point_px
        rows, cols = self.size_px
        return ((rows - 1) / 2.0, (cols - 1) / 2.0)

    @property
    def beam(self) -> np.ndarray:
        """Unit beam direction (room frame)."""
        return _beam_direction(self.view)

    def _pixel_offsets_mm(self) -> np.ndarray:
        """(rows, cols, 3) in-plane offsets of pixel centres from the principal point, mm."""
        rows, cols = self.size_px
        pr, pc = self.principal_point
        r = (np.arange(rows) - pr) * self.pixel_spacing_mm[0]
        c = (np.arange(cols) - pc) * self.pixel_spacing_mm[1]
        return r[:, None, None] * E_ROW + c[None, :, None] * E_COL


@dataclass(frozen=True)
class PerspectiveGeometry(_Detector):
    """Cone-beam (point source) geometry of a radiograph.

    Parameters
    ----------
    sdd_mm : float
        Source-to-detector distance, mm.
    sod_mm : float
        Source-to-isocentre (object) distance, mm; magnification at the isocentre is sdd/sod.
    size_px : (rows, cols)
    pixel_spacing_mm : (row, col), at the detector (DICOM Imager Pixel Spacing).
    principal_point_px : (row, col) or None for the detector centre.
    view : 'ap' or 'pa'.
    """

    sdd_mm: float
    sod_mm: float

    def __init__(
        self,
        sdd_mm: float,
        sod_mm: float,
        size_px: tuple[int, int],
        pixel_spacing_mm: float | tuple[float, float],
        principal_point_px: tuple[float, float] | None = None,
        view: str = "ap",
    ) -> None:
        self._set_detector(size_px, pixel_spacing_mm, principal_point_px, view)
        object.__setattr__(self, "sdd_mm", float(sdd_mm))
        object.__setattr__(self, "sod_mm", float(sod_mm))
        if not 0 < self.sod_mm < self.sdd_mm:
            raise GeometryError(
                f"need 0 < SOD < SDD, got SOD {self.sod_mm} mm and SDD {self.sdd_mm} mm"
            )

    @property
    def source_mm(self) -> np.ndarray:
        """Source position in the room frame, mm."""
        return -self.sod_mm * self.beam

    @property
    def magnification(self) -> float:
        """Magnification of an object at the isocentre."""
        return self.sdd_mm / self.sod_mm

    def to_dict(self) -> dict:
        """JSON-serialisable fields (``from_dict`` reads them back)."""
        return {
            "view": self.view,
            "sdd_mm": float(self.sdd_mm),
            "sod_mm": float(self.sod_mm),
            "size_px": [int(n) for n in self.size_px],
            "pixel_spacing_mm": [float(s) for s in self.pixel_spacing_mm],
            "principal_point_px": [float(p) for p in self.principal_point],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PerspectiveGeometry:
        """From ``to_dict``'s fields; GeometryError naming a missing one."""
        try:
            return cls(
                d["sdd_mm"],
                d["sod_mm"],
                tuple(d["size_px"]),
                tuple(d["pixel_spacing_mm"]),
                principal_point_px=tuple(d["principal_point_px"]),
                view=d.get("view", "ap"),
            )
        except KeyError as e:
            raise GeometryError(f"geometry lacks {e.args[0]!r}") from None

    def binned(self, factor: int) -> PerspectiveGeometry:
        """The same detector with ``factor`` x larger pixels; pixel centres stay consistent.

        Binned pixel (r, c) covers original pixels factor*r ... factor*r + factor - 1, so an image
        rendered here and upsampled bilinearly (align_corners=False) lands on the original grid.
        """
        rows, cols = self.size_px
        pr, pc = self.principal_point
        shift = (factor - 1) / 2
        return PerspectiveGeometry(
            self.sdd_mm,
            self.sod_mm,
            (rows // factor, cols // factor),
            tuple(s * factor for s in self.pixel_spacing_mm),
            principal_point_px=((pr - shift) / factor, (pc - shift) / factor),
            view=self.view,
        )

    def window(self, row0: int, col0: int, rows: int, cols: int) -> PerspectiveGeometry:
        """The sub-detector of pixels [row0, row0 + rows) x [col0, col0 + cols) (same rays).

        Used to render or compare only a region of interest; pixel (r, c) of the window is pixel
        (row0 + r, col0 + c) of this detector.
        """
        pr, pc = self.principal_point
        return PerspectiveGeometry(
            self.sdd_mm,
            self.sod_mm,
            (int(rows), int(cols)),
            self.pixel_spacing_mm,
            principal_point_px=(pr - row0, pc - col0),
            view=self.view,
        )

    def pixel_centers_mm(self) -> np.ndarray:
        """(rows, cols, 3) pixel centres in the room frame, mm."""
        centre = self.source_mm + self.sdd_mm * self.beam
        return centre + self._pixel_offsets_mm()

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins (rows, cols, 3), all at the source, and source-to-pixel vectors (same)."""
        pix = self.pixel_centers_mm()
        origins = np.broadcast_to(self.source_mm, pix.shape).copy()
        return origins, pix - origins

    def project(self, points_mm: np.ndarray) -> np.ndarray:
        """Room points (..., 3) -> continuous pixel coordinates (..., 2) as (row, col)."""
        v = np.asarray(points_mm, dtype=np.float64) - self.source_mm
        depth = v @ self.beam
        if np.any(depth <= 0):
            raise GeometryError("a point lies behind the source; it cannot be projected")
        scale = self.sdd_mm / depth
        pr, pc = self.principal_point
        row = (v @ E_ROW) * scale / self.pixel_spacing_mm[0] + pr
        col = (v @ E_COL) * scale / self.pixel_spacing_mm[1] + pc
        return np.stack([row, col], axis=-1)


@dataclass(frozen=True)
class ParallelGeometry(_Detector):
    """Parallel-beam geometry (DXA-like). Pixels are at the isocentre plane, spacing in mm there."""

    def __init__(
        self,
        size_px: tuple[int, int],
        pixel_spacing_mm: float | tuple[float, float],
        principal_point_px: tuple[float, float] | None = None,
        view: str = "ap",
    ) -> None:
        self._set_detector(size_px, pixel_spacing_mm, principal_point_px, view)

    @property
    def magnification(self) -> float:
        return 1.0

    def pixel_centers_mm(self) -> np.ndarray:
        """(rows, cols, 3) pixel centres on the plane through the isocentre, mm."""
        return self._pixel_offsets_mm()

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins (rows, cols, 3) on the isocentre plane, unit directions (rows, cols, 3)."""
        origins = self.pixel_centers_mm()
        return origins, np.broadcast_to(self.beam, origins.shape).copy()

    def project(self, points_mm: np.ndarray) -> np.ndarray:
        """Room points (..., 3) -> continuous pixel coordinates (..., 2) as (row, col)."""
        p = np.asarray(points_mm, dtype=np.float64)
        pr, pc = self.principal_point
        row = (p @ E_ROW) / self.pixel_spacing_mm[0] + pr
        col = (p @ E_COL) / self.pixel_spacing_mm[1] + pc
        return np.stack([row, col], axis=-1)


ProjectionGeometry = PerspectiveGeometry | ParallelGeometry
