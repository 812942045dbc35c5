"""Automatic femur landmarks against the virtual cohort's true ones.

For every femur of a virtual cohort (``xbmd synth``), the landmarks found from its label
(``xbmd.ct.auto_landmarks``) are compared with the exact landmarks the generator built it from:
the error in mm per landmark, in degrees per axis, and the DXA-like total-hip aBMD
(``ct_abmd_g_cm2``, ``xbmd.ct.femur``) measured with each set on the same CT, calibrated with the
scan's true line (so only the landmarks differ).

Usage::

    xbmd synth --out bench_out/cohort_a --cases 26 --seed 1701 --poses 1 --workers 1
    python benchmarks/bench_landmarks.py bench_out/cohort_a [--qc bench_out/landmark_qc]

Prints a markdown table (docs/benchmarks.md, "Automatic femur landmarks").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from xbmd.ct.auto_landmarks import fit_femur_landmarks, write_qc_png
from xbmd.ct.calibration import Calibration
from xbmd.ct.femur import measure_femur
from xbmd.ct.landmarks import read_landmarks
from xbmd.io.ct import read_ct, read_labels

POINTS = (
    "head_center_mm",
    "head_neck_junction_mm",
    "neck_center_mm",
    "greater_trochanter_mm",
    "lesser_trochanter_mm",
)
AXES = ("neck_axis", "shaft_axis")
FEMUR_LABEL = {"left": 4, "right": 3}


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path, help="a virtual cohort folder (xbmd synth --out)")
    parser.add_argument("--qc", type=Path, default=None, help="write a QC PNG per femur here")
    parser.add_argument("--max-cases", type=int, default=0, help="use the first N cases only")
    args = parser.parse_args()
    cases = sorted(p for p in (args.cohort / "cases").iterdir() if (p / "truth.json").exists())
    if args.max_cases:
        cases = cases[: args.max_cases]
    rows, seconds, failures = [], [], []
    for case in cases:
        truth = json.loads((case / "truth.json").read_text())
        ct = read_ct(case / "ct.nii.gz")
        labels = read_labels(case / "labels.nii.gz", reference=ct)
        line = truth["ct"]["true_calibration"]
        density = Calibration.given(line["slope_mg_cm3_per_hu"], line["intercept_mg_cm3"]).apply(ct)
        true = read_landmarks(case / "landmarks.json")
        for side, label in FEMUR_LABEL.items():
            t0 = time.perf_counter()
            try:
                fit = fit_femur_landmarks(labels, label, side)
            except Exception as exc:  # a benchmark reports every failure and goes on
                failures.append(f"{case.name} {side}: {exc}")
                continue
            seconds.append(time.perf_counter() - t0)
            auto, ref = fit.landmarks, true[side]
            if args.qc:
                write_qc_png(fit, labels, args.qc / f"{case.name}_{side}.png")
            row = {p: float(np.linalg.norm(getattr(auto, p) - getattr(ref, p))) for p in POINTS}
            row |= {a: _angle_deg(getattr(auto, a), getattr(ref, a)) for a in AXES}
            row["head_radius_mm"] = abs(auto.head_radius_mm - ref.head_radius_mm)
            row["lt_height_mm"] = float(
                (auto.lesser_trochanter_mm - ref.lesser_trochanter_mm) @ ref.shaft_axis
            )
            bmd_true = measure_femur(density, labels, label, ref)
            bmd_auto = measure_femur(density, labels, label, auto)
            for name in ("ct_abmd_g_cm2", "neck_abmd_g_cm2", "qct_vbmd_mg_cm3"):
                a, b = getattr(bmd_auto, name), getattr(bmd_true, name)
                row[name] = 100.0 * (a - b) / b
            row["case"] = f"{case.name} {side}"
            rows.append(row)
            print(
                f"{case.name} {side}: LT {row['lesser_trochanter_mm']:.2f} mm, ct_abmd "
                f"{row['ct_abmd_g_cm2']:+.3f} %, {seconds[-1]:.1f} s",
                flush=True,
            )
    n = len(rows)
    print(f"\n{n} femurs of {len(cases)} cases ({args.cohort}); failures: {len(failures)}")
    for f in failures:
        print("  FAILED", f)
    print("\n| landmark | median error | max error |\n|---|---|---|")
    for p in POINTS:
        v = np.array([r[p] for r in rows])
        print(
            f"| {p.removesuffix('_mm').replace('_', ' ')} | {np.median(v):.2f} mm | "
            f"{v.max():.2f} mm |"
        )
    for a in AXES:
        v = np.array([r[a] for r in rows])
        print(f"| {a.replace('_', ' ')} (angle) | {np.median(v):.2f} deg | {v.max():.2f} deg |")
    v = np.array([r["head_radius_mm"] for r in rows])
    print(f"| head radius | {np.median(v):.2f} mm | {v.max():.2f} mm |")
    v = np.abs([r["lt_height_mm"] for r in rows])
    print(
        f"| lesser trochanter height along the shaft | {np.median(v):.2f} mm | {v.max():.2f} mm |"
    )
    print(
        "\n| measure (automatic vs true landmarks) | median abs. difference | max abs. "
        "difference | mean signed |\n|---|---|---|---|"
    )
    for name in ("ct_abmd_g_cm2", "neck_abmd_g_cm2", "qct_vbmd_mg_cm3"):
        v = np.array([r[name] for r in rows])
        print(
            f"| `{name}` | {np.median(np.abs(v)):.3f} % | {np.abs(v).max():.3f} % | "
            f"{v.mean():+.3f} % |"
        )
    worst = max(rows, key=lambda r: abs(r["ct_abmd_g_cm2"]))
    print(f"\nworst ct_abmd: {worst['case']} ({worst['ct_abmd_g_cm2']:+.3f} %)")
    print(
        f"time per femur: median {np.median(seconds):.1f} s, max {max(seconds):.1f} s "
        "(shared machine)"
    )


if __name__ == "__main__":
    main()
