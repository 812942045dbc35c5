"""The training levers of stage 3, one at a time, on the same data and the same stages 1-2.

A run trained with every lever (``configs/levers.yaml``: processing augmentation in every stage,
the kVp input and hip-group consistency in stage 3) gives its stages 1 and 2 and its localiser to
variants that change stage 3 only: without the consistency loss, and without it and the kVp
input (processing augmentation alone); each lever's effect is the difference between
neighbouring rows. Each variant's stage 3 is trained
(``xbmd train --stages 3`` in a copy of the run), then every model (the variants, the full run and
a run of ``configs/default.yaml`` on the same data, trained separately) is evaluated end to end
with ``xbmd evaluate`` on a development dataset (never the validation cohort: the choice of
recipe is made here) and on a dataset of device families held out of training. It prints one
row per model: r, MAE, same-session and cross-device RMS-CV on the development set, the mean
signed error on the held-out families, and stage 3's training time.

Usage::

    python benchmarks/bench_levers.py --train bench_out/m16_train_ds \\
        --levers-run bench_out/run_m16 --base-run bench_out/run_m16_base \\
        --dev bench_out/m16_cal_ds --heldout bench_out/m16_heldout_fam_ds --out bench_out/levers
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: Stage-3 variants: name -> changes to the full run's config.
VARIANTS = {
    "levers, no consistency": {"stages.3.hip_group": 1, "stages.3.consistency": 0.0,
                               "stages.3.consistency_drr": 0.0},
    "processing augmentation only": {"regression.kvp": False, "stages.3.hip_group": 1,
                                     "stages.3.consistency": 0.0, "stages.3.consistency_drr": 0.0},
}  # fmt: skip
XBMD = [sys.executable, "-m", "xbmd.cli"]


def changed(config: dict, changes: dict) -> dict:
    out = copy.deepcopy(config)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        node[key] = value
    return out


def variant_run(levers_run: Path, folder: Path, config: dict, train: Path) -> float:
    """Stage 3 of a variant in ``folder`` from the full run's stages 1-2; seconds."""
    if not (folder / "model.pt").is_file():
        (folder / "stage1").mkdir(parents=True, exist_ok=True)
        (folder / "stage2").mkdir(parents=True, exist_ok=True)
        for part in ("stage1/final.pt", "stage2/final.pt", "split.json", "localiser.pt"):
            shutil.copy2(levers_run / part, folder / part)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.perf_counter()
        subprocess.run(
            [*XBMD, "train", str(train), "--out", str(folder), "--config",
             str(folder / "config.yaml"), "--stages", "3", "--no-progress"],
            check=True,
        )  # fmt: skip
        return time.perf_counter() - t0
    return json.loads((folder / "train.json").read_text())["stages"]["3"].get("seconds", 0.0)


def evaluate(model: Path, dataset: Path, out: Path) -> dict:
    if not (out / "metrics.json").is_file():
        subprocess.run(
            [*XBMD, "evaluate", "--dataset", str(dataset), "--model", str(model), "--out",
             str(out), "--file-robustness", "none", "--robustness", "pose", "--site-fit",
             "none", "--no-progress"],
            check=True,
        )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def signed_error_pct(folder: Path) -> float | None:
    """Mean signed % error of the end-to-end BMD against the CT aBMD (hips without implant)."""
    with (folder / "predictions_end_to_end.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if not r["implant"]]
    errors = [
        100
        * (float(r["est_ct_abmd_g_cm2"]) - float(r["ref_ct_abmd_g_cm2"]))
        / float(r["ref_ct_abmd_g_cm2"])
        for r in rows
        if r["est_ct_abmd_g_cm2"] and r["ref_ct_abmd_g_cm2"]
    ]
    return sum(errors) / len(errors) if errors else None


def figures(dev: dict, heldout: dict, heldout_folder: Path) -> dict:
    def e2e_image(metrics):
        rows = metrics["headline"]["rows"]
        return next(r for r in rows if r["mode"] == "end_to_end" and r["level"] == "image")

    d, h = e2e_image(dev), e2e_image(heldout)
    sessions = dev["sessions"]["modes"]["end_to_end"]
    return {
        "r": d.get("pearson_r"),
        "mae_pct": d.get("mae_pct"),
        "same_session_rms_cv_pct": sessions["same_session"]["rms_cv_pct"],
        "cross_device_rms_cv_pct": sessions["cross_device"]["rms_cv_pct"],
        "heldout_r": h.get("pearson_r"),
        "heldout_bias_pct": signed_error_pct(heldout_folder),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--levers-run", type=Path, required=True)
    ap.add_argument("--base-run", type=Path, default=None)
    ap.add_argument("--dev", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench_out/levers"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    full = yaml.safe_load((args.levers_run / "config.yaml").read_text())
    runs = {}
    if args.base_run:
        runs["default recipe (no lever)"] = (args.base_run, None)
    runs["all levers"] = (args.levers_run, None)
    for name, changes in VARIANTS.items():
        folder = args.out / name.replace(",", "").replace(" ", "_")
        seconds = variant_run(args.levers_run, folder, changed(full, changes), args.train)
        runs[name] = (folder, seconds)
    table = {}
    for name, (run, seconds) in runs.items():
        if seconds is None:
            seconds = json.loads((run / "train.json").read_text())["stages"]["3"].get("seconds")
        tag = run.name
        dev = evaluate(run / "model.pt", args.dev, args.out / f"eval_{tag}_dev")
        held = evaluate(run / "model.pt", args.heldout, args.out / f"eval_{tag}_heldout")
        folder = args.out / f"eval_{tag}_heldout"
        table[name] = {**figures(dev, held, folder), "stage3_seconds": seconds, "run": str(run)}
    (args.out / "levers.json").write_text(json.dumps(table, indent=1))
    print("| model | r | MAE % | same-session RMS-CV % | cross-device RMS-CV % | held-out "
          "families r | bias % | stage 3 s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, f in table.items():
        cells = [f["r"], f["mae_pct"], f["same_session_rms_cv_pct"], f["cross_device_rms_cv_pct"],
                 f["heldout_r"], f["heldout_bias_pct"], f["stage3_seconds"]]  # fmt: skip
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
