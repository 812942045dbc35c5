"""One hip of one radiograph: its crop, the DRRs rendered in it, its landmarks.

The *hip crop* is a fixed physical field of the radiograph's detector around one hip
(``CROP_SIZE_PX`` x ``CROP_SIZE_PX`` pixels of ``CROP_PIXEL_MM`` detector mm, the projected femoral
head centre at ``HEAD_POSITION``). It is a detector of its own (:class:`HipCrop.geometry`): DRRs are
rendered in exactly its rays, and the radiograph is resampled onto it. Left hips are mirrored so
that every crop looks like a right hip; ``HipCrop.crop_to_image`` maps crop pixels back to the
radiograph. ``xbmd prepare`` builds training samples with it, and the estimator crops the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from xbmd import units
from xbmd.ct.femur import SILHOUETTE_CHORD_MM, proximal_femur_mask
from xbmd.ct.landmarks import FemurLandmarks
from xbmd.drr import RenderVolume, prepare_volume, render
from xbmd.errors import GeometryError, InputError
from xbmd.geometry import SIDES, BodyPose, PerspectiveGeometry, rounded
from xbmd.similarity import field_mask
from xbmd.volume import Volume

#: Side of the square hip crop, pixels.
CROP_SIZE_PX = 256
#: Crop pixel size at the detector, mm (so the crop covers 192 x 192 detector mm).
CROP_PIXEL_MM = 0.75
#: Where the projected femoral head centre lies in the crop, as fractions of its size (row, col).
HEAD_POSITION = (0.40, 0.50)
#: A sample whose proximal-femur region lies less than this much inside the radiograph's field is
#: refused. Partly cut hips (a collimated greater trochanter) are kept: the share is in the index.
MIN_VALID_PF_FRACTION = 0.5
#: Pixels of the collimated field's border left out of the valid mask (shutter penumbra).
FIELD_MARGIN_PX = 2
#: Projected landmarks stored per sample (FemurLandmarks attribute names).
LANDMARKS = (
    "head_center_mm",
    "neck_center_mm",
    "lesser_trochanter_mm",
    "greater_trochanter_mm",
    "head_neck_junction_mm",
)

# ------------------------------------------------------------------------------------------------
# The hip crop: a sub-detector of the radiograph, in canonical (right-hip) orientation


@dataclass(frozen=True)
class HipCrop:
    """A square field of a radiograph's detector around one hip.

    Attributes
    ----------
    geometry : PerspectiveGeometry
        The crop as a detector of its own: the radiograph's source and detector plane, pixels of
        ``CROP_PIXEL_MM``, principal point placed so that each crop pixel lies where it is on the
        radiograph's detector. Not mirrored: render in it, then apply :meth:`canonical`.
    mirrored : bool
        True for a left hip, whose columns are flipped so that it looks like a right hip.
    crop_to_image : ndarray (2, 3)
        Canonical crop pixel (row, col, 1) -> radiograph pixel (row, col), continuous pixel
        coordinates, the mirror included.
    """

    geometry: PerspectiveGeometry
    mirrored: bool
    crop_to_image: np.ndarray

    def to_image(self, rc: np.ndarray) -> np.ndarray:
        """Canonical crop (row, col) points (..., 2) -> radiograph (row, col) (..., 2)."""
        rc = np.asarray(rc, dtype=float)
        return rc @ self.crop_to_image[:, :2].T + self.crop_to_image[:, 2]

    def from_image(self, rc: np.ndarray) -> np.ndarray:
        """Radiograph (row, col) points (..., 2) -> canonical crop (row, col) (..., 2)."""
        rc = np.asarray(rc, dtype=float) - self.crop_to_image[:, 2]
        return rc @ np.linalg.inv(self.crop_to_image[:, :2]).T

    def canonical(self, image: np.ndarray) -> np.ndarray:
        """An image (..., rows, cols) rendered in ``geometry``, in canonical orientation."""
        return np.ascontiguousarray(image[..., ::-1]) if self.mirrored else image

    def resample(
        self, pixels: np.ndarray, in_field: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The radiograph's pixels on the crop grid, canonical orientation.

        Bilinear interpolation after a Gaussian anti-aliasing filter of sigma (f - 1) / 2
        radiograph pixels when a crop pixel spans f > 1 of them (as scikit-image's rescale). The
        filter runs on the crop's window of the radiograph only.

        Parameters
        ----------
        pixels : the radiograph (rows, cols).
        in_field : its collimated field, ``field_mask(pixels, FIELD_MARGIN_PX)``; computed when
            not given (pass it to crop several hips of one radiograph without recomputing it).

        Returns
        -------
        image : ndarray (rows, cols) float32, the radiograph's values, 0 where not valid.
        valid : ndarray (rows, cols) bool, True where the crop pixel lies inside the radiograph
            and inside its collimated field (``xbmd.similarity.field_mask``).
        """
        img = np.asarray(pixels, dtype=np.float32)
        if in_field is None:
            in_field = field_mask(img, FIELD_MARGIN_PX)
        factors = np.abs(np.diag(self.crop_to_image[:, :2]))
        sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
        rows, cols = self.geometry.size_px
        grid = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1)
        coords = np.moveaxis(self.to_image(grid), -1, 0)  # (2, rows, cols)
        inside = (
            (coords[0] >= 0)
            & (coords[0] <= img.shape[0] - 1)
            & (coords[1] >= 0)
            & (coords[1] <= img.shape[1] - 1)
        )
        if not inside.any():
            return np.zeros((rows, cols), np.float32), inside
        # the window: the crop's footprint plus the filter's radius (truncate 4) and bilinear's
        pad = int(4.0 * sigma.max() + 0.5) + 2
        lo = [max(0, int(np.floor(coords[k][inside].min())) - pad) for k in (0, 1)]
        hi = [min(img.shape[k], int(np.ceil(coords[k][inside].max())) + pad + 1) for k in (0, 1)]
        window = img[lo[0] : hi[0], lo[1] : hi[1]]
        smooth = ndimage.gaussian_filter(window, sigma) if sigma.max() > 0 else window
        local = coords - np.array(lo, dtype=float)[:, None, None]
        out = ndimage.map_coordinates(smooth, local, order=1, mode="nearest")
        field = np.asarray(in_field[lo[0] : hi[0], lo[1] : hi[1]], dtype=np.float32)
        # every radiograph pixel that enters the bilinear sample must be in the field
        full = ndimage.map_coordinates(field, local, order=1, mode="constant") > 0.999
        valid = inside & full
        return np.where(valid, out, np.float32(0)).astype(np.float32), valid

    def to_dict(self) -> dict:
        return {
            "size_px": [int(n) for n in self.geometry.size_px],
            "pixel_mm": list(self.geometry.pixel_spacing_mm),
            "mirrored": self.mirrored,
            "crop_to_image": [rounded(row, 6) for row in self.crop_to_image],
            "geometry": self.geometry.to_dict(),
        }


def hip_crop(
    geometry: PerspectiveGeometry,
    head_px: tuple[float, float],
    side: str,
    size_px: int = CROP_SIZE_PX,
    pixel_mm: float = CROP_PIXEL_MM,
    head_position: tuple[float, float] = HEAD_POSITION,
) -> HipCrop:
    """The hip crop of one side of a radiograph.

    Parameters
    ----------
    geometry : the radiograph's PerspectiveGeometry.
    head_px : (row, col) of the projected femoral head centre on the radiograph, pixels.
    side : 'right' or 'left' (a left crop is mirrored).
    size_px, pixel_mm : crop size (pixels, square) and pixel size at the detector (mm).
    head_position : where the head centre lands in the canonical crop, fractions of its size.

    Examples
    --------
    >>> g = PerspectiveGeometry(1100, 950, (1000, 1200), 0.3)
    >>> crop = hip_crop(g, (400.0, 300.0), "left")
    >>> np.round(crop.to_image([102.4, 128.0]), 6).tolist()
    [400.0, 300.0]
    """
    if side not in SIDES:
        raise InputError(f"side must be 'right' or 'left', not {side!r}")
    mirrored = side == "left"
    head_row, head_col = float(head_px[0]), float(head_px[1])
    target_row, target_col = head_position[0] * size_px, head_position[1] * size_px
    # the unmirrored crop column of the head: mirroring maps column c to size - 1 - c
    col_unmirrored = size_px - 1 - target_col if mirrored else target_col
    scale_row = pixel_mm / geometry.pixel_spacing_mm[0]  # radiograph pixels per crop pixel
    scale_col = pixel_mm / geometry.pixel_spacing_mm[1]
    pr, pc = geometry.principal_point
    crop_geometry = PerspectiveGeometry(
        geometry.sdd_mm,
        geometry.sod_mm,
        (size_px, size_px),
        pixel_mm,
        principal_point_px=(
            target_row + (pr - head_row) / scale_row,
            col_unmirrored + (pc - head_col) / scale_col,
        ),
        view=geometry.view,
    )
    sign = -1.0 if mirrored else 1.0
    crop_to_image = np.array(
        [
            [scale_row, 0.0, head_row - target_row * scale_row],
            [0.0, sign * scale_col, head_col - sign * target_col * scale_col],
        ]
    )
    return HipCrop(crop_geometry, mirrored, crop_to_image)


# ------------------------------------------------------------------------------------------------
# The CT side: the bodies rendered per hip


@dataclass
class HipBodies:
    """The bodies rendered for one hip, density (mg/cm3 -> g/cm2), all centred on its femoral head.

    hemipelvis : the pelvis label of this side, moved by the pelvis pose.
    femur : the femur label, moved by the femur pose.
    proximal_femur : the femur voxels of ``xbmd.ct.femur.proximal_femur_mask``.
    proximal_femur_chord : 1 mg/cm3 in those voxels: its DRR / 1e-4 is the chord length (mm).
    landmarks : this femur's landmarks (CT world, LPS mm).
    """

    hemipelvis: RenderVolume
    femur: RenderVolume
    proximal_femur: RenderVolume
    proximal_femur_chord: RenderVolume
    landmarks: FemurLandmarks


def hip_bodies(
    density: Volume, labels: Volume, label_map: dict[str, int], landmarks: FemurLandmarks
) -> HipBodies:
    """Prepare the bodies of one hip from a density volume (mg/cm3) and its label map."""
    side = landmarks.side
    missing = [b for b in (f"pelvis_{side}", f"femur_{side}") if b not in label_map]
    if missing:
        raise InputError(f"the label map {label_map} names no {' and no '.join(missing)}")
    femur_id = label_map[f"femur_{side}"]
    centre = np.asarray(landmarks.head_center_mm, dtype=float)
    pf = proximal_femur_mask(labels, femur_id, landmarks)
    pf_density = density.with_data(np.where(pf, density.data, np.float32(0)), unit=units.MG_CM3)
    pf_chord = density.with_data(pf.astype(np.float32), unit=units.MG_CM3)

    def body(volume: Volume, ids: list[int] | None = None) -> RenderVolume:
        lab = labels if ids else None
        return prepare_volume(volume, "density", labels=lab, label_ids=ids, isocenter_mm=centre)

    return HipBodies(
        hemipelvis=body(density, [label_map[f"pelvis_{side}"]]),
        femur=body(density, [femur_id]),
        proximal_femur=body(pf_density),
        proximal_femur_chord=body(pf_chord),
        landmarks=landmarks,
    )


def _vector(pose: BodyPose, body: RenderVolume) -> torch.Tensor:
    """The pose as a render vector about the body's own centre."""
    return torch.as_tensor(pose.about(body.isocenter_mm).vector, dtype=torch.float64)


def render_hip(
    bodies: HipBodies, pelvis_pose: BodyPose, femur_pose: BodyPose, crop: HipCrop
) -> dict[str, np.ndarray]:
    """The DRRs of one hip in a crop, canonical orientation.

    Returns
    -------
    dict of (rows, cols) arrays:
        ``bone_drr_g_cm2`` float32: hemipelvis (pelvis pose) + femur (femur pose), g/cm2;
        ``pf_drr_g_cm2`` float32: the proximal femur alone, g/cm2, zero outside ``pf_mask``;
        ``pf_mask`` bool: pixels whose ray crosses more than ``SILHOUETTE_CHORD_MM`` of the
        proximal femur (the region of ``bmd_drr_g_cm2``, as the silhouette of xbmd.ct.femur).
    """
    femur = _vector(femur_pose, bodies.femur)
    with torch.no_grad():
        bone = render(
            [bodies.hemipelvis, bodies.femur],
            [_vector(pelvis_pose, bodies.hemipelvis), femur],
            crop.geometry,
        )[0].numpy()
        pf = render(bodies.proximal_femur, femur, crop.geometry)[0].numpy()
        chord_mm = (
            render(bodies.proximal_femur_chord, femur, crop.geometry)[0].numpy()
            / units.G_CM2_PER_MG_CM3_MM
        )
    mask = chord_mm > SILHOUETTE_CHORD_MM
    return {
        "bone_drr_g_cm2": crop.canonical(bone.astype(np.float32)),
        "pf_drr_g_cm2": crop.canonical(np.where(mask, pf, 0).astype(np.float32)),
        "pf_mask": crop.canonical(mask),
    }


def projected_landmarks(
    landmarks: FemurLandmarks, femur_pose: BodyPose, geometry: PerspectiveGeometry
) -> dict[str, list[float]]:
    """Radiograph (row, col) of a femur's landmarks moved by its pose: ``{name_px: [r, c]}``."""
    moved = landmarks.transformed(femur_pose.to_room())
    rc = geometry.project(np.stack([getattr(moved, n) for n in LANDMARKS]))
    return {
        n.removesuffix("_mm") + "_px": [float(v) for v in p]
        for n, p in zip(LANDMARKS, rc, strict=True)
    }


# ------------------------------------------------------------------------------------------------
# One sample


def make_sample(
    bodies: HipBodies,
    pixels: np.ndarray,
    geometry: PerspectiveGeometry,
    pelvis_pose: BodyPose,
    femur_pose: BodyPose,
) -> tuple[dict[str, np.ndarray], dict]:
    """Crop, resample and render one hip of one radiograph.

    Parameters
    ----------
    bodies : the hip's bodies (:func:`hip_bodies`); its side decides the mirroring.
    pixels : ndarray (rows, cols), the radiograph (``XRay.pixels``), size ``geometry.size_px``.
    geometry : the radiograph's geometry, in which the poses hold.
    pelvis_pose, femur_pose : the bones' poses (any centre of rotation).

    Returns
    -------
    arrays : ``xray`` float32, ``valid`` bool, ``bone_drr_g_cm2`` float32, ``pf_drr_g_cm2``
        float32, ``pf_mask`` bool; all (CROP_SIZE_PX, CROP_SIZE_PX), canonical orientation.
    meta : ``crop`` (:meth:`HipCrop.to_dict`), ``landmarks_px`` (crop) and
        ``landmarks_image_px`` (radiograph) as {name: [row, col]}, ``bmd_drr_g_cm2``,
        ``pf_area_px``, ``pf_valid_fraction``.
    """
    side = bodies.landmarks.side
    if tuple(pixels.shape) != tuple(geometry.size_px):
        raise GeometryError(f"image {pixels.shape} and geometry {geometry.size_px} differ in size")
    image_px = projected_landmarks(bodies.landmarks, femur_pose, geometry)
    head = image_px["head_center_px"]
    rows, cols = geometry.size_px
    if not (0 <= head[0] <= rows - 1 and 0 <= head[1] <= cols - 1):
        raise GeometryError(
            f"the {side} femoral head projects outside the radiograph (row {head[0]:.0f}, "
            f"col {head[1]:.0f} of {rows} x {cols})"
        )
    crop = hip_crop(geometry, head, side)
    xray, valid = crop.resample(pixels)
    drrs = render_hip(bodies, pelvis_pose, femur_pose, crop)
    mask = drrs["pf_mask"]
    if not mask.any():
        raise GeometryError(f"the {side} proximal femur projects outside the crop")
    in_view = float(valid[mask].mean())
    if in_view < MIN_VALID_PF_FRACTION:
        raise InputError(
            f"the {side} proximal femur is cut by the radiograph's edge or collimation "
            f"({100 * (1 - in_view):.0f} % of its region outside)"
        )
    crop_px = {n: [float(v) for v in crop.from_image(p)] for n, p in image_px.items()}
    arrays = {"xray": xray, "valid": valid, **drrs}
    meta = {
        "crop": crop.to_dict(),
        "landmarks_px": {n: rounded(p, 4) for n, p in crop_px.items()},
        "landmarks_image_px": {n: rounded(p, 4) for n, p in image_px.items()},
        "bmd_drr_g_cm2": float(drrs["pf_drr_g_cm2"][mask].mean()),
        "pf_area_px": int(mask.sum()),
        "pf_valid_fraction": round(in_view, 5),
    }
    return arrays, meta
