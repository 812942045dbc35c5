"""Virtual cohort: speed, ground-truth self-consistency, calibration recovery, and its figures.

Generates a cohort with ``xbmd synth``'s library function, then, reading only the written files:

- seconds per case (CT + radiographs) on one worker, and cohort throughput with ``--workers``;
- self-consistency: ``ct_abmd_g_cm2`` recomputed from the written CT, labels and phantom through
  the project's own calibration (phantom fit; phantom-less for cases without phantom) and
  renderer, against ``truth.json`` (target: within 0.5 % with the phantom);
- calibration recovery: fitted density of every phantom rod against its nominal value
  (target: within 2 mg/cm3), and the fitted line against the scanner's true HU scale;
- figures: the contact sheet (``docs/images/synth_contact_sheet.png``) and the BMD regions
  (``docs/images/bmd_regions.png``);
- with ``--variants``, instead: two small cohorts of the options (three patients with
  ``--implant-fraction 1``; one patient with ``--sessions 4 --poses 1 --processing random``),
  their seconds per case, and their figure ``docs/images/synth_variants.png``.

The population table is ``benchmarks/bench_population.py --cohort DIR``.

Usage::

    python benchmarks/bench_synth.py --cases 12 --workers 2 --out bench_out/synth
    python benchmarks/bench_synth.py --variants --workers 2 --out bench_out/synth_variants
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from xbmd.ct.calibration import load_phantom, phantom_calibration, phantomless_calibration
from xbmd.ct.femur import measure_femur, neutral_projection
from xbmd.ct.landmarks import read_landmarks
from xbmd.io.ct import read_ct, read_labels
from xbmd.synth.cohort import FEMUR_LABEL, SynthSettings, generate_cohort
from xbmd.synth.contact_sheet import write_contact_sheet, write_variants_sheet
from xbmd.synth.model import DRAW_SIDES

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def recompute(case_dir: Path, truth: dict) -> dict:
    """Recompute the truth from the written files with the project's own calibration."""
    ct = read_ct(case_dir / truth["ct"]["file"])
    labels = read_labels(case_dir / truth["ct"]["labels"], ct)
    landmarks = read_landmarks(case_dir / truth["landmarks"])
    if truth["ct"]["has_phantom"]:
        cal = phantom_calibration(ct, labels, load_phantom(case_dir / "phantom.json"))
    else:
        cal = phantomless_calibration(ct, kvp=truth["ct"]["scanner"]["kvp"])
    density = cal.apply(ct)
    # residuals: rods (phantom) or reference tissues (phantom-less)
    out = {"method": cal.method, "rod_residuals_mg_cm3": list(cal.residuals_mg_cm3.values())}
    true_slope = truth["ct"]["true_calibration"]["slope_mg_cm3_per_hu"]
    out["slope_error_percent"] = 100 * (cal.slope_mg_cm3_per_hu / true_slope - 1)
    for side in DRAW_SIDES:
        bmd = measure_femur(density, labels, FEMUR_LABEL[side], landmarks[side])
        ref = truth["sides"][side]
        out[side] = {
            "ct_abmd": 100 * (bmd.ct_abmd_g_cm2 / ref["ct_abmd_g_cm2"] - 1),
            "neck_abmd": 100 * (bmd.neck_abmd_g_cm2 / ref["neck_abmd_g_cm2"] - 1),
            "qct_vbmd": 100 * (bmd.qct_vbmd_mg_cm3 / ref["qct_vbmd_mg_cm3"] - 1),
        }
    return out


def regions_figure(case_dir: Path, truth: dict, path: Path) -> None:
    """The neutral-pose projection of one femur with its total-hip region and neck box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xbmd.ct.calibration import Calibration

    ct = read_ct(case_dir / truth["ct"]["file"])
    labels = read_labels(case_dir / truth["ct"]["labels"], ct)
    line = truth["ct"]["true_calibration"]
    density = Calibration.given(line["slope_mg_cm3_per_hu"], line["intercept_mg_cm3"]).apply(ct)
    side = "left"
    lm = read_landmarks(case_dir / truth["landmarks"])[side]
    proj = neutral_projection(density, labels, FEMUR_LABEL[side], lm)
    fig, ax = plt.subplots(figsize=(5.5, 6))
    im = ax.imshow(proj.abmd_g_cm2, cmap="magma", vmin=0)
    ax.contour(proj.total_hip_roi, levels=[0.5], colors="cyan", linewidths=1.2)
    ax.contour(proj.neck_roi, levels=[0.5], colors="lime", linewidths=1.2)
    rc = proj.geometry.project(
        np.stack([proj.landmarks_room.head_center_mm, proj.landmarks_room.lesser_trochanter_mm])
    )
    ax.plot(rc[:, 1], rc[:, 0], "w+", ms=10)
    s = truth["sides"][side]
    ax.set_title(
        f"{truth['patient']['patient_id']} left femur, neutral pose, 0.25 mm\n"
        f"total hip (cyan) {s['ct_abmd_g_cm2']:.3f} g/cm2, neck box (green) "
        f"{s['neck_abmd_g_cm2']:.3f} g/cm2\n+ head centre, lesser trochanter tip",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.04, label="g/cm2")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def variants(out: Path, workers: int, figures: Path) -> None:
    """The cohort options' figure from two small cohorts (seed 11: a hip replacement, a nail
    and screws; seed 5: one patient, four sessions with randomised processing)."""
    runs = {
        "implants": (11, 3, SynthSettings(poses=2, implant_fraction=1.0)),
        "processing": (5, 1, SynthSettings(poses=1, sessions=4, processing="random")),
    }
    for name, (seed, cases, settings) in runs.items():
        start = time.perf_counter()
        summary = generate_cohort(out / name, cases, seed, settings, workers)
        per_case = summary["seconds_per_case"]
        print(
            f"{name}: {summary['succeeded']}/{cases} cases in {time.perf_counter() - start:.0f} s"
            f" ({workers} workers); seconds per case on one worker: {per_case}"
        )
    sheet = write_variants_sheet(
        out / "implants", out / "processing", figures / "synth_variants.png"
    )
    print(f"figure: {sheet}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--poses", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_out/synth"))
    parser.add_argument("--figures", type=Path, default=DOCS_IMAGES)
    parser.add_argument("--variants", action="store_true", help="the options' cohorts and figure")
    args = parser.parse_args()
    if args.variants:
        variants(args.out, args.workers, args.figures)
        return

    settings = SynthSettings(poses=args.poses)
    start = time.perf_counter()
    summary = generate_cohort(args.out, args.cases, args.seed, settings, args.workers)
    wall = time.perf_counter() - start
    truths = sorted((args.out / "cases").glob("*/truth.json"))
    docs = [(p.parent, json.loads(p.read_text())) for p in truths]
    per_case = [t["timing_s"]["total"] for _, t in docs]
    ct_part = [t["timing_s"]["ct"] for _, t in docs]
    print(
        f"cohort: {summary['succeeded']}/{summary['cases']} cases, {args.poses} radiographs "
        f"each, {args.workers} workers, seed {args.seed}; failed: {summary['failed'] or 'none'}"
    )
    print(
        f"seconds per case on one worker (CT + {args.poses} radiographs): median "
        f"{statistics.median(per_case):.1f} s (CT and truth {statistics.median(ct_part):.1f} s), "
        f"range {min(per_case):.1f}-{max(per_case):.1f} s"
    )
    print(
        f"cohort wall time {wall:.0f} s with {args.workers} workers: "
        f"{wall / max(len(docs), 1):.1f} s per case"
    )

    rows = [(case_dir, truth, recompute(case_dir, truth)) for case_dir, truth in docs]
    print("\nself-consistency: recomputed from the written files / truth.json - 1 (%)")
    print(
        f"  {'case':<14} {'calib':<12} {'slope err':>9} {'max rod':>8}  "
        f"{'abmd L':>7} {'abmd R':>7} {'neck L':>7} {'neck R':>7} {'vbmd L':>7} {'vbmd R':>7}"
    )
    for case_dir, _, r in rows:
        rod = max((abs(x) for x in r["rod_residuals_mg_cm3"]), default=float("nan"))
        rod_text = f"{rod:>6.2f}mg" if r["method"] == "phantom" else f"{'-':>8}"
        print(
            f"  {case_dir.name:<14} {r['method']:<12} {r['slope_error_percent']:>+8.2f}% "
            f"{rod_text}  "
            + " ".join(
                f"{r[s][k]:>+7.2f}"
                for k in ("ct_abmd", "neck_abmd", "qct_vbmd")
                for s in DRAW_SIDES
            )
        )
    for method in ("phantom", "phantomless"):
        errs = [
            abs(r[s]["ct_abmd"]) for _, _, r in rows if r["method"] == method for s in DRAW_SIDES
        ]
        if errs:
            print(
                f"  {method}: |ct_abmd error| median {statistics.median(errs):.3f} %, "
                f"max {max(errs):.3f} % over {len(errs)} femurs"
            )
    rods = [
        abs(x) for _, _, r in rows if r["method"] == "phantom" for x in r["rod_residuals_mg_cm3"]
    ]
    if rods:
        print(
            f"  phantom rods: |fitted - nominal| max {max(rods):.2f} mg/cm3 over {len(rods)} rods"
        )

    args.figures.mkdir(parents=True, exist_ok=True)
    sheet = write_contact_sheet(args.out, args.figures / "synth_contact_sheet.png")
    regions_figure(*docs[0], args.figures / "bmd_regions.png")
    print(f"\nfigures: {sheet}, {args.figures / 'bmd_regions.png'}")


if __name__ == "__main__":
    main()
