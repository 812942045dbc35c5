"""A contact sheet of a virtual cohort: radiographs next to bone DRRs and CT slices.

Everything is read back from the written files (CT, labels, DICOM, truth.json), so the sheet also
checks that the recorded poses and geometry reproduce the radiographs: the bone DRR rendered
from the CT with the true poses must sit exactly on the bones of the radiograph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xbmd.ct.calibration import Calibration
from xbmd.display import to_display_uint8
from xbmd.drr import prepare_volume, render
from xbmd.geometry import PerspectiveGeometry
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray

#: Bone DRRs are rendered on pixels this many times larger than the radiograph's.
DRR_FACTOR = 4


def bone_drr(case_dir: Path, truth: dict, record: dict, factor: int = DRR_FACTOR) -> np.ndarray:
    """Bone DRR (g/cm2) of the written CT in one radiograph's true poses and geometry."""
    ct = read_ct(case_dir / truth["ct"]["file"])
    labels = read_labels(case_dir / truth["ct"]["labels"], ct)
    line = truth["ct"]["true_calibration"]
    density = Calibration.given(line["slope_mg_cm3_per_hu"], line["intercept_mg_cm3"]).apply(ct)
    bodies, poses = [], []
    for pose in record["poses"].values():
        bodies.append(
            prepare_volume(
                density,
                "density",
                labels=labels,
                label_ids=pose["label_ids"],
                isocenter_mm=np.asarray(pose["isocenter_mm"]),
            )
        )
        poses.append(
            torch.tensor(pose["rotation_deg"] + pose["translation_mm"], dtype=torch.float64)
        )
    with torch.no_grad():
        return render(
            bodies, poses, PerspectiveGeometry.from_dict(record["geometry"]).binned(factor)
        )[0].numpy()


def _slices(case_dir: Path, truth: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Coronal and axial CT slices through the femoral heads (HU) and the in-plane spacing."""
    ct = read_ct(case_dir / truth["ct"]["file"])
    lm = json.loads((case_dir / truth["landmarks"]).read_text())["femur"]
    centre = (
        np.asarray(lm["left"]["head_center_mm"]) + np.asarray(lm["right"]["head_center_mm"])
    ) / 2
    _, j, k = np.rint(ct.world_to_index(centre)).astype(int)
    coronal = ct.data[::-1, j, :]  # superior at the top
    axial = ct.data[k, :, :]  # anterior at the top, patient right on the left
    return coronal, axial, tuple(ct.spacing_mm)


def write_contact_sheet(cohort_dir: str | Path, out_png: str | Path, max_cases: int = 4) -> Path:
    """Write a PNG: per case, two radiographs with their bone DRRs, and two CT slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort_dir = Path(cohort_dir)
    cases = sorted((cohort_dir / "cases").glob("*/truth.json"))[:max_cases]
    if not cases:
        raise FileNotFoundError(f"{cohort_dir}: no finished cases (cases/*/truth.json)")
    fig, axes = plt.subplots(len(cases), 6, figsize=(24, 3.6 * len(cases)), squeeze=False)
    for row, truth_path in zip(axes, cases, strict=True):
        case_dir = truth_path.parent
        truth = json.loads(truth_path.read_text())
        p = truth["patient"]
        for n, record in enumerate(truth["xrays"][:2]):
            xray = read_xray(case_dir / record["dicom"])
            row[2 * n].imshow(to_display_uint8(xray.pixels), cmap="gray")
            m = record["motions"]
            row[2 * n].set_title(
                f"{p['patient_id']} {p['sex']} {p['age_years']:.0f} y, {record['name']}: tilt "
                f"{m['pelvis']['tilt_deg']:+.0f}°, internal rotation "
                f"R {m['femur']['right']['internal_rotation_deg']:+.0f}° "
                f"L {m['femur']['left']['internal_rotation_deg']:+.0f}°",
                fontsize=7,
            )
            drr = bone_drr(case_dir, truth, record)
            im = row[2 * n + 1].imshow(drr, cmap="magma", vmin=0, vmax=np.percentile(drr, 99.5))
            row[2 * n + 1].set_title("bone DRR from the CT, true poses (g/cm2)", fontsize=7)
            fig.colorbar(im, ax=row[2 * n + 1], fraction=0.035)
        coronal, axial, sp = _slices(case_dir, truth)
        s = truth["sides"]
        row[4].imshow(coronal, cmap="gray", vmin=-250, vmax=1250, aspect=sp[2] / sp[0])
        row[4].set_title(
            f"CT coronal (HU); total hip R {s['right']['ct_abmd_g_cm2']:.3f} "
            f"L {s['left']['ct_abmd_g_cm2']:.3f} g/cm2",
            fontsize=7,
        )
        row[5].imshow(axial, cmap="gray", vmin=-250, vmax=1250, aspect=sp[1] / sp[0])
        kind = "phantom" if truth["ct"]["has_phantom"] else "no phantom"
        row[5].set_title(
            f"CT axial through the heads ({kind}, {truth['ct']['scanner']['name']})", fontsize=7
        )
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=72)
    plt.close(fig)
    # 256 colours are plenty for grey radiographs and one colour map: a third of the size
    with Image.open(out_png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(out_png, optimize=True)
    return out_png
