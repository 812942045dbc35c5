"""Site calibration: a line that maps xbmd's BMD estimate onto a site's own DXA scale.

Each DXA system (maker, model, software, calibration phantom) has its own scale; Lunar reads
about 6 % above Hologic at the hip. ``xbmd evaluate`` fits, on a site's own patients, a
method-comparison line ``site DXA = intercept + slope x estimate`` (Passing-Bablok or Deming,
``xbmd.evaluation.method_comparison``) and writes it as a *site-calibration file*;
``xbmd estimate --site-calibration FILE`` applies it to every estimate (and its interval) and
records it in every result.

The file (JSON, ``SITE_CALIBRATION_FORMAT``; docs/data-format.md, "Site calibration"):

::

    {"format": "xbmd-site-calibration", "format_version": 1,
     "estimate": "ct_abmd_g_cm2", "reference": "dxa_total_hip_g_cm2", "unit": "g/cm2",
     "method": "passing-bablok", "slope": 1.04, "intercept_g_cm2": -0.02,
     "slope_ci95": [0.97, 1.12], "intercept_ci95_g_cm2": [-0.08, 0.04], "n_hips": 64,
     "estimate_range_g_cm2": [0.55, 1.10], "residual_sd_g_cm2": 0.061,
     "dxa_scale": "hologic", "model": {"path": ..., "created": ..., "xbmd_version": ...},
     "dataset": ..., "created_utc": ..., "xbmd_version": ..., "warnings": [...]}

This module is the one reader (:func:`load_site_calibration`) and applies the line
(:meth:`SiteCalibration.apply`); the writer is ``xbmd.evaluation.site_fit``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import InputError

SITE_CALIBRATION_FORMAT = "xbmd-site-calibration"
SITE_CALIBRATION_VERSION = 1
#: The estimate a site calibration maps: the estimator's ``bmd_g_cm2`` (``BMD_TARGET``).
CALIBRATED_ESTIMATE = "ct_abmd_g_cm2"
CALIBRATION_REFERENCE = "dxa_total_hip_g_cm2"
#: Slopes outside this range are not a calibration of one BMD scale to another.
SLOPE_LIMITS = (0.5, 2.0)
INTERCEPT_LIMITS_G_CM2 = (-0.5, 0.5)


@dataclass(frozen=True)
class SiteCalibrated:
    """One estimate after the site calibration, with what to record."""

    bmd_g_cm2: float | None
    interval_g_cm2: tuple[float, float] | None
    warnings: list[str]
    record: dict


@dataclass(frozen=True)
class SiteCalibration:
    """``site DXA = intercept_g_cm2 + slope x estimate`` (g/cm2), fitted on ``n_hips`` hips."""

    slope: float
    intercept_g_cm2: float
    method: str
    n_hips: int
    estimate_range_g_cm2: tuple[float, float]
    estimate: str = CALIBRATED_ESTIMATE
    reference: str = CALIBRATION_REFERENCE
    slope_ci95: tuple[float | None, float | None] = (None, None)
    intercept_ci95_g_cm2: tuple[float | None, float | None] = (None, None)
    residual_sd_g_cm2: float | None = None
    dxa_scale: str | None = None
    model: dict = field(default_factory=dict)
    dataset: str | None = None
    created_utc: str | None = None
    xbmd_version: str | None = None
    warnings: tuple[str, ...] = ()
    source: str | None = None  # the file it was read from
    sha256: str | None = None  # of that file

    def __post_init__(self) -> None:
        lo, hi = SLOPE_LIMITS
        if not (math.isfinite(self.slope) and lo <= self.slope <= hi):
            raise InputError(
                f"{self.source or 'site calibration'}: slope {self.slope!r} is outside "
                f"{lo:g}-{hi:g}; that is not a calibration of one BMD scale to another"
            )
        lo, hi = INTERCEPT_LIMITS_G_CM2
        if not (math.isfinite(self.intercept_g_cm2) and lo <= self.intercept_g_cm2 <= hi):
            raise InputError(
                f"{self.source or 'site calibration'}: intercept {self.intercept_g_cm2!r} g/cm2 "
                f"is outside {lo:g}-{hi:g} g/cm2"
            )

    def to_dict(self) -> dict:
        return {
            "format": SITE_CALIBRATION_FORMAT,
            "format_version": SITE_CALIBRATION_VERSION,
            "estimate": self.estimate,
            "reference": self.reference,
            "unit": "g/cm2",
            "method": self.method,
            "slope": self.slope,
            "intercept_g_cm2": self.intercept_g_cm2,
            "slope_ci95": list(self.slope_ci95),
            "intercept_ci95_g_cm2": list(self.intercept_ci95_g_cm2),
            "n_hips": self.n_hips,
            "estimate_range_g_cm2": list(self.estimate_range_g_cm2),
            "residual_sd_g_cm2": self.residual_sd_g_cm2,
            "dxa_scale": self.dxa_scale,
            "model": self.model,
            "dataset": self.dataset,
            "created_utc": self.created_utc,
            "xbmd_version": self.xbmd_version,
            "warnings": list(self.warnings),
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    def apply(
        self,
        bmd_g_cm2: float | None,
        interval_g_cm2: tuple[float, float] | None = None,
        model_info: dict | None = None,
    ) -> SiteCalibrated:
        """The estimate (and its interval's ends) on the site's DXA scale.

        The line is increasing, so an interval maps end to end. Warnings: the estimate lies
        outside the range of estimates the line was fitted on (extrapolated), or the model
        estimating is not the one the line was fitted for (``model_info['created']`` differs).
        A missing or non-finite estimate stays None.

        >>> cal = SiteCalibration(1.05, -0.02, "passing-bablok", 60, (0.5, 1.1))
        >>> out = cal.apply(0.8, (0.72, 0.88))
        >>> round(out.bmd_g_cm2, 4), [round(v, 4) for v in out.interval_g_cm2]
        (0.82, [0.736, 0.904])
        """
        warnings = []
        lo, hi = self.estimate_range_g_cm2
        value = None
        if bmd_g_cm2 is not None and math.isfinite(float(bmd_g_cm2)):
            value = self.intercept_g_cm2 + self.slope * float(bmd_g_cm2)
            if not lo <= float(bmd_g_cm2) <= hi:
                warnings.append(
                    f"estimate {float(bmd_g_cm2):.3f} g/cm2 is outside the {lo:.3f}-{hi:.3f} "
                    "g/cm2 the site calibration was fitted on: extrapolated"
                )
        interval = None
        if interval_g_cm2 is not None and None not in interval_g_cm2:
            a, b = (self.intercept_g_cm2 + self.slope * float(v) for v in interval_g_cm2)
            interval = (a, b)
        mine, theirs = (model_info or {}).get("created"), self.model.get("created")
        if mine and theirs and mine != theirs:
            warnings.append(
                f"the site calibration was fitted for the model created {theirs}, not this one "
                f"({mine}): refit it with xbmd evaluate"
            )
        record = {
            "file": self.source,
            "sha256": self.sha256,
            "method": self.method,
            "slope": self.slope,
            "intercept_g_cm2": self.intercept_g_cm2,
            "reference": self.reference,
            "dxa_scale": self.dxa_scale,
            "n_hips": self.n_hips,
            "uncalibrated_bmd_g_cm2": None if bmd_g_cm2 is None else float(bmd_g_cm2),
            "uncalibrated_interval_g_cm2": None if interval_g_cm2 is None else list(interval_g_cm2),
            "extrapolated": bool(warnings and "extrapolated" in warnings[0]),
        }
        return SiteCalibrated(value, interval, warnings, record)


def _pair(value, name: str, where: str) -> tuple:
    if value is None:
        return (None, None)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"{where}: {name} must be a pair, not {value!r}")
    return tuple(None if v is None else float(v) for v in value)


def load_site_calibration(path: str | Path) -> SiteCalibration:
    """Read and check a site-calibration file; InputError naming the file on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such site-calibration file") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SITE_CALIBRATION_FORMAT:
        raise InputError(
            f"{path}: not an xbmd site-calibration file (format {SITE_CALIBRATION_FORMAT!r}, "
            "written by xbmd evaluate)"
        )
    if doc.get("format_version") != SITE_CALIBRATION_VERSION:
        raise InputError(f"{path}: format_version {doc.get('format_version')!r} is not supported")
    if doc.get("estimate") != CALIBRATED_ESTIMATE or doc.get("unit") != "g/cm2":
        raise InputError(
            f"{path}: calibrates {doc.get('estimate')!r} in {doc.get('unit')!r}; xbmd estimate "
            f"reports {CALIBRATED_ESTIMATE} in g/cm2"
        )
    try:
        lo, hi = (float(v) for v in doc["estimate_range_g_cm2"])
        return SiteCalibration(
            slope=float(doc["slope"]),
            intercept_g_cm2=float(doc["intercept_g_cm2"]),
            method=str(doc["method"]),
            n_hips=int(doc["n_hips"]),
            estimate_range_g_cm2=(lo, hi),
            estimate=doc["estimate"],
            reference=str(doc.get("reference", CALIBRATION_REFERENCE)),
            slope_ci95=_pair(doc.get("slope_ci95"), "slope_ci95", str(path)),
            intercept_ci95_g_cm2=_pair(
                doc.get("intercept_ci95_g_cm2"), "intercept_ci95_g_cm2", str(path)
            ),
            residual_sd_g_cm2=doc.get("residual_sd_g_cm2"),
            dxa_scale=doc.get("dxa_scale"),
            model=dict(doc.get("model") or {}),
            dataset=doc.get("dataset"),
            created_utc=doc.get("created_utc"),
            xbmd_version=doc.get("xbmd_version"),
            warnings=tuple(doc.get("warnings") or ()),
            source=str(path),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: incomplete site calibration ({type(exc).__name__}: {exc})"
        ) from None
