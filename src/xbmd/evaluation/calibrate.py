"""``xbmd calibrate-model``: give a model its 95 % interval and its out-of-distribution score.

The model is run as a user runs it (``xbmd estimate`` on the calibration dataset's whole
radiographs, localiser included) with test-time augmentation; each hip's estimate, its spread
over the views and its features are paired with the hip's reference (``ct_abmd_g_cm2``, or the
target asked for). ``xbmd.model.uncertainty`` fits the interval (normalised split conformal) and
the feature model, and a copy of the bundle is written with them (``uncertainty``), recording
the dataset, the counts and the date.

The calibration dataset must be held out: patients used neither in training nor in the
evaluation that reports the interval's coverage. Hips with an implant are left out (their
references mean nothing).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xbmd import __version__
from xbmd.dataset.format import has_implant, number, read_index
from xbmd.errors import InputError, XbmdError
from xbmd.estimation.estimator import BMD_TARGET, Estimator
from xbmd.evaluation.end_to_end import find_originals
from xbmd.model.uncertainty import FeatureModel, Interval, uncertainty_state


def calibrate_model(
    model: str | Path | None,
    dataset: str | Path,
    out: str | Path,
    target: str = BMD_TARGET,
    progress: Callable | None = None,
    min_hips: int = 20,
) -> dict:
    """Calibrate ``model``'s interval and feature score on ``dataset``; write the bundle to
    ``out``. Returns the summary (counts, the interval's q, the score threshold, failures)."""
    import torch

    estimator = Estimator(model, tta=True)
    bundle = estimator.bundle
    rows = read_index(dataset)
    originals = find_originals(dataset, rows)
    if originals.root is None or not originals.paths:
        raise InputError(f"{dataset}: {originals.reason}; calibration runs on the radiographs")
    by_xray: dict[str, dict] = {}
    for row in rows:
        by_xray.setdefault(row["xray"], {})[row["side"]] = row
    failures = [{"image": name, "error": "not found"} for name in originals.missing]
    estimates, spreads, features, references = [], [], [], []
    items = list(originals.paths.items())
    for name, path in progress(items) if progress else items:
        try:
            results = estimator.estimate(path)
        except XbmdError as exc:
            failures.append({"image": str(path), "error": str(exc)})
            continue
        for r in results:
            row = by_xray[name].get(r.side)
            if row is None or has_implant(row) or not np.isfinite(number(row.get(target))):
                continue
            estimates.append(r.targets[BMD_TARGET])
            spreads.append(r.tta_sd_g_cm2)
            features.append(r.features)
            references.append(number(row[target]))
    if len(estimates) < min_hips:
        raise InputError(
            f"{dataset}: only {len(estimates)} hips estimated with a reference "
            f"({len(failures)} radiographs failed); calibration needs at least {min_hips}"
        )
    interval = Interval.fit(BMD_TARGET, estimates, references, spreads, min_n=min_hips)
    feature_model = FeatureModel.fit(np.stack(features))
    provenance = {
        "dataset": str(Path(dataset)),
        "reference": target,
        "hips": len(estimates),
        "radiographs_failed": len(failures),
        "calibrated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "xbmd_version": __version__,
        "mean_abs_error_g_cm2": float(np.mean(np.abs(np.subtract(estimates, references)))),
    }
    state = torch.load(bundle.source, map_location="cpu", weights_only=True)
    state["uncertainty"] = uncertainty_state(interval, feature_model, provenance)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    torch.save(state, tmp)
    tmp.replace(out)
    return {
        **provenance,
        "q": interval.q,
        "sd_floor_g_cm2": interval.sd_floor,
        "offset_g_cm2": interval.offset,
        "ood_threshold": feature_model.threshold,
        "failures": failures,
        "model": str(out),
    }
