"""Find a calibration phantom's rods in a CT without a label (no hand work).

A B-MAS200-type phantom lies under the patient: a row of parallel hydroxyapatite rods, running
along the table (the patient's S-I axis), in a water-equivalent block. Its layout (rod diameter,
distance between rods, the order of the rods along the row) is part of the phantom description
(``"layout"`` in ``xbmd/data/phantoms/*.json``, :class:`PhantomLayout`). :func:`find_rods`
returns a rod label map, which ``xbmd.ct.calibration.phantom_calibration`` then fits exactly as it
fits hand-drawn rod labels (median of each rod after a one-voxel erosion, r >= 0.99 gate).

Method (docs/calibration.md, "Automatic rod detection"):

1. axial slabs of ``SLAB_MM`` are reduced to their median along S-I (rods are constant along it,
   so the median keeps them and suppresses noise);
2. in each slab image, rod candidates are places where a disc of the rod's size is brighter than
   the ring around it by at least ``MIN_CONTRAST_HU`` and uniform inside (standard deviation at
   most ``MAX_INSIDE_SD_HU``): the rods denser than the block; a rod as dense as the block (HA 0)
   is invisible and is placed from the layout;
3. a row: at least 3 candidates on a straight line at multiples of the rod pitch (within
   ``PITCH_TOLERANCE``), lying where the layout's rods fit;
4. the layout's rods are put on the row's slots in both directions and at every offset; each
   rod's median HU is paired with its nominal density and the placement with the best Pearson r
   wins (the right one reads r ~ 0.9999, a wrong one puts a rod on the block or in air);
5. the rods' extent along S-I: the longest run of slices where every rod reads within
   ``SLICE_TOLERANCE_HU`` of its slab value, less ``END_MARGIN_MM`` at each end;
6. the rods are labelled (discs of the rod radius) with the phantom's rod label ids.

No phantom is reported (``CalibrationError``) when no slab has a row, when the row's best
placement has r < 0.99, or when the rods are seen over less than ``MIN_LENGTH_MM``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from xbmd.errors import CalibrationError, InputError
from xbmd.units import HU, LABEL
from xbmd.volume import Volume

#: Thickness (mm, along S-I) of the slabs reduced to a median image.
SLAB_MM = 20.0
#: A rod candidate is at least this much brighter than the ring around it (HU).
MIN_CONTRAST_HU = 25.0
#: ... and this uniform inside (standard deviation of the slab image inside the disc, HU).
MAX_INSIDE_SD_HU = 20.0
#: Rods lie at multiples of the pitch along the row within this fraction of the pitch.
PITCH_TOLERANCE = 0.08
#: Fewest candidates that make a row.
MIN_ROW = 3
#: A slice belongs to the phantom when each rod reads within this of its slab value (HU).
SLICE_TOLERANCE_HU = 30.0
#: Slices dropped at each end of the rods' extent (partial volume with the block's ends), mm.
END_MARGIN_MM = 3.0
#: The rods must be seen over at least this length along S-I, mm.
MIN_LENGTH_MM = 20.0
#: A placement of the rods must fit this well to be accepted (as phantom_calibration's gate).
MIN_R = 0.99
#: Slices sampled for the median image of the rods' extent (QC picture, HU shown there).
QC_SLICES = 60
#: Slices must be axial: their normal within this angle of the S-I axis, degrees.
MAX_TILT_DEG = 30.0


@dataclass(frozen=True)
class PhantomLayout:
    """How a phantom's rods are arranged: what automatic detection looks for.

    rod_diameter_mm : diameter of every rod.
    rod_pitch_mm : distance between the axes of neighbouring rods.
    row_order : the rods' label ids in their order along the row (either end first).
    """

    rod_diameter_mm: float
    rod_pitch_mm: float
    row_order: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: object, labels: list[int], source: str = "phantom") -> PhantomLayout:
        """Validate a phantom JSON's ``layout``; InputError naming the first bad field."""
        where = f"{source}: layout"
        if not isinstance(d, dict):
            raise InputError(f"{where} must be an object")
        values = {}
        for key in ("rod_diameter_mm", "rod_pitch_mm"):
            v = d.get(key)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                    and v > 0):  # fmt: skip
                raise InputError(f"{where}.{key} must be a positive number, not {v!r}")
            values[key] = float(v)
        if values["rod_pitch_mm"] <= values["rod_diameter_mm"]:
            raise InputError(f"{where}: rod_pitch_mm must exceed rod_diameter_mm")
        order = d.get("row_order")
        if not isinstance(order, list) or sorted(order) != sorted(labels):
            raise InputError(
                f"{where}.row_order must list every rod label once in its order along the row "
                f"({sorted(labels)}), not {order!r}"
            )
        return cls(values["rod_diameter_mm"], values["rod_pitch_mm"], tuple(order))


@dataclass
class FoundRod:
    """One rod found in the CT."""

    label: int
    density_mg_cm3: float
    centre_mm: np.ndarray  # LPS, mid-way along the rods' extent
    hu: float  # median of the slab images over the rods' extent, inside the eroded disc
    visible: bool  # found as a candidate (else placed from the layout)


@dataclass
class RodDetection:
    """The rods found in a CT: a label map for ``phantom_calibration`` and what QC shows."""

    labels: Volume  # rod label ids (the phantom's), 0 elsewhere, on the CT's grid
    rods: list[FoundRod]  # in the order of the phantom description's rods
    slices: tuple[int, int]  # first and last slice index (k) of the rods' extent
    image: np.ndarray  # (J, I) median HU over the rods' extent, for QC
    r: float  # Pearson r of the placement (rod HU vs density)
    notes: list[str]


def _axial(ct: Volume) -> None:
    normal = ct.direction[:, 2]
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if tilt > MAX_TILT_DEG:
        raise InputError(
            f"{ct.source or 'CT'}: automatic rod detection needs axial slices (slice normal "
            f"{tilt:.0f} deg from the S-I axis); label the rods instead"
        )


def _disc_kernel(radius_px: np.ndarray, hi: float, lo: float = 0.0) -> np.ndarray:
    """A normalised kernel: 1 where the radius (in rod radii) lies in [lo, hi]."""
    ry, rx = radius_px
    n = int(np.ceil(hi * max(ry, rx))) + 1
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    rr = np.hypot(yy / ry, xx / rx)
    k = ((rr <= hi) & (rr >= lo)).astype(np.float32)
    return k / k.sum()


def _candidates(image: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """(n, 2) (row, col) pixel positions of bright, uniform discs of the rod's size in a uniform
    surrounding (the block)."""
    from skimage.feature import peak_local_max

    img = image.astype(np.float32)
    inner = _disc_kernel(radius_px, *_BANDS[0][::-1])
    ring = _disc_kernel(radius_px, *_BANDS[3][::-1])

    def mean_sd(kernel):
        m = ndimage.convolve(img, kernel, mode="nearest")
        sq = ndimage.convolve(img * img, kernel, mode="nearest")
        return m, np.sqrt(np.maximum(sq - m * m, 0.0))

    (m_in, sd_in), (m_ring, sd_ring) = mean_sd(inner), mean_sd(ring)
    contrast = m_in - m_ring
    uniform = (sd_in <= MAX_INSIDE_SD_HU) & (sd_ring <= MAX_INSIDE_SD_HU)
    score = np.where(uniform & (contrast >= MIN_CONTRAST_HU), contrast, 0.0)
    distance = max(1, int(0.8 * min(radius_px)))
    peaks = peak_local_max(score, min_distance=distance, threshold_abs=MIN_CONTRAST_HU)
    keep = []
    for r, c in peaks:
        bands = _band_stats(img, r, c, radius_px)
        if bands is None:
            continue
        (m_in, sd_in), (m_rim_in, _), (m_rim_out, _), (m_ring, sd_ring) = bands
        edge = m_in - m_ring
        if (
            edge >= MIN_CONTRAST_HU
            and sd_in <= MAX_INSIDE_SD_HU
            and sd_ring <= MAX_INSIDE_SD_HU
            and m_rim_in >= m_in - 0.35 * edge  # the disc reaches out to ~0.85 radii
            and m_rim_out <= m_ring + 0.35 * edge  # ... and ends by ~1.15 radii
        ):
            keep.append((r, c))
    return np.asarray(keep, dtype=float).reshape(-1, 2)


#: Radial bands (in rod radii) whose mean and SD test a candidate: inside, just inside the
#: edge, just outside it, and the surrounding ring.
_BANDS = ((0.0, 0.6), (0.7, 0.85), (1.15, 1.3), (1.25, 1.55))


def _band_stats(img, r, c, radius_px):
    ry, rx = radius_px
    n = int(np.ceil(1.7 * max(ry, rx)))
    if r - n < 0 or c - n < 0 or r + n >= img.shape[0] or c + n >= img.shape[1]:
        return None
    patch = img[r - n : r + n + 1, c - n : c + n + 1]
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    rr = np.hypot(yy / ry, xx / rx)
    out = []
    for lo, hi in _BANDS:
        v = patch[(rr >= lo) & (rr <= hi)]
        out.append((float(v.mean()), float(v.std())))
    return out


def _rows(points_mm: np.ndarray, pitch_mm: float, n_rods: int) -> list[tuple]:
    """Straight rows of candidates at multiples of the pitch: (members, origin, unit, pitch)."""
    out = []
    seen = set()
    for a in range(len(points_mm)):
        for b in range(len(points_mm)):
            if a == b:
                continue
            d = points_mm[b] - points_mm[a]
            dist = float(np.linalg.norm(d))
            k = round(dist / pitch_mm)
            if k < 1 or k > n_rods - 1 or abs(dist / k - pitch_mm) > PITCH_TOLERANCE * pitch_mm:
                continue
            u, p = d / dist, dist / k
            rel = points_mm - points_mm[a]
            along, across = rel @ u, rel @ np.array([-u[1], u[0]])
            slot = np.round(along / p)
            on = (np.abs(along - slot * p) < 0.25 * p) & (np.abs(across) < 0.1 * p)
            slots = np.unique(slot[on]).astype(int)
            members = tuple(sorted(np.flatnonzero(on).tolist()))
            if len(slots) < MIN_ROW or np.ptp(slots) + 1 > n_rods or members in seen:
                continue
            seen.add(members)
            out.append((members, points_mm[a], u, p, slots))
    return sorted(out, key=lambda r: -len(r[4]))


def _slot_values(image: np.ndarray, centres_px: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Median of ``image`` in the eroded disc (radius - 1.5 px) around each centre; NaN off it."""
    out = np.full(len(centres_px), np.nan)
    ry, rx = np.maximum(radius_px - 1.5, 1.0)
    n = int(np.ceil(max(ry, rx))) + 1
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    for i, (r, c) in enumerate(centres_px):
        rows, cols = np.round(r + yy).astype(int), np.round(c + xx).astype(int)
        inside = (((rows - r) / ry) ** 2 + ((cols - c) / rx) ** 2) <= 1.0
        if rows.min() < 0 or cols.min() < 0:
            continue
        if rows.max() >= image.shape[0] or cols.max() >= image.shape[1]:
            continue
        out[i] = float(np.median(image[rows[inside], cols[inside]]))
    return out


def _refine(image, row, points_mm, spacing, radius_px) -> tuple:
    """The row's line and pitch fitted (least squares) to its rods' sub-pixel centres."""
    members, origin, u, pitch, slots = row
    index, centres = [], []
    for m in members:
        r, c = points_mm[m] / spacing
        slot = round(float((points_mm[m] - origin) @ u) / pitch)
        ry, rx = 1.2 * radius_px
        n = int(np.ceil(max(ry, rx)))
        r0, c0 = round(r), round(c)
        patch = image[max(r0 - n, 0) : r0 + n + 1, max(c0 - n, 0) : c0 + n + 1]
        yy, xx = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
        yy, xx = yy + max(r0 - n, 0), xx + max(c0 - n, 0)
        inside = ((yy - r) / ry) ** 2 + ((xx - c) / rx) ** 2 <= 1.0
        weight = np.clip(patch - np.median(patch[~inside]), 0.0, None) * inside
        if weight.sum() <= 0:
            continue
        centre_px = np.array([(weight * yy).sum(), (weight * xx).sum()]) / weight.sum()
        index.append(slot)
        centres.append(centre_px * spacing)
    if len(set(index)) < 2:
        return row
    a = np.column_stack([np.ones(len(index)), index])
    (o_y, v_y), *_ = np.linalg.lstsq(a, np.asarray(centres)[:, 0], rcond=None)
    (o_x, v_x), *_ = np.linalg.lstsq(a, np.asarray(centres)[:, 1], rcond=None)
    v = np.array([v_y, v_x])
    return members, np.array([o_y, o_x]), v / np.linalg.norm(v), float(np.linalg.norm(v)), slots


def _place(image, row, layout, densities, spacing, radius_px):
    """Best placement of the layout's rods on a row's slots: (r, slot centres px, labels)."""
    _, origin, u, pitch, slots = row
    n = len(layout.row_order)
    lo, hi = int(slots.min()), int(slots.max())
    best = (-np.inf, None, None)
    for start in range(hi - n + 1, lo + 1):
        idx = np.arange(start, start + n)
        centres_mm = origin + idx[:, None] * pitch * u
        centres_px = centres_mm / spacing
        values = _slot_values(image, centres_px, radius_px)
        if not np.isfinite(values).all():
            continue
        for order in (layout.row_order, layout.row_order[::-1]):
            dens = np.array([densities[label] for label in order])
            if np.ptp(values) == 0:
                continue
            r = float(np.corrcoef(values, dens)[0, 1])
            if r > best[0]:
                best = (r, centres_px, order)
    return best


def find_rods(ct: Volume, phantom) -> RodDetection:
    """Find the rods of ``phantom`` (``xbmd.ct.calibration.Phantom`` with a layout) in ``ct`` (HU).

    Returns a :class:`RodDetection` whose ``labels`` carry the phantom's rod label ids; raises
    ``CalibrationError`` when no phantom is found (see the module docstring for the method).
    """
    where = ct.source or "CT"
    if ct.unit != HU:
        raise InputError(f"{where}: rod detection needs a CT in HU, not {ct.unit}")
    layout = getattr(phantom, "layout", None)
    if layout is None:
        raise InputError(
            f"phantom {phantom.name!r} has no layout (rod diameter, pitch, order), so its rods "
            "cannot be found automatically: give a rod label map (--labels)"
        )
    _axial(ct)
    densities = {rod.label: rod.density_mg_cm3 for rod in phantom.rods}
    sx, sy, sz = (float(v) for v in ct.spacing_mm)
    spacing = np.array([sy, sx])  # (row, col) mm
    radius_px = 0.5 * layout.rod_diameter_mm / spacing
    k_n = ct.shape[0]
    per_slab = max(1, round(SLAB_MM / sz))
    best = None
    for k0 in range(0, max(1, k_n - per_slab + 1), per_slab):
        image = np.median(ct.data[k0 : k0 + per_slab], axis=0).astype(np.float32)
        cand = _candidates(image, radius_px)
        if len(cand) < MIN_ROW:
            continue
        points_mm = cand * spacing
        for row in _rows(points_mm, layout.rod_pitch_mm, len(layout.row_order))[:10]:
            row = _refine(image, row, points_mm, spacing, radius_px)
            r, centres_px, order = _place(image, row, layout, densities, spacing, radius_px)
            if centres_px is None:
                continue
            key = (len(row[4]), r)
            if best is None or key > best[0]:
                best = (key, centres_px, order, k0, row)
    if best is None or best[0][1] < MIN_R:
        found = "no row of rods" if best is None else f"best row fits with r = {best[0][1]:.3f}"
        raise CalibrationError(
            f"{where}: no {phantom.name} phantom found ({found}; needs at least {MIN_ROW} rods "
            f"{layout.rod_diameter_mm:g} mm wide, {layout.rod_pitch_mm:g} mm apart, fitting "
            f"r >= {MIN_R}): label its rods, or calibrate without a phantom"
        )
    (_, r), centres_px, order, k0, row = best
    first, last = _extent(ct.data, centres_px, radius_px, k0, per_slab, sz)
    step = max(1, (last - first + 1) // QC_SLICES)  # a median over a sample of slices
    image = np.median(ct.data[first : last + 1 : step], axis=0).astype(np.float32)
    hu = _slot_values(image, centres_px, radius_px)
    labels = _label_map(ct, centres_px, radius_px, order, first, last)
    visible_slots = set(int(s) for s in row[4])
    start = round(((centres_px[0] * spacing - row[1]) @ row[2]) / row[3])
    rods = []
    for i, label in enumerate(order):
        mid = ct.index_to_world(
            np.array([centres_px[i][1], centres_px[i][0], 0.5 * (first + last)])
        )
        rods.append(
            FoundRod(label, densities[label], mid, float(hu[i]), (start + i) in visible_slots)
        )
    r_all = float(np.corrcoef(hu, [densities[lab] for lab in order])[0, 1])
    rank = {rod.label: i for i, rod in enumerate(phantom.rods)}
    rods.sort(key=lambda rod: rank[rod.label])  # in the phantom description's order
    notes = [
        f"rods found automatically ({sum(f.visible for f in rods)} seen, "
        f"{sum(not f.visible for f in rods)} placed from the layout) over slices {first}-{last} "
        f"({(last - first + 1) * sz:.0f} mm)"
    ]
    return RodDetection(labels, rods, (first, last), image, r_all, notes)


def _extent(data, centres_px, radius_px, k0, per_slab, sz) -> tuple[int, int]:
    """First and last slice of the longest run where every rod reads its slab value."""
    ref = _slot_values(np.median(data[k0 : k0 + per_slab], axis=0), centres_px, radius_px)
    ok = np.array(
        [
            np.all(np.abs(_slot_values(data[k], centres_px, radius_px) - ref) <= SLICE_TOLERANCE_HU)
            for k in range(data.shape[0])
        ]
    )
    runs, n = ndimage.label(ok)
    if n == 0:
        raise CalibrationError("the rods found in the median image are not seen in any slice")
    sizes = np.bincount(runs)[1:]
    biggest = int(np.argmax(sizes)) + 1
    ks = np.flatnonzero(runs == biggest)
    margin = math.ceil(END_MARGIN_MM / sz)
    first, last = int(ks[0]) + margin, int(ks[-1]) - margin
    if (last - first + 1) * sz < MIN_LENGTH_MM:
        raise CalibrationError(
            f"the rods are seen over {(last - first + 1) * sz:.0f} mm only "
            f"(at least {MIN_LENGTH_MM:g} mm needed)"
        )
    return first, last


def _label_map(ct, centres_px, radius_px, order, first, last) -> Volume:
    data = np.zeros(ct.shape, np.uint8)
    rows, cols = np.mgrid[0 : ct.shape[1], 0 : ct.shape[2]]
    plane = np.zeros(ct.shape[1:], np.uint8)
    for (r, c), label in zip(centres_px, order, strict=True):
        inside = ((rows - r) / radius_px[0]) ** 2 + ((cols - c) / radius_px[1]) ** 2 <= 1.0
        plane[inside] = label
    data[first : last + 1] = plane
    out = ct.with_data(data, unit=LABEL)
    out.meta = {"rods": "found automatically (xbmd.ct.rods)"}
    return out


def write_rods_qc_png(detection: RodDetection, ct: Volume, path: str | Path, calibration=None):
    """QC picture: the median slice, the rods outlined and named (nominal density, HU), and the
    fitted line through (HU, density) when ``calibration`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = np.array([ct.world_to_index(rod.centre_mm)[[1, 0]] for rod in detection.rods])
    sx, sy = float(ct.spacing_mm[0]), float(ct.spacing_mm[1])
    aspect = sy / sx
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), width_ratios=(1.0, 1.6, 0.9))
    axes[0].imshow(detection.image, cmap="gray", vmin=-200, vmax=400, aspect=aspect)
    first, last = detection.slices
    axes[0].set_title(f"median of slices {first}-{last}", fontsize=9)
    axes[0].set_axis_off()
    outline = (detection.labels.data[first] > 0).astype(float)
    axes[0].contour(outline, levels=[0.5], colors="lime", linewidths=0.6)
    margin = 40.0 / np.array([sy, sx])
    lo = np.maximum(centres.min(axis=0) - margin, 0).astype(int)
    hi = np.minimum(centres.max(axis=0) + margin, np.array(ct.shape[1:]) - 1).astype(int)
    axes[1].imshow(detection.image, cmap="gray", vmin=-100, vmax=350, aspect=aspect)
    axes[1].contour(outline, levels=[0.5], colors="lime", linewidths=1.0)
    axes[1].set_xlim(lo[1] - 0.5, hi[1] + 0.5)
    axes[1].set_ylim(hi[0] + 0.5, lo[0] - 0.5)
    above = 0.5 * margin[0]
    for (r, c), rod in zip(centres, detection.rods, strict=True):
        text = f"{rod.density_mg_cm3:g}\n{rod.hu:.0f} HU" + ("" if rod.visible else "\n(placed)")
        axes[1].text(c, r - above, text, color="yellow", ha="center", va="bottom", fontsize=8)
    axes[1].set_title("rods outlined: nominal mg/cm3, median HU", fontsize=9)
    axes[1].set_axis_off()
    hu = np.array([rod.hu for rod in detection.rods])
    dens = np.array([rod.density_mg_cm3 for rod in detection.rods])
    axes[2].plot(hu, dens, "o", color="k")
    if calibration is not None:
        xs = np.linspace(hu.min() - 20, hu.max() + 20, 10)
        fit = f"r = {calibration.r:.5f}"
        axes[2].plot(xs, calibration.density_mg_cm3(xs), "-", color="tab:blue", label=fit)
        axes[2].legend(fontsize=8)
    axes[2].set_xlabel("rod median HU (of the median image)")
    axes[2].set_ylabel("nominal density, mg/cm3")
    fig.suptitle(f"{ct.source or 'CT'}: phantom rods found automatically", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
