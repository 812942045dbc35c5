"""The files of ``xbmd estimate``: per hip result.json, the virtual X-ray (.npy, .png) and an
overlay, per image an overview, one ``results.csv``; and the one-line summary per hip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.estimation.figures import (
    bmd_text,
    t_text,
    write_overlay_png,
    write_overview_png,
    write_virtual_xray_png,
)
from xbmd.estimation.result import CSV_COLUMNS, HipResult


def summary_line(r: HipResult) -> str:
    """One line per hip for people: image, side, BMD with its interval, T-score, the category
    statement; why it is not confident, when it is not."""
    line = f"{Path(r.image).name}  {r.side:5s}  BMD {bmd_text(r)}  {t_text(r)}"
    line += f"  {r.category_statement}" if r.category_statement else ""
    if not r.confident:
        line += f"  NOT CONFIDENT: {r.gate[0]}" + (
            f" (and {len(r.gate) - 1} more)" if len(r.gate) > 1 else ""
        )
    return line


def csv_row(r: HipResult) -> dict:
    """One row of ``results.csv`` (``CSV_COLUMNS``)."""
    d = r.to_dict()
    interval = d.get("bmd_interval_g_cm2") or [None, None]
    return {
        **{c: d.get(c) for c in CSV_COLUMNS},
        "bmd_low_g_cm2": interval[0],
        "bmd_high_g_cm2": interval[1],
        "n_warnings": len(r.warnings),
        "warnings": " | ".join(r.warnings),
        "gate": " | ".join(r.gate),
        "result_json": r.files.get("result_json", ""),
    }


def write_csv(rows: list[HipResult], path: str | Path) -> Path:
    """``results.csv``: one row per hip (``CSV_COLUMNS``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(csv_row(r))
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
