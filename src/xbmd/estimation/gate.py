"""What an estimate must pass before xbmd calls it confident: refusals and the quality gate.

Refused (InputError, no estimate): what cannot give a BMD at all:

- no pixel spacing, or one outside ``PIXEL_SPACING_RANGE_MM`` (a hip radiograph's detector
  pixels are 0.1-0.2 mm, downsampled exports and previews up to 1-2 mm; 50 mm is a typing
  error; a wrong scale inside the range is caught by the heads' separation below);
- a source-detector distance outside ``SDD_RANGE_MM`` or a source-patient distance at or
  beyond it (a file error: the geometry then means nothing);
- an image with fewer than ``MIN_GRAY_LEVELS`` distinct values in its field (binary, or a
  quantised export: no bone texture to read).

The gate (the estimate is made, but ``confident: false`` with the reason, and no WHO category):

- the image's scale is uncertain: Pixel Spacing (0028,0030) alone, calibrated to an unknown
  plane (the detector's Imager Pixel Spacing is what the model was trained in);
- lossy JPEG compression below ``JPEG_SAFE_QUALITY`` (the lowest quality at which the BMD of a
  whole-file JPEG stays within the tolerance measured by ``xbmd evaluate``'s whole-file
  robustness, docs/validation/);
- the femoral heads are ``HEAD_SEPARATION_RANGE_MM`` apart or outside it (at the detector):
  the pixel spacing or the image is not what it claims;
- DICOM Body Part Examined names another region;
- the per-hip checks of the estimator (region size, collimation, the regression's range), an
  image the model finds unfamiliar (``xbmd.model.uncertainty``), an image that had to be
  turned upright (``xbmd.estimation.orientation``), and a side that contradicts the file's
  Image Laterality.
"""

from __future__ import annotations

import math

import numpy as np

from xbmd.errors import InputError
from xbmd.io.xray import XRay

#: Plausible detector pixel spacing of a hip radiograph, mm.
PIXEL_SPACING_RANGE_MM = (0.05, 2.0)
#: Plausible source-detector distance, mm (table bucky 1000-1150, upright 1800).
SDD_RANGE_MM = (500.0, 2500.0)
#: Distinct values an image's field must have (an 8-bit export has up to 256).
MIN_GRAY_LEVELS = 32
#: Plausible distance between the two femoral head centres at the detector, mm: adult
#: head-centre distances of about 150-210 mm (both sexes) magnified 1.05-1.35 by a table bucky
#: geometry, with room for the extremes.
HEAD_SEPARATION_RANGE_MM = (120.0, 320.0)
#: Lowest JPEG quality taken as safe (measured: docs/validation/, whole-file robustness).
JPEG_SAFE_QUALITY = 50
#: DICOM Body Part Examined values that are certainly not a hip.
OTHER_BODY_PARTS = frozenset(
    {"CHEST", "HAND", "SKULL", "HEAD", "KNEE", "ANKLE", "FOOT", "ELBOW", "WRIST", "SHOULDER",
     "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "ARM", "BREAST", "NECK", "FINGER", "TOE"}
)  # fmt: skip


def check_image(xray: XRay) -> None:
    """Refuse (InputError) an image that cannot give a BMD (module docstring)."""
    if xray.pixel_spacing_mm is None:
        raise InputError(
            "no pixel spacing in the file; BMD in g/cm2 needs the physical scale: "
            "give the detector pixel spacing with --pixel-spacing MM"
        )
    lo, hi = PIXEL_SPACING_RANGE_MM
    spacing = xray.pixel_spacing_mm
    if not all(lo <= s <= hi for s in spacing):
        where = "given with --pixel-spacing" if xray.spacing_source == "user" else "in the file"
        raise InputError(
            f"pixel spacing {spacing[0]:g} x {spacing[1]:g} mm ({where}) is outside the "
            f"{lo:g}-{hi:g} mm of hip radiographs"
        )
    sdd, sod = xray.meta.get("sdd_mm"), xray.meta.get("sod_mm")
    lo, hi = SDD_RANGE_MM
    if sdd and not lo <= sdd <= hi:
        raise InputError(f"source-detector distance {sdd:g} mm is outside {lo:g}-{hi:g} mm")
    if sdd and sod and not 0 < sod < sdd:
        raise InputError(
            f"source-patient distance {sod:g} mm is not between 0 and the source-detector "
            f"distance {sdd:g} mm"
        )
    levels = gray_levels(xray.pixels)
    if levels < MIN_GRAY_LEVELS:
        raise InputError(
            f"the image has {levels} distinct grey values (fewer than {MIN_GRAY_LEVELS}): a "
            "binary or heavily quantised picture, not a radiograph xbmd can read"
        )


def gray_levels(pixels: np.ndarray, cap: int = 4096) -> int:
    """Distinct values of an image (on a subsample of at most ``cap`` squared pixels)."""
    step = max(1, math.ceil(max(pixels.shape) / cap))
    return int(np.unique(pixels[::step, ::step]).size)


def image_gate(xray: XRay) -> list[str]:
    """Reasons, from the file alone, that no estimate of this image is confident."""
    reasons = []
    if xray.spacing_source == "PixelSpacing":
        reasons.append(
            "the file gives Pixel Spacing (0028,0030) only, calibrated to an unknown plane: "
            "the BMD scale is uncertain (about +-15 %); Imager Pixel Spacing is needed"
        )
    quality = xray.meta.get("jpeg_quality")
    if quality is not None and quality < JPEG_SAFE_QUALITY:
        reasons.append(
            f"JPEG-compressed at about quality {quality} (below {JPEG_SAFE_QUALITY}, the lowest "
            "measured to leave the BMD within tolerance)"
        )
    part = str(xray.meta.get("body_part") or "").upper().replace(" ", "")
    if part in OTHER_BODY_PARTS:
        reasons.append(f"the DICOM says Body Part Examined {part}: not a hip")
    return reasons


def head_separation_gate(heads, spacing_mm: tuple[float, float]) -> list[str]:
    """A reason when two heads are implausibly far apart or close at the detector."""
    if len(heads) != 2:
        return []
    (a, b) = heads
    d_mm = math.hypot((a.row - b.row) * spacing_mm[0], (a.col - b.col) * spacing_mm[1])
    lo, hi = HEAD_SEPARATION_RANGE_MM
    if lo <= d_mm <= hi:
        return []
    return [
        f"the femoral heads are {d_mm:.0f} mm apart at the detector (plausible {lo:.0f}-{hi:.0f} "
        "mm): the pixel spacing or the image is not what the file says"
    ]


def laterality_gate(xray: XRay, sides: list[str], unilateral: bool) -> list[str]:
    """A reason when the file's Image Laterality contradicts the side of a one-hip image."""
    tag = str(xray.meta.get("laterality") or "").strip().upper()
    if tag not in ("L", "R") or not unilateral or len(sides) != 1:
        return []
    said = {"L": "left", "R": "right"}[tag]
    if sides[0] == said:
        return []
    return [
        f"the file says Image Laterality {tag} ({said} hip) but the hip looks like a {sides[0]} "
        "one: a mirrored image or a wrong tag; the side is not certain"
    ]
