"""Automatic phantom rod detection on the virtual cohort's CTs.

For every CT of a virtual cohort (``xbmd synth``), the bundled B-MAS200 phantom's rods are
searched for without a label (``xbmd.ct.rods.find_rods``) and, when found, fitted
(``phantom_calibration``). Reported: the found rate on CTs with a phantom, false detections on
CTs without one, and per rod the error of the fitted line at the rod's nominal density against
the scan's true line (``truth.json``), next to the same figure for the hand-labelled rods
(the cohort's rod labels 101-105) and the fit's residual per rod.

Usage::

    python benchmarks/bench_rods.py bench_out/cohort_a [--qc bench_out/rods_qc]

Prints markdown tables (docs/benchmarks.md, "Automatic phantom rods").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from xbmd.ct.calibration import Phantom, Rod, load_phantom, phantom_calibration
from xbmd.ct.rods import find_rods, write_rods_qc_png
from xbmd.errors import CalibrationError
from xbmd.io.ct import read_ct, read_labels

#: The cohort's own rod labels (xbmd.synth.scanner.ROD_DENSITIES_MG_CM3).
LABELLED = Phantom(
    "cohort rods", tuple(Rod(101 + n, d) for n, d in enumerate((0.0, 50.0, 100.0, 150.0, 200.0)))
)


def _line_errors(cal, truth_line: dict, densities) -> np.ndarray:
    """Fitted minus nominal density (mg/cm3) at HU = the true line's HU of each density."""
    slope, intercept = truth_line["slope_mg_cm3_per_hu"], truth_line["intercept_mg_cm3"]
    hu = (np.asarray(densities) - intercept) / slope
    return cal.density_mg_cm3(hu) - np.asarray(densities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohorts", type=Path, nargs="+", help="virtual cohort folders")
    parser.add_argument("--qc", type=Path, default=None, help="write a QC PNG per found phantom")
    args = parser.parse_args()
    phantom = load_phantom("bmas200")
    densities = [rod.density_mg_cm3 for rod in phantom.rods]
    auto_err, label_err, resid, seconds = [], [], [], []
    found = missed = false = clean = 0
    scanners = set()
    for cohort in args.cohorts:
        for case in sorted((cohort / "cases").iterdir()):
            if not (case / "truth.json").exists():
                continue
            truth = json.loads((case / "truth.json").read_text())
            has = truth["ct"]["has_phantom"]
            scanners.add(truth["ct"]["scanner"]["name"])
            ct = read_ct(case / "ct.nii.gz")
            t0 = time.perf_counter()
            try:
                det = find_rods(ct, phantom)
                cal = phantom_calibration(ct, det.labels, phantom)
            except CalibrationError as exc:
                seconds.append(time.perf_counter() - t0)
                if has:
                    missed += 1
                    print(f"{case.name}: MISSED ({exc})")
                else:
                    clean += 1
                    print(f"{case.name}: no phantom, none found ({seconds[-1]:.1f} s)")
                continue
            seconds.append(time.perf_counter() - t0)
            if not has:
                false += 1
                print(f"{case.name}: FALSE DETECTION r = {cal.r:.4f}")
                continue
            found += 1
            line = truth["ct"]["true_calibration"]
            auto_err.append(_line_errors(cal, line, densities))
            resid.append([p.residual_mg_cm3 for p in cal.points])
            labels = read_labels(case / "labels.nii.gz", reference=ct)
            manual = phantom_calibration(ct, labels, LABELLED)
            label_err.append(_line_errors(manual, line, densities))
            if args.qc:
                write_rods_qc_png(det, ct, args.qc / f"{case.name}_rods.png", cal)
            worst = np.abs(auto_err[-1]).max()
            print(
                f"{case.name}: found, r = {cal.r:.5f}, worst rod {worst:.2f} mg/cm3, "
                f"{truth['ct']['scanner']['name']}, {seconds[-1]:.1f} s",
                flush=True,
            )
    with_phantom, without = found + missed, false + clean
    print(
        f"\nCTs with a phantom: {with_phantom}, found {found} ({100 * found / with_phantom:.0f} %)"
    )
    print(f"CTs without a phantom: {without}, false detections {false}")
    print(f"scanners: {len(scanners)} ({', '.join(sorted(scanners))})")
    auto, manual, res = np.array(auto_err), np.array(label_err), np.array(resid)
    print(
        "\n| rod (nominal mg/cm3) | automatic: median abs. error | max abs. error | "
        "hand-labelled rods: median | max | fit residual (automatic): max abs. |"
    )
    print("|---|---|---|---|---|---|")
    for i, d in enumerate(densities):
        print(
            f"| {d:g} | {np.median(np.abs(auto[:, i])):.2f} | {np.abs(auto[:, i]).max():.2f} | "
            f"{np.median(np.abs(manual[:, i])):.2f} | {np.abs(manual[:, i]).max():.2f} | "
            f"{np.abs(res[:, i]).max():.2f} |"
        )
    diff = np.abs(auto - manual)
    print(f"\nautomatic vs hand-labelled line at the rods: max {diff.max():.3f} mg/cm3")
    print(
        f"time per CT: median {np.median(seconds):.1f} s, max {max(seconds):.1f} s (shared machine)"
    )


if __name__ == "__main__":
    main()
