"""Numbers for people, shared by the report's tables and figures: formatting (missing and NaN
print as "n/a"), the figures' resolution and the robustness perturbations' names."""

from __future__ import annotations

import math
from collections.abc import Sequence

from xbmd.errors import InputError

#: Display resolution of every figure, dots per inch (keeps the page small).
DPI = 90


#: Axis label and order of the robustness perturbations.
ROBUSTNESS_KINDS = {
    "jpeg": "JPEG quality",
    "exposure": "exposure gradient across the crop (%)",
    "gamma": "gamma",
    "noise": "noise SD (% of the intensity window)",
    "dicom_jpeg": "JPEG quality (inside the DICOM)",
    "spacing": "pixel spacing error (%)",
    "resize": "resize factor",
}


class TooFewValuesError(InputError):
    """A plot was asked for with too few finite values to draw it."""


def _finite(value) -> bool:
    """True for a real, finite number (not None, NaN, inf or a non-number)."""
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt_number(value, digits: int = 3, unit: str = "") -> str:
    """``value`` with ``digits`` decimals and an optional unit; "n/a" when missing or not finite.

    >>> fmt_number(0.91234, 3, "g/cm2"), fmt_number(float("nan"))
    ('0.912 g/cm2', 'n/a')
    """
    if not _finite(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    return f"{text} {unit}" if unit else text


def fmt_int(value) -> str:
    """An integer count, or "n/a"."""
    return str(int(value)) if _finite(value) else "n/a"


def fmt_p(value) -> str:
    """A p-value: 4 decimals down to 1e-4, scientific notation below; "n/a" when missing."""
    if not _finite(value):
        return "n/a"
    value = float(value)
    if value == 0.0:
        return "< 1e-300"
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def fmt_range(pair, digits: int = 3, unit: str = "") -> str:
    """``[lo, hi]`` as "lo to hi unit"; "n/a" when missing."""
    if not isinstance(pair, Sequence) or len(pair) != 2 or not all(_finite(v) for v in pair):
        return "n/a"
    text = f"{fmt_number(pair[0], digits)} to {fmt_number(pair[1], digits)}"
    return f"{text} {unit}" if unit else text


def fmt_seconds(value) -> str:
    """A duration in seconds, with minutes added from two minutes on."""
    if not _finite(value):
        return "n/a"
    value = float(value)
    return f"{value:.1f} s" + (f" ({value / 60:.1f} min)" if value >= 120 else "")
