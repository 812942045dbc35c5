"""Coded concepts of xbmd's measurement report (TID 1500), and which result keys become which.

Honest codes (docs/pacs.md, "Codes"): LOINC and DICOM have codes for bone mineral density
measured by DXA; an estimate from a plain radiograph by a learned model is not that measurement,
so xbmd does not borrow them. Everything xbmd itself asserts is coded in a private scheme,
designator ``99XBMD`` (PS3.16 8.2: designators starting with "99" are private), whose code values
are the keys of ``result.json`` (``HipResult.to_dict``), so that a reader can map an SR item back
to its JSON value without a table. Standard codes are used only where they are literally true:
the procedure (plain radiography), the finding site (hip joint, right or left), the units (UCUM),
yes/no (SNOMED CT) and the template's own DCM concepts (highdicom).

Which keys of a result become SR content (``measurement_items``, ``qualitative_items``):

- numbers named in ``MEASUREMENTS``, or whose key ends with a unit suffix of ``UNIT_SUFFIXES``
  (so a new ``*_g_cm2`` key from the estimator is reported without a change here), except the
  bookkeeping keys of ``NOT_MEASUREMENTS``; None values are left out;
- pairs ``[low, high]`` whose key contains ``_interval_`` (e.g. ``bmd_interval_g_cm2``): two
  numbers, codes ``<key>_lower`` and ``<key>_upper``;
- booleans (except ``NOT_MEASUREMENTS``): a yes/no evaluation named by the key;
- ``who_category``: a private category code (``WHO_CATEGORIES``);
- the reference database and the warnings: text items (``sr.py``).
"""

from __future__ import annotations

import math

from pydicom.sr.coding import Code

SCHEME = "99XBMD"
SCHEME_NAME = "xbmd private codes"
SCHEME_RESPONSIBLE = "xbmd project (docs/pacs.md)"

# ---- standard concepts that are literally true of an xbmd result
PLAIN_RADIOGRAPHY = Code("168537006", "SCT", "Plain radiography")
HIP_JOINT = Code("24136001", "SCT", "Hip joint")
LATERALITY = {"right": Code("24028007", "SCT", "Right"), "left": Code("7771000", "SCT", "Left")}
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")
NO_UNITS = Code("1", "UCUM", "no units")

# ---- private concepts
TITLE = Code("xbmd_report", SCHEME, "Hip BMD estimated from a plain radiograph (research use)")
METHOD = Code(
    "xbmd_method",
    SCHEME,
    "Plain-radiograph estimate by a learned model (not DXA)",
)
FINDING_TYPE = Code("hip_bmd_estimate", SCHEME, "Estimated areal bone mineral density of a hip")
REFERENCE = Code("reference", SCHEME, "T-score reference database")
WARNING = Code("warning", SCHEME, "Warning about this estimate")
INTENDED_USE = Code("intended_use", SCHEME, "Intended use")
RESEARCH_USE_ONLY = "Research use only - not for diagnosis"

#: unit suffix of a result key -> UCUM unit (longest suffix first)
UNIT_SUFFIXES = {
    "_mg_cm3": Code("mg/cm3", "UCUM", "milligram per cubic centimeter"),
    "_g_cm2": Code("g/cm2", "UCUM", "gram per square centimeter"),
    "_mm2": Code("mm2", "UCUM", "square millimeter"),
    "_mm": Code("mm", "UCUM", "millimeter"),
    "_pct": Code("%", "UCUM", "percent"),
}

#: known result keys: code meaning and unit (None: from the key's suffix)
MEASUREMENTS: dict[str, tuple[str, Code | None]] = {
    "bmd_g_cm2": ("Total hip aBMD (DXA-like) estimated from a plain radiograph", None),
    "t_score": ("T-score of the estimated total hip BMD", NO_UNITS),
    "z_score": ("Z-score of the estimated total hip BMD", NO_UNITS),
    "bmd_drr_g_cm2": ("Mean areal density of the virtual X-ray in the proximal femur", None),
    "qct_vbmd_mg_cm3": ("Estimated QCT volumetric BMD of the femoral head", None),
    "pf_area_mm2": ("Area of the predicted proximal-femur region at the detector", None),
    "bmd_interval_g_cm2_lower": ("Lower limit of the interval of the estimated BMD", None),
    "bmd_interval_g_cm2_upper": ("Upper limit of the interval of the estimated BMD", None),
    "bmd_interval_level": ("Coverage of the interval of the estimated BMD", NO_UNITS),
    "localiser_confidence": ("Confidence of the femoral head localiser", NO_UNITS),
}

#: keys that are bookkeeping, not findings
NOT_MEASUREMENTS = frozenset(
    {"seconds", "crop_pixel_mm", "virtual_xray_pixel_mm", "mirrored", "pixel_spacing_mm"}
)

QUALITATIVE_MEANINGS = {
    "confident": "The estimate passed xbmd's plausibility checks",
    "unilateral_crop": "The radiograph is a crop of one hip",
}

WHO_CATEGORY = Code("who_category", SCHEME, "WHO category of the estimated BMD (not a diagnosis)")
WHO_CATEGORIES = {
    "normal": Code("who_normal", SCHEME, "Normal range (T-score >= -1.0)"),
    "osteopenia": Code("who_low_bone_mass", SCHEME, "Low bone mass range (-2.5 < T-score < -1.0)"),
    "osteoporosis": Code("who_osteoporosis", SCHEME, "Osteoporosis range (T-score <= -2.5)"),
}


def unit_of(key: str) -> Code | None:
    """The UCUM unit of a result key: from ``MEASUREMENTS`` or its suffix; None if neither."""
    if key in MEASUREMENTS and MEASUREMENTS[key][1] is not None:
        return MEASUREMENTS[key][1]
    for suffix, unit in UNIT_SUFFIXES.items():
        if key.endswith(suffix):
            return unit
    return None


def concept(key: str) -> Code:
    """The private concept named by a result key."""
    meaning = MEASUREMENTS.get(key, (None, None))[0] or QUALITATIVE_MEANINGS.get(key)
    return Code(key, SCHEME, meaning or f"xbmd result {key}")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def measurement_items(result: dict) -> list[tuple[str, float, Code]]:
    """(key, value, unit) of every number of a result that the SR reports (module docstring)."""
    items = []
    for key, value in result.items():
        if key in NOT_MEASUREMENTS:
            continue
        if "_interval_" in key and isinstance(value, (list, tuple)) and len(value) == 2:
            unit = unit_of(key)
            low, high = _number(value[0]), _number(value[1])
            if unit is not None and low is not None and high is not None:
                items += [(f"{key}_lower", low, unit), (f"{key}_upper", high, unit)]
            continue
        number, unit = _number(value), unit_of(key)
        if number is not None and unit is not None:
            items.append((key, number, unit))
    return items


def qualitative_items(result: dict) -> list[tuple[Code, Code]]:
    """(concept, value) of the yes/no facts and the WHO category of a result."""
    items = []
    for key, value in result.items():
        if isinstance(value, bool) and key not in NOT_MEASUREMENTS:
            items.append((concept(key), YES if value else NO))
    category = result.get("who_category")
    if category in WHO_CATEGORIES:
        items.append((WHO_CATEGORY, WHO_CATEGORIES[category]))
    return items
