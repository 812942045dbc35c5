"""Robustness of the model to perturbations of the hip crop (``xbmd evaluate --robustness``):
every true crop re-estimated after JPEG, an exposure gradient, gamma or noise, as the change of
the estimate against the untouched crop. ``xbmd.evaluation.whole_file`` perturbs the delivered
radiograph file instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from xbmd.errors import InputError

if TYPE_CHECKING:
    from xbmd.evaluation.crops import ModelRun

#: Perturbations of the X-ray crop and their levels (see ``perturb``).
PERTURBATIONS = {
    "jpeg": (95, 75, 50, 30, 10),  # JPEG quality of an 8-bit rendering of the crop
    "exposure": (10, 20, 40),  # left-to-right exposure gradient, % of the signal (heel effect)
    "gamma": (0.6, 0.8, 1.25, 1.6),  # gamma of the windowed crop
    "noise": (1, 2, 4, 8),  # Gaussian noise SD, % of the crop's intensity window
}
#: The crop JPEG target: mean |change| at most this down to this quality.
JPEG_TARGET = {"max_mean_abs_change_pct": 1.0, "min_quality": 50}


def _window(xray: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    values = xray[valid] if valid.any() else xray.ravel()
    lo, hi = float(values.min()), float(values.max())
    return lo, (hi if hi > lo else lo + 1.0)


def perturb(
    xray: np.ndarray, valid: np.ndarray, kind: str, level: float, rng: np.random.Generator
) -> np.ndarray:
    """One hip crop (256, 256) after a perturbation; pixels outside ``valid`` are left alone.

    jpeg: the crop windowed to its valid range, quantised to 8 bits and JPEG-compressed at
    quality ``level`` (the 8-bit step is part of the change measured); exposure: multiplied by a
    left-to-right ramp from 1 - level/200 to 1 + level/200 (a uniform change of exposure is
    removed by the model's per-image normalisation); gamma: the windowed crop raised to ``level``;
    noise: Gaussian noise of SD ``level`` % of the window.
    """
    from xbmd.display import jpeg_round_trip

    lo, hi = _window(xray, valid)
    unit = (xray - lo) / (hi - lo)
    if kind == "jpeg":
        out = jpeg_round_trip(unit, int(level))
    elif kind == "exposure":
        ramp = np.linspace(-0.5, 0.5, xray.shape[1], dtype=np.float32)[None, :]
        out = unit * (1.0 + level / 100.0 * ramp)
    elif kind == "gamma":
        out = np.clip(unit, 0, 1) ** level
    elif kind == "noise":
        out = unit + rng.normal(0, level / 100.0, unit.shape)
    else:
        raise InputError(f"unknown perturbation {kind!r}")
    return np.where(valid, out * (hi - lo) + lo, xray).astype(np.float32)


def robustness_section(
    run: ModelRun,
    estimate: str,
    kinds: list[str],
    batch: int = 16,
    seed: int = 0,
    progress: Callable | None = None,
) -> dict:
    """Re-estimate every crop under each perturbation; change of ``estimate`` in %."""
    base = run.samples.estimates[estimate]
    rng = np.random.default_rng(seed)
    rows = []
    todo = [(k, lvl) for k in kinds if k in PERTURBATIONS for lvl in PERTURBATIONS[k]]
    for kind, level in progress(todo) if progress else todo:
        changed = []
        for start in range(0, len(run.crops), batch):
            chunk = run.crops[start : start + batch]
            xray = np.stack([perturb(x, v, kind, level, rng) for x, v in chunk])
            valid = np.stack([v for _, v in chunk])
            kvp = None if run.kvp_kv is None else run.kvp_kv[start : start + batch]
            pred = run.bundle.predict(xray, valid, kvp=kvp)
            values = pred.bmd_drr_g_cm2 if estimate == "bmd_drr_g_cm2" else pred.targets[estimate]
            changed.extend(values.tolist())
        change = 100 * (np.asarray(changed) - base) / base
        change = change[np.isfinite(change)]
        label = {
            "jpeg": f"JPEG quality {level}",
            "exposure": f"exposure gradient {level} %",
            "gamma": f"gamma {level}",
            "noise": f"noise SD {level} %",
        }[kind]
        rows.append(
            {
                "kind": kind,
                "level": level,
                "label": label,
                "n": int(change.size),
                "mean_abs_change_pct": float(np.abs(change).mean()),
                "p95_abs_change_pct": float(np.percentile(np.abs(change), 95)),
                "mean_change_pct": float(change.mean()),
            }
        )
    jpeg = [r for r in rows if r["kind"] == "jpeg" and r["level"] >= JPEG_TARGET["min_quality"]]
    met = (
        all(r["mean_abs_change_pct"] <= JPEG_TARGET["max_mean_abs_change_pct"] for r in jpeg)
        if jpeg
        else None
    )
    return {"estimate": estimate, "rows": rows, "jpeg_target": {**JPEG_TARGET, "met": met}}
