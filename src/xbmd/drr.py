"""Digitally reconstructed radiographs: line integrals of a volume along the rays of a radiograph.

The renderer is a pure function of (volumes, poses, geometry), written in PyTorch and differentiable
with respect to the poses. Geometry conventions are those of ``xbmd.geometry`` (docs/geometry.md).

Algorithm (Joseph 1982, "An improved algorithm for reprojecting rays through pixel images"):
for each ray, pick the volume axis most aligned with the rays (the "slab axis"); the ray crosses
every voxel plane of that axis once; at each crossing, sample the plane by bilinear interpolation
and add ``value x (ray length between planes)``. This is the integral of the volume interpolated
linearly along the slab axis and bilinearly in the plane, sampled at one point per voxel plane
along the dominant axis (``oversample`` > 1 adds linearly interpolated sub-planes, i.e. trilinear
sampling at a step of 1/oversample voxel). Each plane is a 2D ``grid_sample``, which PyTorch
vectorises well on CPU, unlike 3D trilinear sampling (measured about 100x slower per sample here,
see docs/benchmarks.md).

Units: volume values in mg/cm3 give areal density in g/cm2 (x 1e-4 per mm); values in 1/cm give
a dimensionless attenuation line integral (x 0.1 per mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from xbmd import units
from xbmd.errors import GeometryError, InputError
from xbmd.geometry import ParallelGeometry, PerspectiveGeometry, body_to_room
from xbmd.volume import Volume, bounding_box, box_affine

QUANTITIES = ("density", "attenuation")
#: In-plane grid_sample axes for each slab axis (index components i=0, j=1, k=2).
_PLANE_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
#: Permutation of data (K, J, I) that puts the slab axis first: (slab, grid-y, grid-x).
_PERMUTE = {0: (2, 0, 1), 1: (1, 0, 2), 2: (0, 1, 2)}
#: Target number of grid points per grid_sample call (tuned in benchmarks/bench_drr.py).
_POINTS_PER_CALL = 2**21
#: HU below which a voxel holds no mineral (air, gas): the phantom line is not valid there.
AIR_HU = -500.0
#: HU below which a voxel is air for attenuation: air's 0.0003/cm is far below CT noise, and
#: clipping noisy air at 0 would otherwise add a positive bias along every ray.
AIR_HU_ATTENUATION = -900.0


@dataclass
class RenderVolume:
    """A volume prepared for rendering: values in the rendered quantity, cropped, as a tensor.

    Attributes
    ----------
    data : Tensor of shape (K, J, I), float32
        mg/cm3 (density) or 1/cm (attenuation), zero outside the rendered region, with one
        zero voxel of padding on each side.
    affine : ndarray (4, 4)
        Index (i, j, k, 1) of ``data`` -> CT world LPS mm.
    isocenter_mm : ndarray (3,)
        Point of the CT world (LPS mm) placed at the room isocentre by the identity pose, and the
        centre of rotation of the pose. Defaults to the centre of the uncropped volume.
    quantity : 'density' or 'attenuation'.
    """

    data: torch.Tensor
    affine: np.ndarray
    isocenter_mm: np.ndarray
    quantity: str
    _slabs: dict = field(default_factory=dict, repr=False)

    @property
    def output_unit(self) -> str:
        return "g/cm2" if self.quantity == "density" else "unitless"

    @property
    def output_scale(self) -> float:
        """Factor from (value x mm) to the output unit."""
        if self.quantity == "density":
            return units.G_CM2_PER_MG_CM3_MM
        return units.PER_CM_MM_TO_ONE

    def slab(self, axis: int) -> torch.Tensor:
        """Data permuted to (slab, grid-y, grid-x) for slab ``axis`` (cached, contiguous)."""
        if axis not in self._slabs:
            self._slabs[axis] = self.data.permute(*_PERMUTE[axis]).contiguous()
        return self._slabs[axis]

    def downsampled(self, factor: int) -> RenderVolume:
        """The volume on a grid ``factor`` x coarser per axis (block means, cached).

        Line integrals are preserved (values are means, lengths grow by ``factor``): a coarse
        rendering for coarse detector pixels, ``factor**3`` fewer voxels to sample.
        """
        if factor == 1:
            return self
        key = ("down", factor)
        if key not in self._slabs:
            data = self.data[None, None]
            pad = [(-n) % factor for n in self.data.shape]  # (K, J, I) padding to a multiple
            data = F.pad(data, (0, pad[2], 0, pad[1], 0, pad[0]))
            coarse = F.avg_pool3d(data, factor)[0, 0]
            affine = self.affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
            affine[:3, :3] = affine[:3, :3] * factor
            self._slabs[key] = RenderVolume(
                F.pad(coarse, (1, 1, 1, 1, 1, 1)).contiguous(),
                _shift_for_padding(affine),
                self.isocenter_mm,
                self.quantity,
            )
        out = self._slabs[key]
        out.isocenter_mm = self.isocenter_mm
        return out

    def corners_mm(self) -> np.ndarray:
        """(8, 3) CT-world corners of the padded grid (voxel centres)."""
        k, j, i = self.data.shape
        ijk = np.array([[a, b, c] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def label_corners_mm(labels: Volume, label_ids: Sequence[int]) -> np.ndarray:
    """(8, 3) CT-world corners (LPS mm, voxel centres) of the bounding box of ``label_ids``."""
    box = bounding_box(np.isin(labels.data, list(label_ids)))
    if box is None:
        raise InputError(f"label(s) {list(label_ids)} not found in {labels.source or 'the labels'}")
    k, j, i = ((b.start, b.stop - 1) for b in box)
    ijk = np.array([[a, b, c] for a in i for b in j for c in k], dtype=float)
    return labels.index_to_world(ijk)


def label_center_mm(labels: Volume, label_ids: Sequence[int]) -> np.ndarray:
    """CT-world centre (LPS mm) of the bounding box of ``label_ids``: the ``isocenter_mm`` of
    :func:`prepare_volume` that centres those labels in the image (e.g. one femur)."""
    return label_corners_mm(labels, label_ids).mean(axis=0)


def volume_values(
    volume: Volume,
    quantity: str,
    calibration=None,
    mu_water_per_cm: float = units.MU_WATER_PER_CM,
) -> np.ndarray:
    """Voxel values of ``volume`` in the unit of ``quantity`` (mg/cm3 or 1/cm), float32.

    ``calibration`` (an object with ``apply(Volume) -> Volume`` in mg/cm3) is required to render
    density from HU. Air (HU < -500) carries no mineral and is set to 0 mg/cm3.
    """
    if quantity not in QUANTITIES:
        raise InputError(f"quantity must be 'density' or 'attenuation', not {quantity!r}")
    src = volume.source or "volume"
    if quantity == "density":
        if volume.unit == units.MG_CM3:
            return np.asarray(volume.data, dtype=np.float32)
        if volume.unit == units.HU:
            if calibration is None:
                raise InputError(f"{src}: density from HU needs a calibration (--calibration)")
            dens = np.asarray(calibration.apply(volume).data, dtype=np.float32)
            return np.where(volume.data < AIR_HU, np.float32(0), dens)
        raise InputError(f"{src}: cannot render density from a volume in {volume.unit}")
    if volume.unit == units.PER_CM:
        return np.asarray(volume.data, dtype=np.float32)
    if volume.unit == units.HU:
        mu = units.hu_to_attenuation(volume.data, mu_water_per_cm)
        mu[volume.data < AIR_HU_ATTENUATION] = 0.0
        return mu
    raise InputError(f"{src}: cannot render attenuation from a volume in {volume.unit}")


def prepare_volume(
    volume: Volume,
    quantity: str = "density",
    *,
    calibration=None,
    labels: Volume | None = None,
    label_ids: Sequence[int] | None = None,
    isocenter_mm: np.ndarray | None = None,
    crop: bool = True,
) -> RenderVolume:
    """Convert, mask and crop a volume for ``render``.

    Parameters
    ----------
    volume : Volume in HU, mg/cm3 or 1/cm.
    quantity : 'density' (output g/cm2) or 'attenuation' (output dimensionless).
    calibration : HU -> mg/cm3 calibration, required for density from HU.
    labels, label_ids : keep only voxels whose label is in ``label_ids`` (e.g. the left femur).
    isocenter_mm : CT-world point placed at the isocentre by the identity pose (default: centre).
    crop : crop to the bounding box of non-zero voxels (exact: zeros add nothing to the integral).
    """
    values = volume_values(volume, quantity, calibration)
    if labels is not None or label_ids is not None:
        if labels is None or not label_ids:
            raise InputError("restricting to labels needs both a label map and label ids")
        if not volume.same_grid(labels):
            raise InputError(
                f"label map {labels.source or ''} is not on the grid of {volume.source or 'the CT'}"
            )
        present = set(np.unique(labels.data).tolist())
        missing = [int(i) for i in label_ids if int(i) not in present]
        if missing:
            raise InputError(f"label(s) {missing} not found in {labels.source or 'the label map'}")
        values = np.where(np.isin(labels.data, list(label_ids)), values, np.float32(0))
    affine = volume.affine.copy()
    if crop:
        box = bounding_box(values != 0)
        if box is None:
            raise InputError(f"{volume.source or 'volume'}: nothing to render (all voxels are 0)")
        values = values[box]
        affine = box_affine(affine, box)
    values = np.pad(values, 1)
    affine = _shift_for_padding(affine)
    iso = volume.center_mm if isocenter_mm is None else np.asarray(isocenter_mm, dtype=float)
    return RenderVolume(
        data=torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
        affine=affine,
        isocenter_mm=iso,
        quantity=quantity,
    )


def _shift_for_padding(affine: np.ndarray) -> np.ndarray:
    """Affine of a grid after one voxel of padding on each side."""
    out = affine.copy()
    out[:3, 3] = out[:3, 3] - out[:3, :3].sum(axis=1)
    return out


def _as_pose_batch(pose) -> torch.Tensor:
    p = torch.as_tensor(pose)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 6:
        raise GeometryError(
            f"poses must be (rx, ry, rz, tx, ty, tz) vectors of shape (B, 6), not {tuple(p.shape)}"
        )
    return p


def render(
    bodies: RenderVolume | Sequence[RenderVolume],
    poses,
    geometry: PerspectiveGeometry | ParallelGeometry,
    *,
    oversample: int = 1,
    window: bool = True,
) -> torch.Tensor:
    """Render a batch of DRRs; bodies with their own poses add up in one image.

    Parameters
    ----------
    bodies : one RenderVolume or a sequence of them (e.g. pelvis, left femur, right femur).
    poses : per body, a (B, 6) tensor of pose vectors (degrees, mm; see ``xbmd.geometry``) applied
        around that body's isocentre. With a single body a (B, 6) or (6,) tensor may be given.
    geometry : PerspectiveGeometry or ParallelGeometry.
    oversample : samples per voxel plane along the slab axis (1 = Joseph's method).
    window : render each body only inside the bounding box of its projection (exact, faster).

    Returns
    -------
    Tensor of shape (B, rows, cols): g/cm2 for density, dimensionless for attenuation. Gradients
    flow to ``poses``.

    Examples
    --------
    >>> vol = Volume.from_geometry(np.ones((10, 10, 10), np.float32), (1, 1, 1), unit="mg/cm3")
    >>> body = prepare_volume(vol, "density")
    >>> img = render(body, torch.zeros(6), ParallelGeometry((4, 4), 1.0))
    >>> round(float(img[0, 2, 2]) * 1e4, 3)  # 1 mg/cm3 x 10 mm, in mg/cm2 x 10
    10.0
    """
    if isinstance(bodies, RenderVolume):
        bodies, poses = [bodies], [poses]
    if len(bodies) != len(poses):
        raise GeometryError(f"got {len(bodies)} bodies but {len(poses)} pose batches")
    if {b.quantity for b in bodies} != {bodies[0].quantity}:
        raise InputError("all bodies of one image must be rendered in the same quantity")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, not {oversample}")
    batches = [_as_pose_batch(p) for p in poses]
    n_poses = batches[0].shape[0]
    if any(p.shape[0] != n_poses for p in batches):
        raise GeometryError("every body needs the same number of poses")
    dtype = torch.float32
    rows, cols = geometry.size_px
    image = torch.zeros(n_poses, rows, cols, dtype=dtype)
    origins, directions = geometry.rays()
    for body, pose in zip(bodies, batches, strict=True):
        to_room = body_to_room(pose.to(torch.float64), body.isocenter_mm)
        r0, r1, c0, c1 = (
            _projection_window(body, to_room.detach().numpy(), geometry)
            if window
            else (0, rows, 0, cols)
        )
        if r1 <= r0 or c1 <= c0:
            continue
        o = torch.from_numpy(origins[r0:r1, c0:c1])
        d = torch.from_numpy(directions[r0:r1, c0:c1])
        part = _render_body(body, to_room, o, d, oversample).to(dtype)
        image = image.index_put(
            (
                torch.arange(n_poses)[:, None, None],
                torch.arange(r0, r1)[None, :, None],
                torch.arange(c0, c1)[None, None, :],
            ),
            part,
            accumulate=True,
        )
    return image


def _projection_window(body: RenderVolume, to_room: np.ndarray, geometry) -> tuple[int, ...]:
    """Pixel bounding box (r0, r1, c0, c1) covering the body's projection for every pose."""
    corners = body.corners_mm()
    pts = np.einsum("bij,nj->bni", to_room[:, :3, :3], corners) + to_room[:, None, :3, 3]
    try:
        rc = geometry.project(pts.reshape(-1, 3))
    except GeometryError:
        return (0, geometry.size_px[0], 0, geometry.size_px[1])
    rows, cols = geometry.size_px
    r0 = max(int(np.floor(rc[:, 0].min())) - 1, 0)
    r1 = min(int(np.ceil(rc[:, 0].max())) + 2, rows)
    c0 = max(int(np.floor(rc[:, 1].min())) - 1, 0)
    c1 = min(int(np.ceil(rc[:, 1].max())) + 2, cols)
    return (r0, r1, c0, c1)


def _render_body(
    body: RenderVolume,
    to_room: torch.Tensor,
    origins: torch.Tensor,
    directions: torch.Tensor,
    oversample: int,
) -> torch.Tensor:
    """Line integrals (B, h, w) of one body in its output unit, for rays given in the room frame."""
    affine = torch.from_numpy(body.affine)
    index_to_room = to_room @ affine  # (B, 4, 4)
    room_to_index = torch.linalg.inv(index_to_room)
    lin = room_to_index[:, None, None, :3, :3]
    o_idx = (lin @ origins[None, ..., None])[..., 0] + room_to_index[:, None, None, :3, 3]
    d_idx = (lin @ directions[None, ..., None])[..., 0]
    ray_len_mm = torch.linalg.vector_norm(directions, dim=-1)  # (h, w), room = world lengths
    axes = d_idx.abs().mean(dim=(1, 2)).argmax(dim=-1)  # slab axis per pose
    out = torch.empty(d_idx.shape[:3], dtype=torch.float64)
    for axis in torch.unique(axes).tolist():
        sel = torch.nonzero(axes == axis)[:, 0]
        out = out.index_copy(
            0, sel, _joseph(body.slab(axis), axis, o_idx[sel], d_idx[sel], oversample)
        )
    da = torch.gather(d_idx.abs(), -1, axes[:, None, None, None].expand(*d_idx.shape[:3], 1))[
        ..., 0
    ]
    return out * (ray_len_mm / da) * body.output_scale


def _joseph(
    slab: torch.Tensor, axis: int, o_idx: torch.Tensor, d_idx: torch.Tensor, oversample: int
) -> torch.Tensor:
    """Sum over slab planes of bilinear samples along rays (B, h, w), in value x planes."""
    n_planes, ny, nx = slab.shape
    bx, by = _PLANE_AXES[axis]
    da = d_idx[..., axis : axis + 1]
    slope = d_idx[..., [bx, by]] / da  # index units per plane, (B, h, w, 2)
    icpt = o_idx[..., [bx, by]] - o_idx[..., axis : axis + 1] * slope
    norm = torch.tensor([2.0 / max(nx - 1, 1), 2.0 / max(ny - 1, 1)], dtype=slope.dtype)
    a = (icpt * norm - 1.0).to(torch.float32)
    s = (slope * norm).to(torch.float32)
    b, h, w, _ = a.shape
    a = a.reshape(1, b * h, w, 2)
    s = s.reshape(1, b * h, w, 2)
    offsets = [q / oversample for q in range(-(oversample - 1), oversample)]
    weights = [(1.0 - abs(q)) / oversample for q in offsets]
    chunk = max(1, min(n_planes, _POINTS_PER_CALL // (b * h * w)))
    # Without autograd, one grid buffer is reused: fresh multi-MB allocations page-fault every time.
    reuse = not (torch.is_grad_enabled() and (a.requires_grad or slab.requires_grad))
    buffer = torch.empty(chunk, b * h, w, 2) if reuse else None
    acc = torch.zeros(b * h, w, dtype=torch.float32)
    for m0 in range(0, n_planes, chunk):
        m1 = min(m0 + chunk, n_planes)
        planes = slab[m0:m1, None]
        m = torch.arange(m0, m1, dtype=torch.float32)[:, None, None, None]
        for off, wt in zip(offsets, weights, strict=True):
            if buffer is not None:
                grid = torch.addcmul(a, m + off, s, out=buffer[: m1 - m0])
            else:
                grid = torch.addcmul(a, m + off, s)  # (C, b*h, w, 2)
            samples = F.grid_sample(
                planes, grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            acc = acc + wt * samples.sum(dim=(0, 1))
    return acc.view(b, h, w).to(torch.float64)
