"""Accuracy, decomposition quality, multi-pose reproducibility and latency of a model bundle.

On a prepared held-out dataset (``xbmd prepare --known-poses`` of a cohort whose seed was never
used in training, several poses per patient), from each sample's hip crop:

- ``bmd_g_cm2`` (stage-3 head) against ``ct_abmd_g_cm2``, the QCT head against
  ``qct_vbmd_mg_cm3``, and ``bmd_drr_g_cm2`` (mean of the virtual X-ray in its predicted region)
  against the label's: Pearson r (95 % CI), ICC(2,1), MAE, bias (``xbmd.stats``);
- the proximal-femur virtual X-ray against the true PF DRR at model resolution: PSNR (data range =
  the true DRR's maximum) and SSIM (scikit-image, Gaussian 7x7 window sigma 1.5, same data range);
- reproducibility: RMS-CV (%) of each hip's estimates over the patient's radiographs (poses);
- latency: model prediction per hip (batch of one, warm, median of 30) on this machine.

Usage::

    python benchmarks/bench_model.py --model RUN/model.pt --dataset HELDOUT_DATASET \
        [--json out.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from xbmd.hip import load_sample
from xbmd.learn.bundle import load_bundle
from xbmd.learn.data import downsample_map, read_index
from xbmd.stats import agreement, reproducibility


def evaluate(model_path: str | None, dataset: Path, batch: int = 16) -> dict:
    bundle = load_bundle(model_path)
    rows = read_index(dataset)
    size = bundle.image_size
    preds = defaultdict(list)
    psnrs, ssims = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        arrays = [load_sample(dataset / r["file"])[0] for r in chunk]
        p = bundle.predict(
            np.stack([a["xray"] for a in arrays]), np.stack([a["valid"] for a in arrays])
        )
        for i, a in enumerate(arrays):
            truth = downsample_map(a["pf_drr_g_cm2"], size)
            pred = p.pf_drr_g_cm2[i]
            peak = float(truth.max())
            mse = float(((pred - truth) ** 2).mean())
            psnrs.append(10 * np.log10(peak**2 / max(mse, 1e-12)))
            ssims.append(
                structural_similarity(
                    truth,
                    pred,
                    data_range=peak,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                )
            )
        preds["bmd_drr_g_cm2"].extend(p.bmd_drr_g_cm2.tolist())
        for t, v in p.targets.items():
            preds[t].extend(v.tolist())
    labels = {
        c: np.array([float(r[c]) for r in rows])
        for c in ("ct_abmd_g_cm2", "qct_vbmd_mg_cm3", "bmd_drr_g_cm2")
    }
    out = {
        "model": str(model_path or "bundled default"),
        "dataset": str(dataset),
        "samples": len(rows),
    }
    out["patients"] = len({r["patient_id"] for r in rows})
    results = {}
    for target in bundle.targets:
        if target in labels:
            results[target] = agreement(preds[target], labels[target])
    results["bmd_drr_g_cm2"] = agreement(preds["bmd_drr_g_cm2"], labels["bmd_drr_g_cm2"])
    out["agreement"] = results
    out["decomposition"] = {
        "psnr_db_mean": float(np.mean(psnrs)),
        "psnr_db_median": float(np.median(psnrs)),
        "ssim_mean": float(np.mean(ssims)),
        "ssim_median": float(np.median(ssims)),
        "bmd_drr_abs_error_pct_median": float(
            np.nanmedian(
                100 * np.abs(np.array(preds["bmd_drr_g_cm2"]) / labels["bmd_drr_g_cm2"] - 1)
            )
        ),
    }
    groups = [f"{r['patient_id']}/{r['side']}" for r in rows]
    out["reproducibility"] = {
        name: reproducibility(preds[name], groups) for name in [*bundle.targets, "bmd_drr_g_cm2"]
    }
    # the same for the references themselves (they too vary a little with pose: bmd_drr does)
    out["reproducibility_of_labels"] = {
        name: reproducibility(labels[name], groups) for name in ("ct_abmd_g_cm2", "bmd_drr_g_cm2")
    }
    # latency: one hip at a time, model loaded
    a, _ = load_sample(dataset / rows[0]["file"])
    for _ in range(3):
        bundle.predict(a["xray"], a["valid"])
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        bundle.predict(a["xray"], a["valid"])
        times.append(time.perf_counter() - t0)
    out["latency_predict_s"] = {
        "median": float(np.median(times)),
        "p90": float(np.percentile(times, 90)),
    }
    out["per_sample"] = [
        {
            "sample_id": r["sample_id"],
            **{
                k: (None if not np.isfinite(v[i]) else round(float(v[i]), 5))
                for k, v in preds.items()
            },
            **{f"true_{k}": float(v[i]) for k, v in labels.items()},
        }
        for i, r in enumerate(rows)
    ]
    return out


def _print(out: dict) -> None:
    head = f"model {out['model']}  dataset {out['dataset']}"
    print(f"{head}: {out['samples']} hips, {out['patients']} patients")
    cols = ("n", 5), ("r", 8), ("95% CI", 17), ("ICC(2,1)", 10), ("MAE", 10), ("MAE %", 8)
    print(
        f"{'estimate vs reference':<34}" + "".join(f"{c:>{w}}" for c, w in cols) + f"{'bias':>10}"
    )
    for name, a in out["agreement"].items():
        ci = f"{a['pearson_ci95'][0]:.3f}-{a['pearson_ci95'][1]:.3f}"
        print(
            f"{name:<34}{a['n']:>5}{a['pearson_r']:>8.3f}{ci:>17}{a['icc_a1']:>10.3f}"
            f"{a['mae']:>10.4f}{a['mae_pct']:>8.2f}{a['bias']:>10.4f}"
        )
    d = out["decomposition"]
    print(
        f"PF virtual X-ray: PSNR mean {d['psnr_db_mean']:.2f} dB "
        f"(median {d['psnr_db_median']:.2f}), "
        f"SSIM mean {d['ssim_mean']:.3f} (median {d['ssim_median']:.3f}), "
        f"BMD_drr |error| median {d['bmd_drr_abs_error_pct_median']:.2f} %"
    )
    for name, r in out["reproducibility"].items():
        print(
            f"multi-pose RMS-CV {name}: {r['rms_cv_pct']:.2f} % over {r['groups']} hips "
            f"(LSC {r['lsc']:.4f})"
        )
    for name, r in out["reproducibility_of_labels"].items():
        print(
            f"  (the reference {name} itself varies by {r['rms_cv_pct']:.2f} % RMS-CV over poses)"
        )
    lat = out["latency_predict_s"]
    print(
        f"model latency per hip (warm, {torch.get_num_threads()} threads): "
        f"median {lat['median'] * 1000:.1f} ms, p90 {lat['p90'] * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled one)")
    parser.add_argument("--dataset", type=Path, required=True, help="prepared held-out dataset")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = evaluate(args.model, args.dataset)
    _print(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
