"""`xbmd prepare` throughput on a virtual cohort, and what registration changes in the labels.

Runs ``xbmd.dataset.prepare.prepare_dataset`` on a cohort's manifest (fresh output folders):

- ``--mode known``: poses from the cohort's truth (``--known-poses``): crops, DRRs and labels only;
- ``--mode registered``: every radiograph registered first (the real-data path);
- ``--mode both`` (default): both, then per sample the stage-2 label ``bmd_drr_g_cm2`` from the
  registered poses against the one from the true poses.

Prints samples per minute (wall clock, ``--workers`` processes on this machine) and failures.

Usage::

    python benchmarks/bench_prepare.py --cohort bench_out/reg20 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np

from xbmd.dataset.manifest import read_manifest, write_manifest
from xbmd.dataset.prepare import prepare_dataset


def run(manifest: Path, out: Path, workers: int, known: bool) -> dict:
    if out.exists():
        shutil.rmtree(out)
    summary = prepare_dataset(manifest, out, workers=workers, use_known_poses=known, progress=True)
    label = "known poses" if known else "registered"
    print(
        f"{label:12s}: {summary['samples_written']} samples in {summary['seconds']:.0f} s = "
        f"{summary['samples_per_minute']:.1f} samples/min ({workers} workers); "
        f"failed {summary['samples_failed']}, registrations run {summary['registrations_run']}",
        flush=True,
    )
    for f in summary["failures"]:
        print(f"   FAILED {f['case_id']} {f['xray']} {f['side']} [{f['stage']}]: {f['error']}")
    return summary


def compare(known_dir: Path, registered_dir: Path) -> None:
    def rows(d: Path) -> dict:
        with (d / "index.csv").open() as fh:
            return {r["sample_id"]: r for r in csv.DictReader(fh)}

    known, reg = rows(known_dir), rows(registered_dir)
    common = sorted(set(known) & set(reg))
    diff = np.array(
        [
            100.0 * (float(reg[s]["bmd_drr_g_cm2"]) / float(known[s]["bmd_drr_g_cm2"]) - 1.0)
            for s in common
        ]
    )
    if diff.size:
        a = np.abs(diff)
        print(
            f"bmd_drr_g_cm2, registered vs true poses, {diff.size} samples: median |diff| "
            f"{np.median(a):.3f} %, p95 {np.percentile(a, 95):.3f} %, max {a.max():.3f} %"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=Path("bench_out/reg20"))
    ap.add_argument("--cases", type=int, default=None, help="first N cases (default all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", choices=("known", "registered", "both"), default="both")
    ap.add_argument("--out", type=Path, default=Path("bench_out/prepare"))
    args = ap.parse_args()
    manifest = args.cohort / "manifest.csv"
    if args.cases:
        cases = read_manifest(manifest)[: args.cases]
        args.out.mkdir(parents=True, exist_ok=True)
        manifest = args.out / "manifest.csv"
        write_manifest(cases, manifest)
    known_dir, reg_dir = args.out / "known", args.out / "registered"
    if args.mode in ("known", "both"):
        run(manifest, known_dir, args.workers, known=True)
    if args.mode in ("registered", "both"):
        run(manifest, reg_dir, args.workers, known=False)
    if args.mode == "both":
        compare(known_dir, reg_dir)


if __name__ == "__main__":
    main()
