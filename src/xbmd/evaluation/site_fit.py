"""The site-calibration line of ``xbmd evaluate``: estimate -> the site's DXA, per hip.

When the evaluated data have DXA (``dxa_total_hip_g_cm2``) and the estimate that
``xbmd estimate`` reports as ``bmd_g_cm2`` (``ct_abmd_g_cm2``), a method-comparison line
``DXA = intercept + slope x estimate`` is fitted on one point per hip (the mean over a hip's
images of the estimate and of the DXA, so a hip imaged four times does not count four times),
by Passing-Bablok (default) or Deming (``xbmd.evaluation.method_comparison``), and written as
``REPORT/site_calibration.json`` (``xbmd.estimation.site``), which
``xbmd estimate --site-calibration`` applies.

A line from few hips is noisy: fewer than ``MIN_HIPS`` gives none; fewer than
``RECOMMENDED_HIPS`` (CLSI EP09's minimum of 40 samples for a method comparison) is written with
a warning in the file.
"""

from __future__ import annotations

import datetime
import html
import math
from pathlib import Path

import numpy as np

from xbmd.estimation.site import (
    CALIBRATED_ESTIMATE,
    CALIBRATION_REFERENCE,
    SLOPE_LIMITS,
    SiteCalibration,
)
from xbmd.evaluation.method_comparison import METHODS, fit_line

MIN_HIPS = 5
RECOMMENDED_HIPS = 40
FILE_NAME = "site_calibration.json"


def _hip_means(values: np.ndarray, hips: list[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for v, h in zip(values, hips, strict=True):
        if math.isfinite(v):
            groups.setdefault(h, []).append(float(v))
    return {h: float(np.mean(v)) for h, v in groups.items()}


def dataset_dxa_scale(dataset: str | Path | None) -> str | None:
    """The DXA scale of the manifest a dataset was prepared from (its cases' ``dxa_scale``, when
    they share one), or None when unknown."""
    import json

    from xbmd.dataset.manifest import read_manifest
    from xbmd.errors import InputError

    if dataset is None:
        return None
    try:
        prep = json.loads((Path(dataset) / "prepare.json").read_text(encoding="utf-8"))
        scales = {c.dxa_scale for c in read_manifest(prep["manifest"]) if c.dxa_g_cm2}
    except (OSError, ValueError, KeyError, InputError):
        return None
    return scales.pop() if len(scales) == 1 else None


def fit_site_calibration(
    samples,
    method: str = "passing-bablok",
    delta: float = 1.0,
    model: dict | None = None,
    dataset: str | Path | None = None,
) -> tuple[SiteCalibration | None, dict | None, str]:
    """(calibration or None, metrics section or None, reason when None) from ``Samples``."""
    from xbmd import __version__

    if method not in METHODS:
        return None, None, f"unknown fit {method!r}"
    if CALIBRATION_REFERENCE not in samples.references:
        return None, None, "the data have no DXA (dxa_total_hip_g_cm2)"
    if CALIBRATED_ESTIMATE not in samples.estimates:
        return None, None, f"no {CALIBRATED_ESTIMATE} estimate (the BMD xbmd estimate reports)"
    hips = [r["hip"] for r in samples.rows]
    est = _hip_means(samples.estimates[CALIBRATED_ESTIMATE], hips)
    ref = _hip_means(samples.references[CALIBRATION_REFERENCE], hips)
    both = sorted(set(est) & set(ref))
    if len(both) < MIN_HIPS:
        return None, None, f"{len(both)} hips with DXA and an estimate; at least {MIN_HIPS} needed"
    x = np.array([est[h] for h in both])
    y = np.array([ref[h] for h in both])
    try:
        line = fit_line(x, y, method, delta)
    except ValueError as exc:
        return None, None, f"the {method} fit failed: {exc}"
    residual = y - line(x)
    warnings = []
    if len(both) < RECOMMENDED_HIPS:
        warnings.append(
            f"fitted on {len(both)} hips; a method comparison needs at least {RECOMMENDED_HIPS} "
            "(CLSI EP09): treat the line as provisional"
        )
    lo, hi = SLOPE_LIMITS
    if not (lo <= line.slope <= hi):
        return (
            None,
            _section(line, both, residual, warnings, method, delta),
            (
                f"the fitted slope {line.slope:.3f} is outside {lo:g}-{hi:g}: no calibration "
                "written (estimate and DXA do not measure the same scale)"
            ),
        )
    model = model or {}
    calibration = SiteCalibration(
        slope=float(line.slope),
        intercept_g_cm2=float(line.intercept),
        method=method,
        n_hips=len(both),
        estimate_range_g_cm2=(float(x.min()), float(x.max())),
        slope_ci95=tuple(_num(v) for v in line.slope_ci),
        intercept_ci95_g_cm2=tuple(_num(v) for v in line.intercept_ci),
        residual_sd_g_cm2=float(np.std(residual, ddof=1)) if len(both) > 2 else None,
        dxa_scale=dataset_dxa_scale(dataset),
        model={k: model.get(k) for k in ("path", "created", "xbmd_version") if k in model},
        dataset=None if dataset is None else str(dataset),
        created_utc=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        xbmd_version=__version__,
        warnings=tuple(warnings),
    )
    section = _section(line, both, residual, warnings, method, delta)
    section["dxa_scale"] = calibration.dxa_scale
    return calibration, section, ""


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _section(line, hips, residual, warnings, method, delta) -> dict:
    return {
        "estimate": CALIBRATED_ESTIMATE,
        "reference": CALIBRATION_REFERENCE,
        "level": "hip",
        "method": method,
        "delta": delta if method == "deming" else None,
        **{k: v for k, v in line.to_dict().items() if k not in ("method", "delta")},
        "n_hips": len(hips),
        "residual_sd_g_cm2": float(np.std(residual, ddof=1)) if len(hips) > 2 else None,
        "warnings": list(warnings),
        "file": None,
    }


def site_calibration_html(section: dict | None, reason: str) -> str:
    """The report's section (already escaped HTML)."""
    title = "<h2>Site calibration (estimate &rarr; site DXA)</h2>"
    if not section:
        return title + f'<p class="na">not available: {html.escape(reason)}</p>'

    def f(v, digits=4) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    ci_b, ci_a = section["slope_ci"], section["intercept_ci"]
    lines = [
        f"DXA = {f(section['intercept'])} + {f(section['slope'])} &times; estimate (g/cm2), "
        f"{html.escape(section['method'])}, {section['n_hips']} hips "
        f"(one point per hip: the mean over its images)",
        f"slope 95 % CI {f(ci_b[0])} to {f(ci_b[1])}; intercept 95 % CI {f(ci_a[0])} to "
        f"{f(ci_a[1])} g/cm2; residual SD {f(section['residual_sd_g_cm2'])} g/cm2",
        f"DXA scale of the data: {html.escape(str(section.get('dxa_scale') or 'unknown'))}",
    ]
    if section.get("file"):
        lines.append(
            f"written to {html.escape(section['file'])}: apply it with "
            "<code>xbmd estimate --site-calibration</code>"
        )
    else:
        lines.append(f'<span class="na">no file written: {html.escape(reason)}</span>')
    lines += [f'<span class="na">{html.escape(w)}</span>' for w in section["warnings"]]
    return title + "".join(f"<p>{line}</p>" for line in lines)
