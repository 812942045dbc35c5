"""The model on the true crops of a prepared dataset: every sample is predicted from its crop at
the known or registered head, so the figures measure the model and leave out the localiser
(``xbmd.evaluation.end_to_end`` runs the whole estimator). Also the decomposition quality of the
virtual X-ray against the reference DRR and the report's gallery."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.evaluation.samples import REFERENCE_UNITS, Samples, sample_row


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
    implant_samples: int = 0  # hips with an implant, left out (their labels mean nothing)
    kvp_kv: np.ndarray | None = None  # per row, NaN: unknown (a model with the kVp input uses it)


def predict_dataset(
    model,
    dataset: str | Path,
    batch: int = 16,
    progress: Callable | None = None,
) -> ModelRun:
    """Predict every sample of a prepared dataset from its crop; a sample that cannot be read is
    listed. Hips with an implant are left out (``xbmd.dataset.format.has_implant``).

    ``model``: a bundle path, a loaded ``ModelBundle`` or None (the bundled default).
    """
    from xbmd.dataset.format import has_implant, label_values, load_sample, read_index
    from xbmd.model.bundle import ModelBundle, load_bundle
    from xbmd.model.inputs import downsample_map

    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    # a model of the `direct` ablation regresses the BMD only: its decoder was never trained
    virtual = bundle.config.get("ablation", "none") != "direct"
    dataset = Path(dataset)
    everything = read_index(dataset)
    index = [r for r in everything if not has_implant(r)]
    if not index:
        raise InputError(f"{dataset}: every sample is of a hip with an implant: nothing to compare")
    size = bundle.image_size
    rows, crops, maps, failures, kvp_kv = [], [], [], [], []
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
        kvp = label_values([r for r, _ in chunk], "kvp")
        kvp_kv.extend(kvp.tolist())
        pred = bundle.predict(xray, valid, kvp=kvp)
        for i, (r, a) in enumerate(chunk):
            rows.append(sample_row(r))
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
        len(everything) - len(index),
        np.asarray(kvp_kv, dtype=float),
    )


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
