"""A contact sheet of a virtual cohort: radiographs next to bone DRRs and CT slices; and a
sheet of the cohort options (implants, randomised processing).

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
    return _save_small(fig, out_png)


def _save_small(fig, out_png: str | Path) -> Path:
    """Save ``fig`` as a PNG of 256 colours (plenty for grey radiographs and one colour map: a
    third of the size)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=72)
    plt.close(fig)
    with Image.open(out_png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(out_png, optimize=True)
    return out_png


def write_variants_sheet(
    implants_dir: str | Path, processing_dir: str | Path, out_png: str | Path
) -> Path:
    """Write a PNG of the cohort options: per implant case of ``implants_dir`` (made with
    ``--implant-fraction``) the implanted hip on its first radiograph and a coronal CT slice
    through it; then the first case of ``processing_dir`` (made with ``--sessions`` and
    ``--processing random``) once per session: one patient, a processing graph per session."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    implants = [
        (p.parent, t)
        for p in sorted(Path(implants_dir).glob("cases/*/truth.json"))
        if (t := json.loads(p.read_text())).get("implant")
    ][:3]
    truth_path = next(iter(sorted(Path(processing_dir).glob("cases/*/truth.json"))), None)
    if not implants or truth_path is None:
        raise FileNotFoundError("no implant case, or no case with sessions")
    firsts = [
        r for r in json.loads(truth_path.read_text())["xrays"] if r.get("pose_in_session") == 1
    ]
    cols = max(len(implants), len(firsts[:4]))
    fig, axes = plt.subplots(3, cols, figsize=(4.2 * cols, 12.5), squeeze=False)
    for n, (case_dir, truth) in enumerate(implants):
        implant, record = truth["implant"], truth["xrays"][0]
        xray = read_xray(case_dir / record["dicom"])
        r, c = np.rint(record["projected_landmarks"][implant["side"]]["head_center_px"]).astype(int)
        half = round(110.0 / record["geometry"]["pixel_spacing_mm"][0])
        crop = xray.pixels[max(r - half // 2, 0) : r + 3 * half // 2, max(c - half, 0) : c + half]
        axes[0, n].imshow(to_display_uint8(crop), cmap="gray")
        axes[0, n].set_title(
            f"{truth['patient']['patient_id']}: {implant['type'].replace('_', ' ')}, "
            f"{implant['side']} hip ({record['device']['family']})",
            fontsize=9,
        )
        ct = read_ct(case_dir / truth["ct"]["file"])
        lm = json.loads((case_dir / truth["landmarks"]).read_text())["femur"][implant["side"]]
        _, j, _ = np.rint(ct.world_to_index(np.asarray(lm["head_center_mm"]))).astype(int)
        sp = ct.spacing_mm
        axes[1, n].imshow(
            ct.data[::-1, j, :], cmap="gray", vmin=-250, vmax=1250, aspect=sp[2] / sp[0]
        )
        axes[1, n].set_title("CT coronal through that head (HU; metal 3071, streaks)", fontsize=9)
    p = json.loads(truth_path.read_text())["patient"]
    for n, record in enumerate(firsts[:cols]):
        xray = read_xray(truth_path.parent / record["dicom"])
        graph = record["device"].get("processing_graph") or {}
        steps = "+".join(s["step"].replace("_", " ") for s in graph.get("steps", [])) or "none"
        axes[2, n].imshow(to_display_uint8(xray.pixels), cmap="gray")
        response = graph.get("response", {}).get("kind")
        axes[2, n].set_title(
            f"{p['patient_id']} session {record['session']} ({record['device']['family']}, "
            f"{record['device']['kvp']:.0f} kVp):\n{response} response; {steps};\n"
            f"{graph.get('lut', {}).get('shape')} LUT, {record['device']['bits_stored']} bit",
            fontsize=8,
        )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_axis_off()
    return _save_small(fig, out_png)
