"""The files of ``xbmd estimate``: per hip result.json, the virtual X-ray (.npy, .png) and an
overlay, per image an overview, one ``results.csv``; and the one-line summary per hip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.estimation.figures import (
    write_overlay_png,
    write_overview_png,
    write_virtual_xray_png,
)
from xbmd.estimation.result import CSV_COLUMNS, HipResult


def summary_line(r: HipResult) -> str:
    """One line per hip for people: image, side, BMD, T-score, WHO category, BMD_drr, warnings."""
    bmd = f"{r.bmd_g_cm2:.3f}" if r.bmd_g_cm2 is not None else "-"
    t = f"{r.t_score:+.1f}" if r.t_score is not None else "-"
    drr = f"{r.bmd_drr_g_cm2:.3f}" if r.bmd_drr_g_cm2 is not None else "-"
    state = "" if r.confident else "  NOT CONFIDENT (see warnings)"
    return (
        f"{Path(r.image).name}  {r.side:5s}  BMD {bmd} g/cm2  T {t}  "
        f"{r.who_category or '-'}  BMD_drr {drr} g/cm2  {len(r.warnings)} warnings{state}"
    )


def write_csv(rows: list[HipResult], path: str | Path) -> Path:
    """``results.csv``: one row per hip (``CSV_COLUMNS``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            d = r.to_dict()
            writer.writerow(
                {
                    **{c: d.get(c) for c in CSV_COLUMNS},
                    "n_warnings": len(r.warnings),
                    "warnings": " | ".join(r.warnings),
                    "result_json": r.files.get("result_json", ""),
                }
            )
    return path


def write_results(
    results: list[HipResult],
    out_dir: str | Path,
    name: str | None = None,
    figures: bool = True,
) -> Path:
    """Write the results of one radiograph into ``out_dir/<name>/`` (name: the image's stem).

    Per hip, ``<side>/``: result.json, virtual_xray.npy (float32 g/cm2, S x S, canonical),
    pf_region.npy (bool), and with ``figures`` virtual_xray.png, overlay.png; per image:
    overview.png. Adds to ``result.files`` (entries already there, e.g. DICOM outputs, are
    kept). Returns the image's folder.
    """
    if not results:
        raise InputError("no results to write")
    folder = Path(out_dir) / (name or Path(results[0].image).stem)
    for r in results:
        hip = folder / r.side
        hip.mkdir(parents=True, exist_ok=True)
        np.save(hip / "virtual_xray.npy", r.virtual_xray_g_cm2.astype(np.float32))
        np.save(hip / "pf_region.npy", r.pf_region.astype(bool))
        r.files = {
            **r.files,
            "virtual_xray_npy": str(hip / "virtual_xray.npy"),
            "pf_region_npy": str(hip / "pf_region.npy"),
        }
        if figures:
            r.files["virtual_xray_png"] = str(write_virtual_xray_png(r, hip / "virtual_xray.png"))
            r.files["overlay_png"] = str(write_overlay_png(r, hip / "overlay.png"))
            r.files["overview_png"] = str(folder / "overview.png")
        r.files["result_json"] = str(hip / "result.json")
        (hip / "result.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n")
    if figures:
        write_overview_png(results, folder / "overview.png")
    return folder
