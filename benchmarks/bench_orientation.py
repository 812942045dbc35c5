"""Is the radiograph upright? How well the anatomy answers (``xbmd.estimation.orientation``).

Every radiograph of a virtual cohort (``xbmd synth`` output: ``cases/*/xray_*.dcm``), turned by
0, 90, 180 and 270 degrees, goes through :func:`upright_turns` with a model's localiser. For each
turn it prints how often the turn that makes the image upright was found, how often an upright
image was turned (the costly error: a good image refused or read sideways), and the gap in summed
head confidence between the best quarter turn and the image as stored, which is what
``ROTATION_MARGIN`` thresholds: the margin should sit between the gaps of upright images (all
below it) and of turned ones (all above it).

Usage::

    python benchmarks/bench_orientation.py bench_out/m16_val --limit 60
    python benchmarks/bench_orientation.py COHORT --model run/model.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from xbmd.estimation.orientation import ROTATION_MARGIN, upright_turns
from xbmd.io.xray import read_xray
from xbmd.model.bundle import load_bundle


def radiographs(cohort: Path, limit: int) -> list[Path]:
    files = sorted(cohort.glob("cases/*/xray_*.dcm"))
    if not files:
        raise SystemExit(f"{cohort}: no cases/*/xray_*.dcm (not an xbmd synth cohort)")
    if limit and len(files) > limit:  # evenly spread over the cohort
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--model", default=None, help="model bundle (default: the bundled one)")
    ap.add_argument("--limit", type=int, default=60, help="radiographs (0: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    if bundle.localiser is None:
        raise SystemExit(f"{bundle.source}: the model has no localiser")
    rows = []
    t0 = time.perf_counter()
    for path in radiographs(args.cohort, args.limit):
        pixels = read_xray(path).pixels
        for stored in range(4):  # the file as stored: upright turned by `stored` quarter turns
            image = np.ascontiguousarray(np.rot90(pixels, stored)) if stored else pixels
            turns, _, scores = upright_turns(bundle.localiser, image)
            gap = max(scores[k] for k in (1, 2, 3)) - scores[0]
            rows.append(
                {
                    "file": str(path),
                    "stored_turns": stored,
                    "found_turns": turns,
                    "correct": turns == (4 - stored) % 4,
                    "gap": gap,
                }
            )
    seconds = time.perf_counter() - t0
    n = len(rows) // 4
    print(f"{n} radiographs x 4 turns, model {bundle.source}, margin {ROTATION_MARGIN}")
    print("stored turned by | upright found | wrong turn | left as stored | gap median [min, max]")
    summary = {}
    for stored in range(4):
        sel = [r for r in rows if r["stored_turns"] == stored]
        gaps = np.array([r["gap"] for r in sel])
        correct = sum(r["correct"] for r in sel)
        left = sum(r["found_turns"] == 0 for r in sel)
        wrong = len(sel) - correct - (left if stored else 0)
        summary[stored * 90] = {
            "n": len(sel),
            "correct": correct,
            "wrong_turn": wrong,
            "left_as_stored": left,
            "gap_median": float(np.median(gaps)),
            "gap_min": float(gaps.min()),
            "gap_max": float(gaps.max()),
        }
        print(
            f"{stored * 90:>13d} deg | {correct:>4d} of {len(sel):<4d} | {wrong:>10d} | "
            f"{left:>14d} | {np.median(gaps):+.2f} [{gaps.min():+.2f}, {gaps.max():+.2f}]"
        )
    upright_gaps = [r["gap"] for r in rows if r["stored_turns"] == 0]
    turned_gaps = [r["gap"] for r in rows if r["stored_turns"] != 0]
    print(
        f"largest gap of an upright image {max(upright_gaps):+.2f}; smallest of a turned one "
        f"{min(turned_gaps):+.2f}; {1000 * seconds / len(rows):.0f} ms per check (4 localiser runs)"
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
