"""Intravenous contrast medium in a virtual CT (optional; off unless asked for).

Real hip and abdominal CTs are often contrast-enhanced: iodine makes the blood in the arteries and
veins read 150-400 HU and raises the soft tissues a little, which confuses phantom-less
calibration (the blood pool and enhanced organs sit in muscle's HU window). This module adds that
to a virtual CT, in the CT only (the radiographs of the same patient are taken without contrast):

- vessels as tubes: the aorta in front of the lumbar spine, its bifurcation into the common iliac
  arteries, the external iliac arteries along the pelvic brim to the femoral arteries in front of
  the femoral heads, down to the bottom of the scan; the inferior vena cava and the iliac and
  femoral veins beside them;
- blood HU by phase (arterial: bright arteries, veins not yet; portal-venous: both), and a
  phase-dependent enhancement of skeletal muscle and of the bowel wall and organs.

Its draws come from their own generator (``rng_for``), so turning contrast on changes nothing else
of a case, and a cohort without contrast is bit-identical to one made before this module existed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from xbmd.synth.anatomy import TISSUE_HU
from xbmd.synth.model import Anatomy

#: TotalSegmentator ids of the vessels drawn (``xbmd.io.totalseg``): for the tissue label map.
VESSEL_IDS = {"aorta": 52, "inferior_vena_cava": 63, "artery_left": 65, "artery_right": 66,
              "vein_left": 67, "vein_right": 68}  # fmt: skip


@dataclass(frozen=True)
class ContrastPhase:
    """One contrast-enhanced acquisition: blood and tissue HU at the scan's tube voltage."""

    phase: str  # 'arterial' or 'portal-venous'
    artery_hu: float
    vein_hu: float
    muscle_enhancement_hu: float
    organ_enhancement_hu: float

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def rng_for(seed: int) -> np.random.Generator:
    """The case's contrast generator, independent of every other draw of the case."""
    return np.random.default_rng([seed, 0xC0])


def sample_contrast(rng: np.random.Generator) -> ContrastPhase:
    """A contrast phase: arterial (40 %) or portal-venous (60 %), with its HU."""
    if rng.random() < 0.4:
        return ContrastPhase(
            "arterial",
            artery_hu=float(rng.uniform(250.0, 420.0)),
            vein_hu=float(rng.uniform(60.0, 110.0)),
            muscle_enhancement_hu=float(rng.uniform(2.0, 8.0)),
            organ_enhancement_hu=float(rng.uniform(15.0, 40.0)),
        )
    return ContrastPhase(
        "portal-venous",
        artery_hu=float(rng.uniform(150.0, 220.0)),
        vein_hu=float(rng.uniform(140.0, 200.0)),
        muscle_enhancement_hu=float(rng.uniform(6.0, 15.0)),
        organ_enhancement_hu=float(rng.uniform(30.0, 70.0)),
    )


def _spine_front(anatomy: Anatomy, labels: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """(x, y) LPS mm of the front of the lumbar spine's midline in the top 25 mm of the scan."""
    k_n = labels.shape[0]
    dz = float(affine[2, 2])
    top = slice(max(0, k_n - int(25.0 / dz)), k_n)
    _, j, i = np.nonzero(np.isin(labels[top], (1, 2)))
    x = affine[0, 3] + affine[0, 0] * i
    y = affine[1, 3] + affine[1, 1] * j
    cx = float(anatomy.pelvis_center_mm[0])
    mid = np.abs(x - cx) < 20.0
    if not mid.any():
        return cx, float(anatomy.pelvis_center_mm[1]) - 30.0
    return cx, float(y[mid].min())


def vessel_paths(anatomy: Anatomy, labels: np.ndarray, affine: np.ndarray) -> dict:
    """Centre lines (world mm, (n, 3)) and radii (mm) of the vessels, by name."""
    cx, y_front = _spine_front(anatomy, labels, affine)
    z_top = float(affine[2, 3] + affine[2, 2] * (labels.shape[0] - 1)) + 5.0
    z_bottom = float(affine[2, 3]) - 5.0
    heads = {s: anatomy.landmarks[s] for s in ("left", "right")}
    z_head = 0.5 * (heads["left"].head_center_mm[2] + heads["right"].head_center_mm[2])
    z_bif = max(z_top - 30.0, z_head + 110.0)
    paths = {
        "aorta": ([[cx + 12, y_front - 13, z_top], [cx + 8, y_front - 13, z_bif]], [10.0, 9.0]),
        "inferior_vena_cava": (
            [[cx - 16, y_front - 10, z_top], [cx - 10, y_front - 8, z_bif - 8]],
            [11.0, 10.0],
        ),
    }
    for side, sign in (("left", 1.0), ("right", -1.0)):
        h = heads[side].head_center_mm
        r = heads[side].head_radius_mm
        x_art = h[0] - sign * 0.25 * r  # over the medial half of the head
        y_art = h[1] - r - 14.0  # in front of the head and its capsule
        brim = [cx + sign * 0.55 * abs(h[0] - cx), y_front + 15.0, z_head + 55.0]
        artery = [
            [cx + 8 + sign * 4, y_front - 13, z_bif],
            brim,
            [x_art, y_art + 8.0, z_head + 25.0],
            [x_art, y_art, z_head - 10.0],
            [x_art + sign * 6.0, y_art, z_bottom],
        ]
        vein = [[p[0] - sign * 11.0, p[1] + 4.0, p[2]] for p in artery]
        vein[0] = [cx - 10 + sign * 6, y_front - 8, z_bif - 8]
        paths[f"artery_{side}"] = (artery, [5.0, 4.5, 4.0, 4.0, 3.5])
        paths[f"vein_{side}"] = (vein, [6.0, 5.5, 5.0, 5.0, 4.5])
    return {k: (np.asarray(p, float), np.asarray(rad, float)) for k, (p, rad) in paths.items()}


def _tube_mask(points: np.ndarray, radii: np.ndarray, affine: np.ndarray, shape) -> tuple:
    """Voxel indices (k, j, i) inside a chain of tapered capsules (axis-aligned grid)."""
    spacing = np.array([affine[0, 0], affine[1, 1], affine[2, 2]])
    origin = affine[:3, 3]
    hits = []
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        r = max(ra, rb)
        lo = np.floor((np.minimum(a, b) - r - origin) / spacing).astype(int)
        hi = np.ceil((np.maximum(a, b) + r - origin) / spacing).astype(int)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(shape[::-1]) - 1)
        if (hi < lo).any():
            continue
        ii, jj, kk = (np.arange(lo[d], hi[d] + 1) for d in range(3))
        x = origin[0] + spacing[0] * ii[None, None, :]
        y = origin[1] + spacing[1] * jj[None, :, None]
        z = origin[2] + spacing[2] * kk[:, None, None]
        ab = b - a
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        inside = d2 <= (ra + t * (rb - ra)) ** 2
        k, j, i = np.nonzero(inside)
        hits.append((k + lo[2], j + lo[1], i + lo[0]))
    if not hits:
        return (np.array([], int),) * 3
    return tuple(np.concatenate([h[n] for h in hits]) for n in range(3))


def enhance(
    soft: np.ndarray,
    mineral: np.ndarray,
    labels: np.ndarray,
    anatomy: Anatomy,
    affine: np.ndarray,
    phase: ContrastPhase,
) -> np.ndarray:
    """Add ``phase``'s contrast to ``soft`` (HU at the scan's tube voltage, (K, J, I)) in place.

    Returns a uint8 map of the vessels drawn (``VESSEL_IDS``), 0 elsewhere. Vessels replace soft
    tissue only (no bone, no gas); muscle and the bowel wall and organs are enhanced.
    """
    body = anatomy.meta["body"]
    muscle = np.isclose(anatomy.soft_tissue_hu, body["muscle_hu"], atol=1e-3)
    organ = np.isclose(anatomy.soft_tissue_hu, TISSUE_HU["organ"], atol=1e-3) | np.isclose(
        anatomy.soft_tissue_hu, TISSUE_HU["bowel_wall"], atol=1e-3
    )
    n = anatomy.soft_tissue_hu.shape[1]  # the scan's grid is padded posteriorly
    soft[:, :n][muscle & (anatomy.mineral_mg_cm3 == 0)] += np.float32(phase.muscle_enhancement_hu)
    soft[:, :n][organ & (anatomy.mineral_mg_cm3 == 0)] += np.float32(phase.organ_enhancement_hu)
    vessels = np.zeros(soft.shape, np.uint8)
    for name, (points, radii) in vessel_paths(anatomy, labels, affine).items():
        k, j, i = _tube_mask(points, radii, affine, soft.shape)
        free = (mineral[k, j, i] == 0) & (soft[k, j, i] > -300) & (labels[k, j, i] == 0)
        k, j, i = k[free], j[free], i[free]
        artery = name == "aorta" or name.startswith("artery")
        soft[k, j, i] = phase.artery_hu if artery else phase.vein_hu
        vessels[k, j, i] = VESSEL_IDS[name]
    return vessels
