"""The CT pipeline demo (``xbmd demo-ct``): test CT -> phantom calibration -> DRRs in g/cm2.

It builds the hip test CT with its calibration phantom, calibrates it, renders the bone-only
virtual X-ray (pelvis and femurs posed independently), a simulated radiograph, and a DXA-like
projection of each femur, and compares the areal BMD from the calibrated CT with the truth it was
built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xbmd.ct.calibration import load_phantom, phantom_calibration
from xbmd.ct.phantoms import LABELS, hip_test_ct
from xbmd.display import write_preview_png
from xbmd.drr import prepare_volume, render
from xbmd.geometry import ParallelGeometry, PerspectiveGeometry, femur_rotation_deg
from xbmd.io.ct import write_volume

#: Typical AP hip radiograph: 110 cm source-detector, hip about 15 cm above the detector.
SDD_MM, SOD_MM = 1100.0, 950.0


@dataclass
class SideResult:
    side: str
    abmd_g_cm2: float  # from the calibrated CT
    abmd_truth_g_cm2: float  # from the mineral the CT was built from
    area_cm2: float

    @property
    def error_percent(self) -> float:
        return (self.abmd_g_cm2 - self.abmd_truth_g_cm2) / self.abmd_truth_g_cm2 * 100


def run_demo(out_dir: Path, log=print) -> list[SideResult]:
    """Run the demo, write images and volumes to ``out_dir``, return the per-side aBMD."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log("1/5 building the hip test CT (320 x 320 x 140 voxels, 1.25 mm, phantom under the patient)")
    test = hip_test_ct(shape=(140, 320, 320), spacing_mm=(1.25, 1.25, 2.0), seed=1)
    write_volume(test.ct, out_dir / "ct.nii.gz")
    write_volume(test.labels, out_dir / "labels.nii.gz")

    log("2/5 calibrating HU -> mg/cm3 hydroxyapatite with the phantom rods")
    cal = phantom_calibration(test.ct, test.labels, load_phantom("bmas200"))
    cal.to_json(out_dir / "calibration.json")
    log(
        f"    density = {cal.slope_mg_cm3_per_hu:.4f} x HU {cal.intercept_mg_cm3:+.2f} mg/cm3, "
        f"r = {cal.r:.5f} (truth: slope {1 / test.hu_per_mg_cm3:.4f}, "
        f"intercept {-test.water_hu / test.hu_per_mg_cm3:+.2f})"
    )

    log("3/5 rendering the bone DRR (pelvis + femurs, g/cm2) in AP radiograph geometry")
    bones = {
        name: prepare_volume(
            test.ct, "density", calibration=cal, labels=test.labels, label_ids=[label]
        )
        for name, label in LABELS.items()
    }
    # The identity pose puts each bone's isocentre at the room origin. The femur turns about its
    # head: its isocentre is the head centre, offset back by the head's place in the CT.
    head = test.femoral_heads_mm["left"]
    bones["femur_left"].isocenter_mm = head
    centre = test.ct.center_mm
    neutral = torch.zeros(1, 6)
    poses = {name: neutral for name in bones}
    poses["femur_left"] = torch.tensor([[0.0, 0.0, 0.0, *(head - centre)]])
    moved = dict(poses)
    hip_motion = femur_rotation_deg("left", abduction_deg=10.0, internal_deg=15.0)
    moved["femur_left"] = torch.tensor([[*hip_motion, *(head - centre)]])
    geo = PerspectiveGeometry(SDD_MM, SOD_MM, (320, 400), 1.0)
    with torch.no_grad():
        bone_drr = render(list(bones.values()), list(poses.values()), geo)[0].numpy()
        posed_drr = render(list(bones.values()), list(moved.values()), geo)[0].numpy()
        body = prepare_volume(test.ct, "attenuation")
        xray = render(body, neutral, geo)[0].numpy()
    np.save(out_dir / "bone_drr_g_cm2.npy", bone_drr)
    np.save(out_dir / "bone_drr_posed_g_cm2.npy", posed_drr)
    write_preview_png(bone_drr, out_dir / "bone_drr.png", title="bone DRR, AP, neutral pose")
    write_preview_png(
        posed_drr, out_dir / "bone_drr_posed.png", title="left femur: 10° abduction, 15° int. rot."
    )
    write_preview_png(
        xray, out_dir / "xray_simulated.png", unit="attenuation line integral", title="whole CT"
    )

    log("4/5 DXA-like parallel projections of each femur (0.5 mm pixels)")
    results = []
    par = ParallelGeometry((440, 220), 0.5)  # 220 x 110 mm: the whole femur in the CT
    for side in ("right", "left"):
        label = LABELS[f"femur_{side}"]
        femur = prepare_volume(
            test.ct, "density", calibration=cal, labels=test.labels, label_ids=[label]
        )
        truth = prepare_volume(test.mineral, "density", labels=test.labels, label_ids=[label])
        # centre each femur in the parallel detector: place its own centre at the isocentre
        truth.isocenter_mm = femur.isocenter_mm = _centre_of(femur)
        with torch.no_grad():
            img = render(femur, neutral, par)[0].numpy()
            ref = render(truth, neutral, par)[0].numpy()
        bone = ref > 0.05  # g/cm2: the femur's projected area
        area_cm2 = float(bone.sum()) * 0.05**2
        results.append(SideResult(side, float(img[bone].mean()), float(ref[bone].mean()), area_cm2))
        np.save(out_dir / f"dxa_femur_{side}_g_cm2.npy", img)
        write_preview_png(
            img, out_dir / f"dxa_femur_{side}.png", title=f"{side} femur, parallel AP"
        )

    log("5/5 writing the summary figure")
    _summary_figure(out_dir / "summary.png", xray, bone_drr, posed_drr, results)
    return results


def _centre_of(body) -> np.ndarray:
    """CT-world centre (LPS mm) of a prepared body's non-zero voxels."""
    k, j, i = np.nonzero(body.data.numpy())
    ijk = np.stack([i, j, k], axis=1).mean(axis=0)
    return ijk @ body.affine[:3, :3].T + body.affine[:3, 3]


def _summary_figure(path: Path, xray, bone, posed, results: list[SideResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        (xray, "simulated radiograph (attenuation)", ""),
        (bone, "bone DRR, neutral pose", "g/cm2"),
        (posed, "left femur: 10° abduction, 15° internal rotation", "g/cm2"),
    )
    vmax = max(bone.max(), posed.max())
    for ax, (img, title, unit) in zip(axes, panels, strict=True):
        if unit:
            shown = ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
        else:  # a radiograph is read windowed on the body
            lo, hi = np.percentile(img[img > 0.5], [5, 99.8])
            shown = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.set_axis_off()
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, va="center")
        ax.text(0.95, 0.5, "L", color="yellow", transform=ax.transAxes, va="center")
        if unit:
            fig.colorbar(shown, ax=ax, fraction=0.04, label=unit)
    text = "   ".join(
        f"{r.side} femur aBMD {r.abmd_g_cm2:.3f} g/cm2 (truth {r.abmd_truth_g_cm2:.3f}, "
        f"{r.error_percent:+.2f} %)"
        for r in results
    )
    fig.suptitle(f"xbmd demo: hip test CT, AP view (patient's right on image left)\n{text}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
