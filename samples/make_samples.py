"""Make the demo X-rays in samples/ from a virtual cohort never used in training.

    xbmd synth --out bench_out/reg20 --cases 20 --seed 3000 --poses 2
    xbmd prepare bench_out/reg20/manifest.csv --out bench_out/prepare20/known --known-poses
    python samples/make_samples.py --cohort bench_out/reg20 --dataset bench_out/prepare20/known

Two AP pelvis radiographs of the held-out cohort (seed 3000; the default model was trained on
seed 4000), 2 x 2 binned to 0.6 mm to stay small: one DICOM DX (MONOCHROME1, with distances and
patient age/sex), one 16-bit PNG (no spacing in the file: give --pixel-spacing 0.6).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from xbmd.io.xray import read_xray
from xbmd.io.xray_write import write_xray_dicom, write_xray_png

HERE = Path(__file__).parent
CHOICES = (("case_VQ0002", "xray_01", "dicom"), ("case_VQ0011", "xray_02", "png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="its prepared dataset")
    args = parser.parse_args()
    with (args.dataset / "index.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    notes = {}
    for case, xray_id, kind in CHOICES:
        xr = read_xray(args.cohort / "cases" / case / f"{xray_id}.dcm")
        p = xr.pixels
        h, w = (n - n % 2 for n in p.shape)
        binned = p[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        lo, hi = np.percentile(binned, [0.0, 100.0])
        u16 = np.round((binned - lo) / (hi - lo) * 65535).astype(np.uint16)
        spacing = 2 * xr.pixel_spacing_mm[0]
        name = f"hip_{case.split('_')[1].lower()}"
        if kind == "dicom":
            write_xray_dicom(
                u16,
                HERE / f"{name}.dcm",
                pixel_spacing_mm=spacing,
                photometric="MONOCHROME1",
                sdd_mm=xr.meta.get("sdd_mm"),
                sod_mm=xr.meta.get("sod_mm"),
                patient_age_years=xr.meta.get("patient_age_years"),
                patient_sex=xr.meta.get("patient_sex"),
                patient_id=case,
            )
        else:
            write_xray_png(u16, HERE / f"{name}.png")
        notes[name] = {
            "source": f"{case}/{xray_id} of the virtual cohort seed 3000",
            "pixel_spacing_mm": spacing,
            "sdd_mm": xr.meta.get("sdd_mm"),
            "sod_mm": xr.meta.get("sod_mm"),
            "patient": {
                "age_years": xr.meta.get("patient_age_years"),
                "sex": xr.meta.get("patient_sex"),
            },
            "reference_ct_abmd_g_cm2": {
                r["side"]: float(r["ct_abmd_g_cm2"])
                for r in rows
                if r["case_id"] == case and Path(r["xray"]).stem == xray_id
            },
        }
    (HERE / "samples.json").write_text(json.dumps(notes, indent=1))


if __name__ == "__main__":
    main()
