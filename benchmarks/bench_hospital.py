"""Wall time of each step of a hospital-format cohort through xbmd, as a user runs it.

The cohort (``xbmd synth``, by default the tests' tiny one: 3 patients, 3 mm CT, 1.6 mm
radiographs) is turned into what a hospital has (``xbmd.synth.hospital``: DICOM CT series with
the phantom unlabelled, TotalSegmentator folders, DX DICOM and PNG radiographs, a long DXA
sheet, no landmarks), then each command runs in its own process, as from a shell:

1. ``xbmd dxa import`` (Hologic scale, 60-day interval check);
2. ``xbmd prepare`` (rods and landmarks found automatically, every radiograph registered with
   the default settings, QC overlays);
3. ``xbmd train`` (the tests' small network, ``--max-steps``);
4. ``xbmd evaluate`` against the DXA (no robustness runs).

Usage::

    python benchmarks/bench_hospital.py --out bench_out/hospital            # tiny cohort
    python benchmarks/bench_hospital.py --cohort bench_out/reg20 --cases 2 --out bench_out/h20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

SMALL = {
    "image_size": 64,
    "batch_size": 2,
    "val_fraction": 0.34,
    "generator": {"channels": [8, 16, 32]},
    "discriminator": {"scales": 2, "layers": 2, "channels": 8},
    "stages": {"1": {"epochs": 1}, "2": {"epochs": 1}, "3": {"epochs": 1}, "loc": {"epochs": 1}},
}


def xbmd(*args: str) -> tuple[float, int, str]:
    """Run ``xbmd ARGS`` in a new process; (seconds, exit code, last lines of output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "xbmd.cli", *args], capture_output=True, text=True, check=False
    )
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
    return time.perf_counter() - t0, proc.returncode, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=None, help="a cohort (default: make the tiny)")
    ap.add_argument("--cases", type=int, default=None, help="first N cases of --cohort")
    ap.add_argument("--out", type=Path, default=Path("bench_out/hospital"))
    ap.add_argument("--max-steps", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    times: dict[str, float] = {}
    cohort = args.cohort
    if cohort is None:
        from xbmd.synth.cohort import SynthSettings, generate_cohort

        cohort = args.out / "cohort"
        tiny = SynthSettings(
            ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0.0
        )
        t0 = time.perf_counter()
        generate_cohort(cohort, cases=3, seed=21, settings=tiny, workers=1, progress=False)
        times["synth (virtual cohort, not a hospital step)"] = time.perf_counter() - t0
    if args.cases is not None:
        from xbmd.dataset.manifest import read_manifest, write_manifest

        subset = args.out / "subset"
        subset.mkdir()
        cases = read_manifest(cohort / "manifest.csv")[: args.cases]
        write_manifest(cases, subset / "manifest.csv")  # paths absolute: the cohort stays put
        shutil.copy(cohort / "dxa.csv", subset / "dxa.csv")
        cohort = subset
    from xbmd.synth.hospital import hospital_cohort

    t0 = time.perf_counter()
    hospital = args.out / "hospital"
    manifest = hospital_cohort(cohort, hospital)
    times["hospital format (not a hospital step)"] = time.perf_counter() - t0
    config = args.out / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    steps = [
        ("xbmd dxa import", ["dxa", "import", str(hospital / "dxa_export.csv"), "--out",
                             str(manifest), "--scale", "hologic", "--max-interval-days", "60"]),
        ("xbmd prepare", ["prepare", str(manifest), "--out", str(args.out / "dataset"),
                          "--no-progress"]),
        ("xbmd train", ["train", str(args.out / "dataset"), "--out", str(args.out / "run"),
                        "--config", str(config), "--stages", "1,2,3", "--max-steps",
                        str(args.max_steps), "--no-progress"]),
        ("xbmd evaluate", ["evaluate", "--dataset", str(args.out / "dataset"), "--model",
                           str(args.out / "run" / "model.pt"), "--out", str(args.out / "report"),
                           "--target", "dxa", "--robustness", "none", "--no-progress"]),
    ]  # fmt: skip
    for name, cli in steps:
        seconds, code, tail = xbmd(*cli)
        times[name] = seconds
        print(f"{name}: {seconds:.1f} s, exit code {code}\n  " + tail.replace("\n", "\n  "))
        if code not in (0, 2):
            break
    prep = json.loads((args.out / "dataset" / "prepare.json").read_text())
    print()
    print(f"{'step':45s} {'wall time (s)':>14s}")
    for name, seconds in times.items():
        print(f"{name:45s} {seconds:14.1f}")
    print(
        f"\nprepare: {prep['samples_written']} samples written, {prep['samples_failed']} failed, "
        f"{prep['registrations_run']} registrations; seconds per case "
        + ", ".join(f"{k} {v:.0f}" for k, v in prep["seconds_per_case"].items())
    )
    (args.out / "times.json").write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
