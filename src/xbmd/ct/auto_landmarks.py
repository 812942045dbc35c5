"""Femur landmarks found automatically from a femur label (no hand work).

:func:`femur_landmarks` derives the eight landmarks of :class:`xbmd.ct.landmarks.FemurLandmarks`
(LPS mm, CT world) from one femur's voxels in a label map; a landmarks JSON, when a case has one,
overrides them. The label alone is used, never the CT's intensities, so the result depends only on
the segmentation (TotalSegmentator, the virtual cohort, a hand-drawn mask).

Method (docs/data-format.md, "Automatic femur landmarks"):

1. the largest connected piece of the label; its surface as a marching-cubes mesh (sub-voxel);
2. **head**: the deepest point of the label (maximum of its distance transform) starts a robust
   least-squares sphere fit to the surface vertices near that sphere, away from the neck;
3. **neck axis**: the line through the head centre that best fits the centroids of the neck's
   cross-sections (planes perpendicular to the axis, sampled at 0.5 mm; iterated);
4. **neck centre**: where along that axis the cross-section's area is smallest (the narrowest
   section; area smoothed over 2 mm); **head-neck junction**: where a cylinder of that narrowest
   section's area leaves the head sphere, ``sqrt(r_head^2 - area/pi)`` from the head centre;
5. **shaft axis**: the line through the centroids of the shaft's cross-sections, from 10 mm above
   the distal end of the label up to where the section starts to widen into the trochanters
   (iterated with planes perpendicular to the current axis); it points proximally;
6. **greater trochanter**: the most proximal surface point (along the shaft axis) lateral of the
   shaft axis; **lesser trochanter**: the tip of the posteromedial prominence below the neck,
   i.e. the surface point furthest along the direction in which the lesser trochanter points
   (distally, medially and posteriorly; see ``LT_DIRECTION``).

The result records how well each step went in ``extra`` (sphere fit residual, neck-shaft angle,
section areas) and is refused with an ``InputError`` when it is not a plausible proximal femur
(a truncated label, a label of another bone, swapped sides).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from xbmd.ct.landmarks import FemurLandmarks
from xbmd.errors import InputError
from xbmd.volume import Volume, bounding_box

#: In-plane step of the cross-sections, mm.
SECTION_STEP_MM = 0.5
#: Steps along the axes between cross-sections, mm.
AXIAL_STEP_MM = 1.0
#: The shaft's cross-sections start this far above the distal end of the label (a cut end).
SHAFT_START_MM = 10.0
#: The shaft ends where a section is this much larger than the distal sections.
SHAFT_WIDENING = 1.12
#: Fewest mm of straight shaft needed for a shaft axis.
MIN_SHAFT_MM = 25.0
#: The greater trochanter's tip is a summit: no surface within this radius (mm) is higher.
GT_SUMMIT_RADIUS_MM = 8.0
#: ... searched this far (mm) below the highest point lateral of the shaft; without one, the
#: highest point is taken.
GT_SUMMIT_SEARCH_MM = 15.0
#: The lesser trochanter is a prominence rising this far (mm) above the shaft's radius.
LT_MIN_EXCESS_MM = 4.0
#: Its tip is sought this close (mm) to the point of the prominence furthest from the shaft axis.
LT_TIP_WINDOW_MM = 12.0
#: The lesser trochanter points away from the shaft axis and this much (degrees) distally: a
#: conical eminence projecting posteromedially and down from the base of the neck.
LT_DISTAL_TILT_DEG = 30.0
#: Plausible ranges: refused outside (mm, degrees).
HEAD_RADIUS_RANGE_MM = (12.0, 40.0)
NECK_SHAFT_ANGLE_RANGE_DEG = (95.0, 165.0)
MAX_SPHERE_RMS_MM = 1.5


@dataclass
class LandmarkFit:
    """Landmarks and the intermediate results a QC picture needs."""

    landmarks: FemurLandmarks
    neck_profile: np.ndarray  # (n, 2): distance from the head centre along the neck axis, area
    shaft_centroids_mm: np.ndarray  # (n, 3) world points on the shaft axis
    shaft_point_mm: np.ndarray  # a point of the shaft axis line
    label_id: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular_basis(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(axis, helper))
    return e1, np.cross(axis, e1)


class _Femur:
    """One femur's mask (cropped) with world <-> index helpers and cross-section sampling."""

    def __init__(self, labels: Volume, label_id: int) -> None:
        where = labels.source or "label map"
        mask = labels.data == label_id
        box = bounding_box(mask, margin=3)
        if box is None:
            raise InputError(f"{where}: label {label_id} not found (no femur to find landmarks)")
        sub = labels.crop(box)
        mask = sub.data == label_id
        pieces, n = ndimage.label(mask)
        if n > 1:  # segmentation islands: keep the femur itself
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            mask = pieces == int(sizes.argmax())
        self.where, self.label_id = where, label_id
        self.mask = mask
        self.volume = sub
        self.spacing = sub.spacing_mm  # (i, j, k)
        self.field = mask.astype(np.float32)
        self.inv = np.linalg.inv(sub.affine)
        voxel_mm3 = float(abs(np.linalg.det(sub.affine[:3, :3])))
        self.volume_cm3 = float(mask.sum()) * voxel_mm3 / 1000.0
        if self.volume_cm3 < 20.0:
            raise InputError(
                f"{where}: label {label_id} holds {self.volume_cm3:.1f} cm3, too little for a "
                "proximal femur (head, neck, trochanters and shaft are needed)"
            )

    def to_index(self, pts: np.ndarray) -> np.ndarray:
        """World (..., 3) -> continuous (k, j, i) array coordinates (..., 3)."""
        ijk = pts @ self.inv[:3, :3].T + self.inv[:3, 3]
        return ijk[..., ::-1]

    def voxels_world(self) -> np.ndarray:
        k, j, i = np.nonzero(self.mask)
        return self.volume.index_to_world(np.stack([i, j, k], axis=1).astype(float))

    def surface(self) -> np.ndarray:
        """Marching-cubes vertices of the mask's boundary (world mm, sub-voxel)."""
        from skimage.measure import marching_cubes

        padded = np.pad(self.field, 1)
        verts, _, _, _ = marching_cubes(padded, level=0.5)
        kji = verts - 1.0
        return self.volume.index_to_world(kji[:, ::-1])

    def section(
        self, origin: np.ndarray, axis: np.ndarray, half_mm: float, keep_near: bool = True
    ) -> tuple[float, np.ndarray | None]:
        """Area (mm2) and centroid (world) of the mask in the plane through ``origin``
        perpendicular to ``axis``, within ``half_mm``; only the piece that contains (or is
        nearest to) ``origin`` when ``keep_near``."""
        e1, e2 = _perpendicular_basis(axis)
        u = np.arange(-half_mm, half_mm + 1e-9, SECTION_STEP_MM)
        uu, vv = np.meshgrid(u, u, indexing="ij")
        pts = origin + uu[..., None] * e1 + vv[..., None] * e2
        coords = self.to_index(pts).transpose(2, 0, 1)
        inside = ndimage.map_coordinates(self.field, coords, order=1, cval=0.0) >= 0.5
        if not inside.any():
            return 0.0, None
        if keep_near:
            pieces, n = ndimage.label(inside)
            if n > 1:
                c = len(u) // 2
                if pieces[c, c]:
                    inside = pieces == pieces[c, c]
                else:
                    rr, cc = np.nonzero(inside)
                    nearest = np.argmin((rr - c) ** 2 + (cc - c) ** 2)
                    inside = pieces == pieces[rr[nearest], cc[nearest]]
        area = float(inside.sum()) * SECTION_STEP_MM**2
        centroid = pts[inside].mean(axis=0)
        return area, centroid


def _fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Algebraic least-squares sphere through ``points``: (centre, radius)."""
    a = np.column_stack([2.0 * points, np.ones(len(points))])
    b = (points**2).sum(axis=1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = sol[:3]
    radius = float(np.sqrt(sol[3] + centre @ centre))
    return centre, radius


def _head(femur: _Femur, surface: np.ndarray) -> tuple[np.ndarray, float]:
    """Initial head sphere: the label's deepest point and its depth."""
    depth = ndimage.distance_transform_edt(femur.mask, sampling=femur.spacing[::-1])
    k, j, i = np.unravel_index(int(depth.argmax()), depth.shape)
    centre = femur.volume.index_to_world(np.array([i, j, k], float))
    return centre, float(depth.max())


def _refit_head(
    surface: np.ndarray, centre: np.ndarray, radius: float, neck_axis: np.ndarray | None
) -> tuple[np.ndarray, float, float]:
    """Robust sphere fit to vertices near the sphere, away from the neck: centre, radius, RMS."""
    for tolerance in (4.0, 2.5, 1.5, 1.5, 1.5):
        rel = surface - centre
        dist = np.linalg.norm(rel, axis=1)
        use = np.abs(dist - radius) < tolerance
        if neck_axis is not None:
            cos = (rel @ neck_axis) / np.maximum(dist, 1e-9)
            use &= cos < np.cos(np.radians(50.0))  # the neck leaves the head within ~40 deg
        if use.sum() < 50:
            break
        centre, radius = _fit_sphere(surface[use])
    rel = surface - centre
    dist = np.linalg.norm(rel, axis=1)
    use = np.abs(dist - radius) < 1.5
    if neck_axis is not None:
        use &= (rel @ neck_axis) / np.maximum(dist, 1e-9) < np.cos(np.radians(50.0))
    rms = float(np.sqrt(np.mean((dist[use] - radius) ** 2))) if use.any() else np.inf
    return centre, radius, rms


def _neck_axis(femur: _Femur, centre: np.ndarray, radius: float, voxels: np.ndarray) -> np.ndarray:
    """Unit vector from the head centre along the neck, fitted to neck section centroids."""
    rel = voxels - centre
    dist = np.linalg.norm(rel, axis=1)
    shell = (dist > 1.1 * radius) & (dist < 1.5 * radius)
    if shell.sum() < 20:
        raise InputError(
            f"{femur.where}: label {femur.label_id} has no neck next to its head sphere "
            f"(radius {radius:.1f} mm): not a proximal femur?"
        )
    axis = _unit(rel[shell].mean(axis=0))
    for _ in range(4):
        centroids = []
        for t in np.arange(0.85 * radius, 1.3 * radius, AXIAL_STEP_MM):
            _, c = femur.section(centre + t * axis, axis, 1.2 * radius)
            if c is not None:
                centroids.append(c - centre)
        if len(centroids) < 3:
            break
        pts = np.asarray(centroids)
        _, _, vt = np.linalg.svd(pts, full_matrices=False)  # line through the head centre
        new = vt[0] * np.sign(vt[0] @ axis)
        converged = np.degrees(np.arccos(np.clip(new @ axis, -1, 1))) < 0.05
        axis = new
        if converged:
            break
    return axis


def _neck_profile(femur: _Femur, centre: np.ndarray, radius: float, axis: np.ndarray) -> np.ndarray:
    """(t, area) of the neck's cross-sections from just outside the head to the neck base."""
    rows = []
    for t in np.arange(0.75 * radius, 2.0 * radius, 0.5):
        area, _ = femur.section(centre + t * axis, axis, 1.5 * radius)
        rows.append((t, area))
    return np.asarray(rows)


def _narrowest(profile: np.ndarray) -> tuple[float, float]:
    """(t, area) of the smallest smoothed section area."""
    t, area = profile[:, 0], profile[:, 1]
    valid = area > 0
    smooth = ndimage.gaussian_filter1d(np.where(valid, area, area.max()), 2.0 / 0.5)
    i = int(np.argmin(smooth))
    return float(t[i]), float(smooth[i])


def _shaft_axis(
    femur: _Femur, head: np.ndarray, voxels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shaft axis (unit, proximal), a point on it, and the section centroids used."""
    axis = np.array([0.0, 0.0, 1.0])
    height = (voxels - head) @ axis
    if height.min() > -60.0:
        axis = -axis if (voxels.mean(axis=0) - head) @ axis > 0 else axis
    centroids = np.empty((0, 3))
    for _ in range(4):
        height = (voxels - head) @ axis
        low = height.min()
        start = low + SHAFT_START_MM
        rows = []
        for h in np.arange(start, -10.0, AXIAL_STEP_MM):
            pts = voxels[np.abs(height - h) < 0.5]
            if len(pts) == 0:
                continue
            guess = pts.mean(axis=0)
            area, c = femur.section(guess, axis, 40.0)
            if c is not None:
                rows.append((h, area, *c))
        if len(rows) < 5:
            break
        rows_arr = np.asarray(rows)
        ref = np.median(rows_arr[: max(5, int(20.0 / AXIAL_STEP_MM)), 1])
        wide = np.nonzero(rows_arr[:, 1] > SHAFT_WIDENING * ref)[0]
        end = wide[0] if wide.size else len(rows_arr)
        end = max(0, end - int(5.0 / AXIAL_STEP_MM))
        centroids = rows_arr[:end, 2:]
        if len(centroids) * AXIAL_STEP_MM < MIN_SHAFT_MM:
            raise InputError(
                f"{femur.where}: label {femur.label_id} has only "
                f"{len(centroids) * AXIAL_STEP_MM:.0f} mm of straight shaft below the "
                f"trochanters (at least {MIN_SHAFT_MM:.0f} mm needed): is the femur cut off "
                "by the field of view?"
            )
        mean = centroids.mean(axis=0)
        _, _, vt = np.linalg.svd(centroids - mean, full_matrices=False)
        new = vt[0] * np.sign(vt[0] @ (head - mean))
        converged = np.degrees(np.arccos(np.clip(new @ axis, -1, 1))) < 0.05
        axis = new
        if converged:
            break
    return axis, centroids.mean(axis=0), centroids


def fit_femur_landmarks(labels: Volume, label_id: int, side: str) -> LandmarkFit:
    """Landmarks of the femur labelled ``label_id`` (see the module docstring for the method).

    ``side`` is the patient's side of that femur ('left' or 'right'); it is checked against the
    anatomy (the head lies medial of the trochanters).
    """
    if side not in ("left", "right"):
        raise InputError(f"side must be 'left' or 'right', not {side!r}")
    femur = _Femur(labels, label_id)
    surface = femur.surface()
    voxels = femur.voxels_world()
    centre, radius = _head(femur, surface)
    centre, radius, _ = _refit_head(surface, centre, radius, None)
    neck = _neck_axis(femur, centre, radius, voxels)
    centre, radius, rms = _refit_head(surface, centre, radius, neck)
    neck = _neck_axis(femur, centre, radius, voxels)
    where = f"{femur.where}: label {label_id}"
    if not HEAD_RADIUS_RANGE_MM[0] <= radius <= HEAD_RADIUS_RANGE_MM[1] or rms > MAX_SPHERE_RMS_MM:
        raise InputError(
            f"{where}: no femoral head found (sphere radius {radius:.1f} mm, fit residual "
            f"{rms:.2f} mm RMS; expected {HEAD_RADIUS_RANGE_MM[0]:g}-{HEAD_RADIUS_RANGE_MM[1]:g} "
            f"mm and <= {MAX_SPHERE_RMS_MM} mm)"
        )
    shaft, shaft_point, shaft_centroids = _shaft_axis(femur, centre, voxels)
    nsa = float(np.degrees(np.arccos(np.clip(-neck @ shaft, -1, 1))))
    nsa = 180.0 - nsa
    if not NECK_SHAFT_ANGLE_RANGE_DEG[0] <= nsa <= NECK_SHAFT_ANGLE_RANGE_DEG[1]:
        raise InputError(
            f"{where}: neck-shaft angle {nsa:.0f} deg is outside "
            f"{NECK_SHAFT_ANGLE_RANGE_DEG[0]:g}-{NECK_SHAFT_ANGLE_RANGE_DEG[1]:g} deg: "
            "the label is not a proximal femur, or is incomplete"
        )
    # lateral: away from the head, perpendicular to the shaft; in LPS +x is the patient's left
    lateral = _unit(neck - (neck @ shaft) * shaft)
    found_side = "left" if lateral[0] > 0 else "right"
    if found_side != side:
        raise InputError(
            f"{where}: is named the {side} femur, but its head lies on the {found_side} femur's "
            "side of its trochanters (swapped labels, or a flipped image orientation?)"
        )
    profile = _neck_profile(femur, centre, radius, neck)
    t_nc, area_nc = _narrowest(profile)
    r_neck = float(np.sqrt(area_nc / np.pi))
    t_hnj = float(np.sqrt(max(radius**2 - r_neck**2, 0.0)))
    anterior = np.array([0.0, -1.0, 0.0])  # LPS is patient-based: -y is anterior
    anterior = _unit(anterior - (anterior @ shaft) * shaft - (anterior @ lateral) * lateral)
    gt = _greater_trochanter(surface, shaft, shaft_point, lateral, where)
    lt = _lesser_trochanter(surface, centre, shaft, shaft_point, lateral, anterior, radius, where)
    landmarks = FemurLandmarks(
        side=side,
        head_center_mm=centre,
        head_radius_mm=radius,
        neck_axis=neck,
        shaft_axis=shaft,
        head_neck_junction_mm=centre + t_hnj * neck,
        neck_center_mm=centre + t_nc * neck,
        lesser_trochanter_mm=lt,
        greater_trochanter_mm=gt,
        extra={
            "source": "automatic (xbmd.ct.auto_landmarks, from the femur label)",
            "head_fit_rms_mm": round(rms, 3),
            "neck_shaft_angle_deg": round(nsa, 2),
            "neck_min_area_mm2": round(area_nc, 1),
            "shaft_mm_used": round(len(shaft_centroids) * AXIAL_STEP_MM, 1),
        },
    )
    return LandmarkFit(landmarks, profile, shaft_centroids, shaft_point, label_id)


def _greater_trochanter(
    surface: np.ndarray, shaft: np.ndarray, shaft_point: np.ndarray, lateral: np.ndarray, where: str
) -> np.ndarray:
    """The greater trochanter's summit: the highest surface point (along the shaft axis) lateral
    of the shaft axis that nothing within ``GT_SUMMIT_RADIUS_MM`` (across the shaft) overtops.

    The summit rule keeps the superolateral slope of the neck out: where the neck's upper surface
    rises above a low trochanter, it rises further towards the head, so it is no summit. Where
    there is no summit at all, the highest point lateral of the shaft is taken.
    """
    from scipy.spatial import cKDTree

    rel = surface - shaft_point
    height = rel @ shaft
    across = rel - height[:, None] * shaft
    candidates = np.flatnonzero(rel @ lateral > 3.0)
    if candidates.size == 0:
        raise InputError(f"{where}: no greater trochanter found (nothing lateral of the shaft)")
    tree = cKDTree(across)
    order = candidates[np.argsort(-height[candidates])]
    chosen = order[0]  # no summit (a trochanter below the neck's upper surface): the top
    for i in order[height[order] > height[order[0]] - GT_SUMMIT_SEARCH_MM]:
        near = tree.query_ball_point(across[i], GT_SUMMIT_RADIUS_MM)
        if height[near].max() <= height[i] + 0.25:
            chosen = i
            break
    pick = (np.linalg.norm(across - across[chosen], axis=1) < GT_SUMMIT_RADIUS_MM) & (
        height > height[chosen] - 0.5
    )
    return surface[pick].mean(axis=0)


def _lesser_trochanter(
    surface: np.ndarray,
    centre: np.ndarray,
    shaft: np.ndarray,
    shaft_point: np.ndarray,
    lateral: np.ndarray,
    anterior: np.ndarray,
    radius: float,
    where: str,
) -> np.ndarray:
    """Tip of the posteromedial prominence below the neck.

    The prominence is found on the profile of the surface's largest distance from the shaft axis
    in the posteromedial sector, height by height: going up from the shaft, the first rise of
    more than ``LT_MIN_EXCESS_MM`` above the shaft's radius, up to its peak. Its tip is the
    surface point (within ``LT_TIP_WINDOW_MM`` of the peak) furthest along the direction the
    lesser trochanter points: away from the shaft axis through the peak, tilted
    ``LT_DISTAL_TILT_DEG`` distally.
    """
    rel = surface - shaft_point
    height = (surface - centre) @ shaft
    medial, posterior = rel @ -lateral, rel @ -anterior
    radial = np.hypot(medial, posterior)
    sector = (medial > 0) & (posterior > -0.3 * radial)
    bins = np.arange(-4.5 * radius, -1.2 * radius, 1.0)
    index = np.digitize(height, bins) - 1
    profile = np.full(len(bins), np.nan)
    for b in range(len(bins)):
        sel = sector & (index == b)
        if sel.any():
            profile[b] = radial[sel].max()
    known = np.flatnonzero(np.isfinite(profile))
    if known.size < 20:
        raise InputError(f"{where}: too little femur below the neck to find the lesser trochanter")
    shaft_radius = float(np.median(profile[known[:15]]))
    rise = known[profile[known] > shaft_radius + LT_MIN_EXCESS_MM]
    rise = rise[rise > known[10]]  # above the distal sections that set the shaft radius
    if rise.size == 0:
        raise InputError(
            f"{where}: no lesser trochanter found (no posteromedial prominence of more than "
            f"{LT_MIN_EXCESS_MM:g} mm above the shaft below the neck)"
        )
    first = int(rise[0])
    peak, best = first, profile[first]
    for b in range(first, min(first + 25, len(bins))):
        if not np.isfinite(profile[b]):
            continue
        if profile[b] > best:
            peak, best = b, profile[b]
        elif profile[b] < best - 2.0:
            break  # past the prominence, before the neck's underside rises again
    in_peak = sector & (index == peak)
    p0 = surface[in_peak][np.argmax(radial[in_peak])]
    out = p0 - shaft_point
    out = _unit(out - (out @ shaft) * shaft)
    tilt = np.radians(LT_DISTAL_TILT_DEG)
    direction = np.cos(tilt) * out - np.sin(tilt) * shaft
    near = np.linalg.norm(surface - p0, axis=1) < LT_TIP_WINDOW_MM
    score = np.where(near, surface @ direction, -np.inf)
    pick = score > score.max() - 0.5
    return surface[pick].mean(axis=0)


def femur_landmarks(labels: Volume, label_id: int, side: str) -> FemurLandmarks:
    """The eight landmarks of one femur from its label (see :func:`fit_femur_landmarks`)."""
    return fit_femur_landmarks(labels, label_id, side).landmarks


def write_qc_png(fit: LandmarkFit, labels: Volume, path: str | Path) -> Path:
    """A QC picture of automatic landmarks: the femur label seen from the front and from the
    side with the landmarks, axes and head circle, and the neck section area along the neck."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    femur = _Femur(labels, fit.label_id)
    pts = femur.voxels_world()
    lm = fit.landmarks
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    views = (("front (AP): x = patient's left ->, z = up", 0), ("side: y = posterior ->", 1))
    marks = {
        "head_center_mm": ("o", "red"),
        "head_neck_junction_mm": ("s", "orange"),
        "neck_center_mm": ("D", "yellow"),
        "greater_trochanter_mm": ("^", "cyan"),
        "lesser_trochanter_mm": ("v", "magenta"),
    }
    for ax, (title, horizontal) in zip(axes[:2], views, strict=False):
        h, xe, ze = np.histogram2d(
            pts[:, horizontal], pts[:, 2], bins=(_bins(pts[:, horizontal]), _bins(pts[:, 2]))
        )
        ax.imshow(h.T, origin="lower", extent=(xe[0], xe[-1], ze[0], ze[-1]), cmap="gray")
        for name, (marker, colour) in marks.items():
            p = getattr(lm, name)
            ax.plot(p[horizontal], p[2], marker, color=colour, ms=7, mec="k", label=name[:-3])
        c = lm.head_center_mm
        circle = plt.Circle((c[horizontal], c[2]), lm.head_radius_mm, fill=False, color="red")
        ax.add_patch(circle)
        for axis, colour, length in ((lm.neck_axis, "yellow", 70.0), (lm.shaft_axis, "lime", 0)):
            if length:
                a, b = c, c + length * axis
            else:
                a = fit.shaft_point_mm - 60.0 * axis
                b = fit.shaft_point_mm + 60.0 * axis
            ax.plot([a[horizontal], b[horizontal]], [a[2], b[2]], "-", color=colour, lw=1.2)
        sc = fit.shaft_centroids_mm
        ax.plot(sc[:, horizontal], sc[:, 2], ".", color="lime", ms=2)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7, loc="lower left")
    prof = fit.neck_profile
    axes[2].plot(prof[:, 0], prof[:, 1], "k-")
    axes[2].axvline(
        np.linalg.norm(lm.neck_center_mm - lm.head_center_mm),
        color="gold",
        label="neck centre (narrowest)",
    )
    axes[2].axvline(
        np.linalg.norm(lm.head_neck_junction_mm - lm.head_center_mm),
        color="orange",
        label="head-neck junction",
    )
    axes[2].axvline(lm.head_radius_mm, color="red", ls=":", label="head radius")
    axes[2].set_xlabel("distance from the head centre along the neck axis, mm")
    axes[2].set_ylabel("cross-section area, mm2")
    axes[2].legend(fontsize=7)
    ex = lm.extra
    fig.suptitle(
        f"{lm.side} femur (label {fit.label_id}): head r {lm.head_radius_mm:.1f} mm "
        f"(fit RMS {ex.get('head_fit_rms_mm', float('nan')):.2f} mm), neck-shaft angle "
        f"{ex.get('neck_shaft_angle_deg', float('nan')):.1f} deg",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _bins(values: np.ndarray) -> np.ndarray:
    return np.arange(np.floor(values.min()) - 2, np.ceil(values.max()) + 3, 1.0)


def case_landmarks(
    labels: Volume,
    label_map: dict[str, int],
    qc_dir: str | Path | None = None,
    prefix: str = "",
) -> tuple[dict[str, FemurLandmarks], dict[str, str]]:
    """Automatic landmarks of every femur that ``label_map`` names and ``labels`` holds.

    Returns ``({side: landmarks}, {side: error message})``: a femur whose landmarks cannot be
    found is reported, not raised, so that the other one can still be used. With ``qc_dir`` a
    QC picture per femur is written there (``<prefix>femur_<side>_landmarks.png``).
    """
    found: dict[str, FemurLandmarks] = {}
    errors: dict[str, str] = {}
    present = set(np.unique(labels.data).tolist())
    for side in ("left", "right"):
        name = f"femur_{side}"
        if name not in label_map:
            continue
        if label_map[name] not in present:
            errors[side] = f"{labels.source or 'label map'}: no voxel of {name} ({label_map[name]})"
            continue
        try:
            fit = fit_femur_landmarks(labels, label_map[name], side)
        except InputError as exc:
            errors[side] = f"automatic landmarks of the {side} femur: {exc}"
            continue
        found[side] = fit.landmarks
        if qc_dir is not None:
            write_qc_png(fit, labels, Path(qc_dir) / f"{prefix}{name}_landmarks.png")
    return found, errors
