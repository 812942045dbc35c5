"""Contrast medium in a CT, and phantom-less calibration that knows its limits.

Iodinated contrast makes the blood read 150-400 HU and raises enhancing organs: the automatic
reference-tissue search of phantom-less calibration (``xbmd.ct.calibration``) then takes enhanced
organs or blood for "muscle", and a density rendering (``xbmd drr``) shows the vessels as
mineral. This module detects contrast and decides what phantom-less calibration may do.

:func:`detect_contrast` looks, in order, at

1. labelled blood pool (TotalSegmentator's aorta, heart, vena cava, iliac vessels;
   ``xbmd.io.totalseg.BLOOD_POOL_IDS``): contrast when the median HU of any one of them exceeds
   ``BLOOD_CONTRAST_HU`` (unenhanced blood reads 30-60 HU; in an arterial phase only the
   arteries are enhanced);
2. without such labels, the image (in-plane pixels up to 2 mm; coarser: not tested, and the
   check says so): contrast-filled vessels are uniform (no trabecular texture),
   bright (``VESSEL_HU`` range), tube-like regions inside the patient (between its anterior and
   posterior fat, so not in the table or a phantom under it), away from dense bone, not part of
   a bone nor enclosed by a cortex above 300 HU in their slice (trabecular bone), running at least
   ``MIN_VESSEL_LENGTH_MM`` along the patient (longer than a vertebral body); one is enough.

:func:`phantomless_with_labels` is phantom-less calibration that prefers labelled muscle and fat
(TotalSegmentator's muscles 80-89 or its ``tissue_types``, xbmd ids 251-253) over the automatic
histogram search, and refuses a contrast-enhanced CT without muscle labels unless asked to go
on (then the result's notes carry the warning). Measured errors: docs/calibration.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xbmd.ct.calibration import (
    MIN_TISSUE_VOXELS,
    Calibration,
    body_mask,
    phantomless_calibration,
    region_median_hu,
)
from xbmd.errors import CalibrationError
from xbmd.io.totalseg import BLOOD_POOL_IDS, MUSCLE_IDS, TISSUE_TYPE_IDS, TOTALSEGMENTATOR_IDS
from xbmd.volume import Volume

#: Labelled blood above this median HU is contrast-enhanced.
BLOOD_CONTRAST_HU = 100.0
#: HU range of contrast-filled vessels in the image test.
VESSEL_HU = (130.0, 650.0)
#: Vessel voxels are uniform: their local standard deviation (3 x 3 in-plane, after a light
#: smoothing) is at most this factor times the image noise (the median of that SD in fat) or the
#: noise + 10 HU, and at most ``VESSEL_MAX_SD_HU`` (trabecular bone is textured).
VESSEL_NOISE_FACTOR = 2.5
#: Gaps in a bone's cortex up to about twice this (mm) are closed before its holes are filled.
CORTEX_GAP_MM = 3.0
VESSEL_MAX_SD_HU = 30.0
#: The image test needs in-plane pixels at most this large (mm); coarser: contrast unknown.
IMAGE_TEST_MAX_PIXEL_MM = 2.0
#: ... at least this far (mm) from dense bone (HU > ``BONE_HU``).
BONE_HU = 700.0
BONE_MARGIN_MM = 3.0
#: In an axial slice, what a ring above this HU encloses (trabecular bone inside a cortex), and a
#: connected piece above it that holds dense bone (> ``BONE_HU``) with what it encloses, are bone,
#: not vessels.
ENCLOSING_HU = 300.0
#: A vessel runs at least this far along the patient (mm; longer than a vertebral body or the
#: coccyx, whose trabecular bone can look uniform) ...
MIN_VESSEL_LENGTH_MM = 60.0
#: ... holds at least this volume (cm3) and is thin: mean cross-section at most this (cm2).
MIN_VESSEL_CM3 = 0.8
MAX_VESSEL_SECTION_CM2 = 12.0
#: The image test works on pixels of about this size (mm), subsampling finer ones.
IMAGE_TEST_PIXEL_MM = 1.4
#: Fat and muscle ids a label map may carry (TotalSegmentator's total and tissue_types tasks).
FAT_IDS = (TISSUE_TYPE_IDS["subcutaneous_fat"], TISSUE_TYPE_IDS["torso_fat"])
MUSCLE_LABEL_IDS = (*MUSCLE_IDS, TISSUE_TYPE_IDS["skeletal_muscle"])
BLOOD_POOL_NAMES = {v: k for k, v in TOTALSEGMENTATOR_IDS.items() if v in BLOOD_POOL_IDS}


@dataclass(frozen=True)
class ContrastCheck:
    """Whether a CT is contrast-enhanced, how that was decided, and the evidence."""

    contrast: bool
    method: str  # 'labels' or 'image'
    evidence: str
    blood_hu: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def detect_contrast(ct: Volume, labels: Volume | None = None) -> ContrastCheck:
    """Is ``ct`` (HU) contrast-enhanced? From labelled blood pool if any, else from the image."""
    if labels is not None:
        readings = {}  # each vessel on its own: in an arterial phase the veins are not enhanced
        for ident in BLOOD_POOL_IDS:
            mask = labels.data == ident
            if mask.sum() >= MIN_TISSUE_VOXELS:
                core = ndimage.binary_erosion(mask)
                core = core if core.sum() >= MIN_TISSUE_VOXELS else mask
                readings[ident] = (float(np.median(ct.data[core])), int(core.sum()))
        if readings:
            ident = max(readings, key=lambda i: readings[i][0])
            hu, n = readings[ident]
            found = hu > BLOOD_CONTRAST_HU
            name = BLOOD_POOL_NAMES.get(ident, str(ident))
            return ContrastCheck(
                found,
                "labels",
                f"the brightest labelled blood pool, {name} ({n} voxels), reads {hu:.0f} HU "
                f"({'above' if found else 'below'} {BLOOD_CONTRAST_HU:g} HU)",
                hu,
            )
    return _image_test(ct)


def _image_test(ct: Volume) -> ContrastCheck:
    step = max(1, round(IMAGE_TEST_PIXEL_MM / float(min(ct.spacing_mm[:2]))))
    if step > 1:  # fine in-plane pixels: every step-th is enough for vessels, and faster
        ct = Volume(
            ct.data[:, ::step, ::step],
            ct.affine @ np.diag([step, step, 1.0, 1.0]),
            ct.unit,
            ct.source,
        )
    hu = ct.data.astype(np.float32, copy=False)
    spacing = ct.spacing_mm  # (i, j, k)
    if float(max(spacing[:2])) > IMAGE_TEST_MAX_PIXEL_MM:
        return ContrastCheck(
            False,
            "image",
            f"not tested: in-plane pixels of {float(max(spacing[:2])):.1f} mm are too coarse to "
            f"tell vessels from bone (<= {IMAGE_TEST_MAX_PIXEL_MM:g} mm needed); contrast unknown",
        )
    smooth = ndimage.gaussian_filter(hu, 0.7)
    mean = ndimage.uniform_filter(smooth, (1, 3, 3))
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(smooth * smooth, (1, 3, 3)) - mean * mean, 0))
    del mean
    body = body_mask(hu)
    fat = body & (smooth > -200) & (smooth < -50)
    fat = ndimage.binary_erosion(fat, np.ones((1, 3, 3), bool))  # not partial-volume edges
    noise = float(np.median(sd[fat])) if fat.any() else VESSEL_MAX_SD_HU
    lo, hi = VESSEL_HU
    uniform = sd <= min(VESSEL_MAX_SD_HU, max(VESSEL_NOISE_FACTOR * noise, noise + 10.0))
    candidate = (smooth >= lo) & (smooth <= hi) & uniform
    del sd, uniform
    margin = np.maximum(np.round(BONE_MARGIN_MM / spacing[::-1]).astype(int), 1)
    bone = ndimage.binary_dilation(
        smooth > BONE_HU, np.ones(tuple(2 * m + 1 for m in margin), bool)
    )
    candidate &= ~bone
    candidate &= body & _within_fat(fat)
    del fat, body
    ring, dense = smooth > ENCLOSING_HU, smooth > BONE_HU
    r = max(1, round(CORTEX_GAP_MM / float(min(spacing[:2]))))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    gap = yy**2 + xx**2 <= r * r
    for k in np.flatnonzero(candidate.any(axis=(1, 2))):  # bones: pieces > 300 HU with dense bone
        pieces, _ = ndimage.label(ring[k])
        bone_ids = np.unique(pieces[dense[k]])
        bones = np.isin(pieces, bone_ids[bone_ids > 0])
        bones = ndimage.binary_closing(bones, gap, border_value=0)  # cortex with small gaps
        candidate[k] &= ~_filled(bones)  # bone and what it encloses
        closed = ndimage.binary_closing(ring[k], gap, border_value=0)
        candidate[k] &= ~(_filled(closed) & ~closed)  # enclosed by any cortex above 300 HU
    del bone, smooth, ring, dense
    pieces, n = ndimage.label(candidate)
    if n == 0:
        return ContrastCheck(False, "image", "no uniform bright tube-like region in the body")
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(pieces.ravel())
    best = None
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
        if box is None or sizes[index] * voxel_cm3 < MIN_VESSEL_CM3:
            continue
        length_mm = (box[0].stop - box[0].start) * float(spacing[2])
        section_cm2 = sizes[index] * voxel_cm3 / (length_mm / 10.0)
        if length_mm < MIN_VESSEL_LENGTH_MM or section_cm2 > MAX_VESSEL_SECTION_CM2:
            continue
        if best is None or sizes[index] > sizes[best[0]]:
            best = (index, box, length_mm, section_cm2)
    if best is None:
        return ContrastCheck(False, "image", "no uniform bright tube-like region in the body")
    index, box, length_mm, section_cm2 = best
    region = pieces[box] == index
    median = float(np.median(hu[box][region]))
    k, j, i = (int(np.mean(np.nonzero(region)[a])) + box[a].start for a in range(3))
    where = np.round(ct.index_to_world(np.array([i, j, k], float)), 0)
    return ContrastCheck(
        True,
        "image",
        f"a uniform {median:.0f} HU tube-like region ({sizes[index] * voxel_cm3:.1f} cm3, "
        f"{length_mm:.0f} mm long, {section_cm2:.1f} cm2 across) at LPS {where.tolist()} mm: "
        "a contrast-filled vessel",
        median,
    )


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled (2D): background pieces that do not reach the border.

    Same result as ``ndimage.binary_fill_holes``, by labelling instead of iterated dilation
    (which took most of the test's time)."""
    background, _ = ndimage.label(~mask)
    edge = np.unique(
        np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    )
    return mask | ~np.isin(background, edge)


def _within_fat(fat: np.ndarray) -> np.ndarray:
    """Voxels between the first and the last fat voxel of their (slice, column) along the rows:
    inside the patient's fat envelope (the table, and a phantom under the patient, lie outside
    the patient's subcutaneous fat)."""
    rows = fat.shape[1]
    has = fat.any(axis=1)
    first = np.where(has, fat.argmax(axis=1), rows)
    last = np.where(has, rows - 1 - fat[:, ::-1, :].argmax(axis=1), -1)
    j = np.arange(rows)[None, :, None]
    return (j > first[:, None, :]) & (j < last[:, None, :])


def _labelled(ct: Volume, labels: Volume, ids) -> tuple[float, int, int] | None:
    mask = np.isin(labels.data, ids)
    if mask.sum() < MIN_TISSUE_VOXELS:
        return None
    tmp = labels.with_data(mask.astype(np.uint8))
    found = region_median_hu(ct.data, tmp.data, 1, erode=True)
    return found if found[2] >= MIN_TISSUE_VOXELS else None


def phantomless_with_labels(
    ct: Volume,
    labels: Volume | None = None,
    kvp: float | None = None,
    allow_contrast: bool = False,
    check: ContrastCheck | None = None,
) -> tuple[Calibration, ContrastCheck]:
    """Phantom-less calibration that checks for contrast and prefers labelled muscle and fat.

    ``labels``: a label map on the CT's grid with TotalSegmentator's ids (muscles 80-89, the
    tissue_types' fat 251/252 and muscle 253 as xbmd numbers them, blood pool for the contrast
    check), e.g. read from its output folder; other ids are ignored. Air always, and fat when not
    labelled, are found automatically. A contrast-enhanced CT without muscle labels raises
    ``CalibrationError`` unless ``allow_contrast`` (then the automatic search is used and a
    warning is added to the notes). ``check``: a ``detect_contrast(ct, labels)`` result already
    at hand (it is not repeated).
    """
    check = detect_contrast(ct, labels) if check is None else check
    measured: dict[str, tuple[float, int, int]] = {}
    notes = []
    if labels is not None:
        muscle = _labelled(ct, labels, MUSCLE_LABEL_IDS)
        fat = _labelled(ct, labels, FAT_IDS)
        if muscle is not None:
            measured["muscle"] = muscle
            notes.append("muscle: median of the labelled muscles (eroded one voxel)")
        if fat is not None:
            measured["fat"] = fat
            notes.append("fat: median of the labelled fat (eroded one voxel)")
    if check.contrast:
        notes.append(f"contrast medium detected: {check.evidence}")
        if "muscle" not in measured:
            if not allow_contrast:
                raise CalibrationError(
                    f"{ct.source or 'CT'}: contrast medium detected ({check.evidence}); "
                    "phantom-less calibration from unlabelled tissues takes enhanced organs and "
                    "blood for muscle (docs/calibration.md): give muscle labels (e.g. "
                    "TotalSegmentator's output) or a phantom, or allow it explicitly"
                )
            notes.append(
                "WARNING: contrast-enhanced CT calibrated from unlabelled tissues; expect "
                "several times the usual phantom-less error (docs/calibration.md)"
            )
    cal = phantomless_calibration(ct, kvp=kvp, measured=measured, extra_notes=notes)
    return cal, check
