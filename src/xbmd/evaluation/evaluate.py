"""Validation of a model (or of existing predictions) against references: ``xbmd evaluate``.

Two sources of estimates:

- **a model on a prepared dataset** (``xbmd prepare``'s folder: hip crops at the known or
  registered head, the reference DRRs and the labels). Every sample is predicted from its crop,
  so the figures measure the model, not the localiser (``benchmarks/bench_localiser.py`` measures
  that). This source gives every section: agreement, diagnostic performance, decomposition
  quality, pose reproducibility and robustness.
- **a predictions CSV** (``--predictions``): one row per hip image with ``patient_id``,
  ``est_<name>`` and ``ref_<name>`` columns (the ``predictions.csv`` this command writes has that
  format). Agreement, diagnostic performance and reproducibility only.

Sections (``metrics.json``; ``report.html`` shows them with plots, see ``xbmd.evaluation.report``):

1. agreement of each estimate with each reference it has (``xbmd.evaluation.stats.agreement``),
   per image and per hip (the mean over a patient's images of that hip);
2. diagnostic performance at the WHO thresholds from T-scores of the aBMD estimate and of its
   reference, both against the same young-adult reference (``xbmd.tscore``);
3. decomposition quality of the proximal-femur virtual X-ray against the reference DRR at model
   resolution: PSNR (data range = the reference's maximum), SSIM (scikit-image, Gaussian window
   sigma 1.5, same data range), gradient correlation (mean NCC of the Sobel x and y gradients),
   and the error of BMD_drr (mean of the virtual X-ray in its predicted region) against the
   reference's;
4. reproducibility over each hip's images (poses): RMS-CV, RMS-SD and LSC
   (``xbmd.evaluation.stats``);
5. robustness: the same crops re-estimated after a perturbation of the X-ray (``PERTURBATIONS``),
   reported as the change of the primary estimate against the untouched crop, in %.
"""

from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd import tscore
from xbmd.errors import InputError
from xbmd.evaluation.stats import agreement, confusion_matrix, diagnostic, reproducibility

#: --target choices: the reference column, the unit and a label.
TARGETS = {
    "ct_abmd_g_cm2": ("ct_abmd_g_cm2", "g/cm2", "DXA-like CT aBMD (total hip)"),
    "qct_vbmd_mg_cm3": ("qct_vbmd_mg_cm3", "mg/cm3", "QCT vBMD (proximal femur)"),
    "dxa": ("dxa_total_hip_g_cm2", "g/cm2", "DXA total hip aBMD"),
}
#: Reference columns read from a dataset's index.csv, with their units.
REFERENCE_UNITS = {
    "ct_abmd_g_cm2": "g/cm2",
    "qct_vbmd_mg_cm3": "mg/cm3",
    "bmd_drr_g_cm2": "g/cm2",
    "dxa_total_hip_g_cm2": "g/cm2",
}
#: Which estimate a reference is compared with, in order of preference (model head names, and
#: ``bmd_drr_g_cm2`` for the virtual X-ray's mean). DXA is estimated by a DXA head when the model
#: has one, else by the DXA-like CT aBMD head.
ESTIMATES_FOR = {
    "ct_abmd_g_cm2": ("ct_abmd_g_cm2",),
    "qct_vbmd_mg_cm3": ("qct_vbmd_mg_cm3",),
    "bmd_drr_g_cm2": ("bmd_drr_g_cm2",),
    "dxa_total_hip_g_cm2": ("dxa_total_hip_g_cm2", "ct_abmd_g_cm2"),
}
#: References that are areal BMD of the total hip: they get T-scores and WHO categories.
AREAL_TOTAL_HIP = ("dxa_total_hip_g_cm2", "ct_abmd_g_cm2")
ROBUSTNESS_KINDS = ("pose", "jpeg", "exposure", "gamma", "noise")
#: Perturbations of the X-ray crop and their levels (see ``perturb``).
PERTURBATIONS = {
    "jpeg": (95, 75, 50, 30, 10),  # JPEG quality of an 8-bit rendering of the crop
    "exposure": (10, 20, 40),  # left-to-right exposure gradient, % of the signal (heel effect)
    "gamma": (0.6, 0.8, 1.25, 1.6),  # gamma of the windowed crop
    "noise": (1, 2, 4, 8),  # Gaussian noise SD, % of the crop's intensity window
}
PUBLISHED_RMS_CV_PCT = [3.27, 3.79]  # Gu et al. 2023, multi-pose reproducibility
DXA_TOTAL_HIP_PRECISION_PCT = [1.0, 2.0]  # a good DXA centre (method-notes)
JPEG_TARGET = {"max_mean_abs_change_pct": 1.0, "min_quality": 50}
SETTINGS = {
    "icc": "ICC(2,1) (Shrout & Fleiss): two-way random effects, absolute agreement, single "
    "measurement",
    "pearson_ci": "95 % CI of r from scipy (Fisher z)",
    "bland_altman": "bias = mean(estimate - reference); limits = bias +/- 1.96 SD of the "
    "differences",
    "hip_level": "per hip: the mean of the estimates and of the references over a patient's "
    "images of that hip",
    "psnr": "10 log10(max(reference)^2 / MSE), per image, at model resolution",
    "ssim": "scikit-image structural_similarity, Gaussian window sigma 1.5, sample covariance "
    "off, data range = max(reference)",
    "gradient_correlation": "mean of the normalised cross-correlations of the Sobel x and y "
    "gradients",
    "auc": "ROC area of the estimated T-score (lower = positive) against the reference's WHO "
    "class; Mann-Whitney U / (n_pos n_neg)",
    "reproducibility": "per hip: SD and CV over its images; RMS over hips; LSC = 2.77 x RMS-SD",
    "robustness": "change of the estimate against the untouched crop, % of the untouched value",
}


@dataclass
class Samples:
    """Estimates and references, one entry per hip image.

    rows: the identifying columns (sample_id, patient_id, side, hip, sex, age_years); estimates,
    references: {name: (N,) float, NaN where missing}; units: {name: 'g/cm2' or 'mg/cm3'}.
    """

    rows: list[dict]
    estimates: dict[str, np.ndarray]
    references: dict[str, np.ndarray]
    units: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Perturbations


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


# ------------------------------------------------------------------------------------------------
# Estimates from a model on a prepared dataset


def _image_quality(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(PSNR dB, SSIM, gradient correlation) of a predicted map against the reference."""
    import torch
    from skimage.metrics import structural_similarity

    from xbmd.similarity import paired_gradient_correlation, psnr

    p, t = torch.from_numpy(pred[None]), torch.from_numpy(truth[None])
    peak = max(float(truth.max()), 1e-6)
    ssim = structural_similarity(
        truth, pred, data_range=peak, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    gc = float(paired_gradient_correlation(p, t)[0])
    return float(psnr(p, t)[0]), float(ssim), gc


@dataclass
class ModelRun:
    """What predicting a dataset produced, kept for the report."""

    samples: Samples
    quality: dict[str, np.ndarray]  # psnr_db, ssim, gradient_correlation per row (NaN: none)
    crops: list[tuple[np.ndarray, np.ndarray]]  # (xray, valid) per row, for robustness
    maps: list[dict]  # per row: xray, reference, prediction, region at model resolution
    failures: list[dict]
    bundle: object


def predict_dataset(
    model: str | Path | None,
    dataset: str | Path,
    batch: int = 16,
    progress: Callable | None = None,
) -> ModelRun:
    """Predict every sample of a prepared dataset; a sample that cannot be read is listed."""
    from xbmd.dataset.format import label_values, load_sample, read_index
    from xbmd.model.bundle import load_bundle
    from xbmd.model.inputs import downsample_map

    bundle = load_bundle(model)
    # a model of the `direct` ablation regresses the BMD only: its decoder was never trained
    virtual = bundle.config.get("ablation", "none") != "direct"
    dataset = Path(dataset)
    index = read_index(dataset)
    size = bundle.image_size
    rows, crops, maps, failures = [], [], [], []
    estimates = defaultdict(list)
    quality = defaultdict(list)
    loaded = []
    for r in index:
        try:
            sample = load_sample(dataset / r["file"])
            if sample.xray.shape != (256, 256):
                raise InputError(f"{r['file']}: crop is {sample.xray.shape}, not 256 x 256")
        except InputError as exc:
            failures.append({"sample_id": r["sample_id"], "error": str(exc)})
            continue
        loaded.append((r, sample.arrays))
    if not loaded:
        raise InputError(f"{dataset}: none of the {len(index)} samples could be read")
    steps = range(0, len(loaded), batch)
    for start in progress(steps) if progress else steps:
        chunk = loaded[start : start + batch]
        xray = np.stack([a["xray"] for _, a in chunk])
        valid = np.stack([a["valid"] for _, a in chunk]).astype(bool)
        pred = bundle.predict(xray, valid)
        for i, (r, a) in enumerate(chunk):
            rows.append(
                {
                    "sample_id": r["sample_id"],
                    "patient_id": r["patient_id"],
                    "side": r.get("side", ""),
                    "hip": f"{r['patient_id']}/{r.get('side', '')}",
                    "sex": r.get("sex", ""),
                    "age_years": r.get("age_years", ""),
                }
            )
            crops.append((a["xray"], a["valid"].astype(bool)))
            if virtual:
                estimates["bmd_drr_g_cm2"].append(pred.bmd_drr_g_cm2[i])
            for name, values in pred.targets.items():
                estimates[name].append(values[i])
            truth = a.get("pf_drr_g_cm2")
            entry = {
                "xray": downsample_map(a["xray"], size),
                "prediction": pred.pf_drr_g_cm2[i],
                "region": pred.pf_region[i],
                "reference": None,
            }
            if truth is not None and virtual:
                truth = downsample_map(truth, size)
                entry["reference"] = truth
                for key, v in zip(
                    ("psnr_db", "ssim", "gradient_correlation"),
                    _image_quality(pred.pf_drr_g_cm2[i], truth),
                    strict=True,
                ):
                    quality[key].append(v)
            else:
                for key in ("psnr_db", "ssim", "gradient_correlation"):
                    quality[key].append(math.nan)
            maps.append(entry)
    used = [r for r, _ in loaded]
    references = {c: label_values(used, c) for c in REFERENCE_UNITS if c in index[0]}
    references = {c: v for c, v in references.items() if np.isfinite(v).any()}
    units = {**REFERENCE_UNITS, "bmd_drr_g_cm2": "g/cm2"}
    for name in bundle.targets:
        units.setdefault(name, "mg/cm3" if name.endswith("mg_cm3") else "g/cm2")
    samples = Samples(
        rows, {k: np.asarray(v, float) for k, v in estimates.items()}, references, units
    )
    return ModelRun(
        samples,
        {k: np.asarray(v, float) for k, v in quality.items()},
        crops,
        maps,
        failures,
        bundle,
    )


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------------
# Estimates from a CSV


def read_predictions(path: str | Path) -> Samples:
    """A predictions CSV: ``patient_id``, ``est_<name>`` and ``ref_<name>`` columns per hip image
    (optional ``sample_id``, ``side``, ``sex``). Non-numeric cells count as missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such predictions file")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{path}: no rows")
    columns = set(rows[0])
    est = sorted(c[4:] for c in columns if c.startswith("est_") and not c.endswith("_t"))
    ref = sorted(c[4:] for c in columns if c.startswith("ref_") and not c.endswith("_t"))
    if "patient_id" not in columns or not est or not ref:
        raise InputError(
            f"{path}: a predictions CSV needs patient_id, est_<name> and ref_<name> columns "
            f"(found: {', '.join(sorted(columns))})"
        )
    ids = []
    for i, r in enumerate(rows):
        side = r.get("side", "")
        ids.append(
            {
                "sample_id": r.get("sample_id") or f"row{i + 1}",
                "patient_id": r["patient_id"],
                "side": side,
                "hip": f"{r['patient_id']}/{side}",
                "sex": r.get("sex", ""),
                "age_years": r.get("age_years", ""),
            }
        )
    estimates = {n: np.array([_float(r[f"est_{n}"]) for r in rows]) for n in est}
    references = {n: np.array([_float(r[f"ref_{n}"]) for r in rows]) for n in ref}
    units = {n: ("mg/cm3" if n.endswith("mg_cm3") else "g/cm2") for n in [*est, *ref]}
    return Samples(ids, estimates, references, units)


# ------------------------------------------------------------------------------------------------
# Metrics


def pairs(samples: Samples) -> list[tuple[str, str]]:
    """(estimate, reference) pairs to compare: each reference with its preferred estimate."""
    out = []
    order = list(REFERENCE_UNITS)
    refs = sorted(samples.references, key=lambda r: (order.index(r) if r in order else 99, r))
    for ref in refs:
        for est in ESTIMATES_FOR.get(ref, (ref,)):
            if est in samples.estimates:
                out.append((est, ref))
                break
    return out


def primary_pair(samples: Samples, target: str) -> tuple[str, str]:
    """The (estimate, reference) pair of ``--target``; a clear error if the data lack it."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    ref = TARGETS[target][0]
    if ref not in samples.references:
        raise InputError(
            f"target {target}: the data have no reference values {ref!r} "
            f"(references: {', '.join(samples.references) or 'none'})"
        )
    for est in ESTIMATES_FOR.get(ref, (ref,)):
        if est in samples.estimates:
            return est, ref
    raise InputError(
        f"target {target}: no estimate of {ref} (estimates: {', '.join(samples.estimates)})"
    )


def _hip_means(values: np.ndarray, hips: list[str]) -> tuple[np.ndarray, list[str]]:
    groups = defaultdict(list)
    for v, h in zip(values, hips, strict=True):
        groups[h].append(v)
    keys = sorted(groups)
    return np.array(
        [np.nanmean(groups[k]) if np.isfinite(groups[k]).any() else np.nan for k in keys]
    ), keys


def agreement_rows(samples: Samples) -> list[dict]:
    hips = [r["hip"] for r in samples.rows]
    out = []
    for est, ref in pairs(samples):
        e, r = samples.estimates[est], samples.references[ref]
        for level in ("image", "hip"):
            if level == "hip":
                e, _ = _hip_means(samples.estimates[est], hips)
                r, _ = _hip_means(samples.references[ref], hips)
            if (np.isfinite(e) & np.isfinite(r)).sum() < 3:
                continue
            out.append(
                {
                    "estimate": est,
                    "reference": ref,
                    "unit": samples.units.get(ref, ""),
                    "level": level,
                    **agreement(e, r),
                }
            )
    return out


def t_scores(values: np.ndarray) -> np.ndarray:
    """Total-hip T-scores of aBMD values (g/cm2) against the default young-adult reference."""
    info = tscore.reference_info("total_hip", "F", tscore.DEFAULT_REFERENCE)
    return (np.asarray(values, float) - info["mean_g_cm2"]) / info["sd_g_cm2"]


def _category(t: float) -> str:
    return tscore.who_category(t) if np.isfinite(t) else ""


def diagnostic_section(samples: Samples, primary: tuple[str, str]) -> tuple[dict | None, str]:
    """WHO-threshold detection from the aBMD estimate; (section or None, reason when None)."""
    candidates = [primary] if primary[1] in AREAL_TOTAL_HIP else []
    candidates += [p for p in pairs(samples) if p[1] in AREAL_TOTAL_HIP and p != primary]
    if not candidates:
        return None, "no total-hip areal BMD reference (T-scores need g/cm2 of the total hip)"
    est, ref = candidates[0]
    e_t = t_scores(samples.estimates[est])
    r_t = t_scores(samples.references[ref])
    info = tscore.reference_info("total_hip", "F", tscore.DEFAULT_REFERENCE)
    labels = list(tscore.CATEGORIES)
    return {
        "estimate": est,
        "reference": ref,
        "t_score_reference": (
            f"{info['population']}, total hip {info['mean_g_cm2']} +/- {info['sd_g_cm2']} g/cm2 "
            f"({info['source']})"
        ),
        "tasks": [
            {
                "name": "osteoporosis",
                "definition": "T <= -2.5",
                **diagnostic(e_t, r_t, tscore.OSTEOPOROSIS_T, inclusive=True),
            },
            {
                "name": "low bone mass",
                "definition": "T < -1",
                **diagnostic(e_t, r_t, tscore.OSTEOPENIA_T, inclusive=False),
            },
        ],
        "who": {
            "labels": labels,
            "matrix": confusion_matrix(
                [_category(t) for t in r_t], [_category(t) for t in e_t], labels
            ),
        },
    }, ""


def decomposition_section(run: ModelRun) -> tuple[dict | None, str]:
    q = run.quality
    if run.bundle.config.get("ablation", "none") == "direct":
        return None, "the model (ablation 'direct') has no virtual X-ray"
    if not q or not np.isfinite(q["psnr_db"]).any():
        return None, "the dataset has no reference DRRs"
    s = run.samples

    def summary(v: np.ndarray) -> dict:
        v = v[np.isfinite(v)]
        return {"mean": float(v.mean()), "median": float(np.median(v))}

    section = {
        "n": int(np.isfinite(q["psnr_db"]).sum()),
        "psnr_db": summary(q["psnr_db"]),
        "ssim": summary(q["ssim"]),
        "gradient_correlation": summary(q["gradient_correlation"]),
        "pf_abmd": None,
    }
    if "bmd_drr_g_cm2" in s.references:
        e, r = s.estimates["bmd_drr_g_cm2"], s.references["bmd_drr_g_cm2"]
        ok = np.isfinite(e) & np.isfinite(r)
        diff = e[ok] - r[ok]
        pct = 100 * np.abs(diff) / r[ok]
        section["pf_abmd"] = {
            "bias_g_cm2": float(diff.mean()),
            "mean_abs_error_g_cm2": float(np.abs(diff).mean()),
            "mean_abs_error_pct": float(pct.mean()),
            "median_abs_error_pct": float(np.median(pct)),
        }
    return section, ""


def reproducibility_section(samples: Samples) -> tuple[dict | None, str]:
    hips = [r["hip"] for r in samples.rows]
    if max(np.unique(hips, return_counts=True)[1]) < 2:
        return None, "no hip has more than one image"

    def block(values: dict) -> dict:
        return {
            n: {**reproducibility(v, hips), "unit": samples.units.get(n, "")}
            for n, v in values.items()
        }

    return {
        "estimates": block(samples.estimates),
        "reference_itself": block(samples.references),
        "published_rms_cv_pct": PUBLISHED_RMS_CV_PCT,
        "dxa_total_hip_precision_pct": DXA_TOTAL_HIP_PRECISION_PCT,
    }, ""


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
            pred = run.bundle.predict(xray, valid)
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


def gallery(run: ModelRun, primary: tuple[str, str]) -> list[dict]:
    """Best, median and worst images by |error| of the primary estimate (reference DRR needed)."""
    est, ref = primary
    e, r = run.samples.estimates[est], run.samples.references[ref]
    err = 100 * np.abs(e - r) / r
    ok = [
        i for i in np.argsort(err) if np.isfinite(err[i]) and run.maps[i]["reference"] is not None
    ]
    if not ok:
        return []
    picks = {"best": ok[0], "median": ok[len(ok) // 2], "worst": ok[-1]}
    return [
        {
            "label": label,
            "sample_id": run.samples.rows[i]["sample_id"],
            "xray": run.maps[i]["xray"],
            "reference": run.maps[i]["reference"],
            "prediction": run.maps[i]["prediction"],
            "region": run.maps[i]["region"],
            "abs_error_pct": float(err[i]),
        }
        for label, i in picks.items()
    ]


def table(samples: Samples, primary: tuple[str, str]) -> list[dict]:
    """One row per image: identity, primary pair (and T-scores for aBMD), all estimates/refs."""
    est, ref = primary
    areal = ref in AREAL_TOTAL_HIP
    e_t = t_scores(samples.estimates[est]) if areal else None
    r_t = t_scores(samples.references[ref]) if areal else None
    out = []
    for i, row in enumerate(samples.rows):
        item = {
            **row,
            "estimate": _num(samples.estimates[est][i]),
            "reference": _num(samples.references[ref][i]),
            "estimate_t": _num(e_t[i]) if areal else None,
            "reference_t": _num(r_t[i]) if areal else None,
        }
        item.update({f"est_{n}": _num(v[i]) for n, v in samples.estimates.items()})
        item.update({f"ref_{n}": _num(v[i]) for n, v in samples.references.items()})
        out.append(item)
    return out


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_predictions(rows: list[dict], path: Path) -> Path:
    """``predictions.csv``: the table (readable again with ``--predictions``)."""
    keys = ["sample_id", "patient_id", "side", "sex", "age_years"]
    keys += sorted(k for k in rows[0] if k.startswith(("est_", "ref_")))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return path


def evaluate(
    out: str | Path,
    *,
    model: str | Path | None = None,
    dataset: str | Path | None = None,
    predictions: str | Path | None = None,
    target: str = "ct_abmd_g_cm2",
    robustness: list[str] | None = None,
    batch: int = 16,
    command: str = "",
    progress: Callable | None = None,
    site_fit: str | None = "passing-bablok",
    site_delta: float = 1.0,
) -> dict:
    """Evaluate and write ``out``/{metrics.json, predictions.csv, report.html, figures/}.

    Give ``dataset`` (with ``model``, None = the bundled default) or ``predictions``. Returns
    the metrics. With DXA in the data, ``site_fit`` ('passing-bablok', 'deming' with error
    ratio ``site_delta``, or None) fits the site-calibration line estimate -> DXA and writes it
    to ``out``/site_calibration.json (``xbmd.evaluation.site_fit``).
    """
    import datetime
    import json

    from xbmd import __version__
    from xbmd.evaluation.report import write_report
    from xbmd.evaluation.site_fit import FILE_NAME, fit_site_calibration

    if (dataset is None) == (predictions is None):
        raise InputError("give either a dataset (with a model) or a predictions CSV")
    kinds = list(ROBUSTNESS_KINDS if robustness is None else robustness)
    unknown = sorted(set(kinds) - set(ROBUSTNESS_KINDS))
    if unknown:
        raise InputError(
            f"unknown robustness test(s) {', '.join(unknown)}; choose from "
            f"{', '.join(ROBUSTNESS_KINDS)}"
        )
    out = Path(out)
    t0 = time.perf_counter()
    runtime = {}
    run = None
    failures: list[dict] = []
    if dataset is not None:
        run = predict_dataset(model, dataset, batch=batch, progress=progress)
        samples, failures = run.samples, run.failures
        runtime["predict"] = time.perf_counter() - t0
    else:
        samples = read_predictions(predictions)
    primary = primary_pair(samples, target)
    reasons = {}
    diag, reasons["diagnostic"] = diagnostic_section(samples, primary)
    decomposition, reasons["decomposition"] = (
        decomposition_section(run) if run else (None, "predictions CSV: no virtual X-rays")
    )
    repro, reasons["reproducibility"] = (
        reproducibility_section(samples) if "pose" in kinds else (None, "not requested")
    )
    robust = None
    perturbations = [k for k in kinds if k in PERTURBATIONS]
    if run is None:
        reasons["robustness"] = "predictions CSV: nothing to re-estimate"
    elif not perturbations:
        reasons["robustness"] = "not requested"
    else:
        t1 = time.perf_counter()
        robust = robustness_section(run, primary[0], perturbations, batch, progress=progress)
        runtime["robustness"] = time.perf_counter() - t1
    if site_fit:
        model_info = {}
        if run is not None:
            model_info = {
                "path": str(run.bundle.source),
                "created": run.bundle.created,
                "xbmd_version": run.bundle.xbmd_version,
            }
        calibration, site_section, reasons["site_calibration"] = fit_site_calibration(
            samples, site_fit, site_delta, model_info, dataset
        )
    else:
        calibration, site_section, reasons["site_calibration"] = None, None, "not requested"
    rows = table(samples, primary)
    _, unit, label = TARGETS[target]
    metrics = {
        "xbmd_version": __version__,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "source": {
            "model": None if run is None else run.bundle.source,
            "dataset": None if dataset is None else str(dataset),
            "predictions_csv": None if predictions is None else str(predictions),
        },
        "target": {"estimate": primary[0], "reference": primary[1], "unit": unit, "label": label},
        "counts": {
            "images": len(samples.rows),
            "hips": len({r["hip"] for r in samples.rows}),
            "patients": len({r["patient_id"] for r in samples.rows}),
            "failed": len(failures),
        },
        "settings": SETTINGS,
        "agreement": agreement_rows(samples),
        "diagnostic": diag,
        "decomposition": decomposition,
        "reproducibility": repro,
        "robustness": robust,
        "site_calibration": site_section,
        "not_available": {k: v for k, v in reasons.items() if v},
        "failures": failures,
        "runtime_s": runtime,
    }
    metrics = plain(metrics)
    out.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        calibration.write(out / FILE_NAME)
        metrics["site_calibration"]["file"] = FILE_NAME
    write_predictions(rows, out / "predictions.csv")
    t2 = time.perf_counter()
    write_report(out, metrics, rows, gallery(run, primary) if run else [])
    runtime["report"] = time.perf_counter() - t2
    runtime["total"] = time.perf_counter() - t0
    metrics["runtime_s"] = plain(runtime)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def plain(value):
    """``value`` with NaN/inf as None and numpy scalars and arrays as Python (strict JSON)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
