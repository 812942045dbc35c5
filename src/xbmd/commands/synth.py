"""`xbmd synth`: generate a virtual QCT cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from xbmd.commands._common import user_errors
from xbmd.synth.device import DEVICE_FAMILIES

HELP = (
    "Generate a virtual QCT cohort: synthetic hip patients with a CT (NIfTI, HU) and "
    "calibration phantom, bone labels, AP radiographs in several poses (DICOM DX and 16-bit "
    "PNG), optionally in several sessions (visits, each with its own device) and with metal "
    "implants, simulated DXA, the "
    "ground truth (truth.json) and a manifest.csv for `xbmd prepare`. Deterministic for a seed; "
    "re-running into the same folder resumes. Exit code 0 when every case was written, 2 when "
    "some failed (listed, the rest written), 1 when none could be."
)


def main(
    out: Path = typer.Option(..., "--out", help="Cohort folder (new, or one to resume)."),
    cases: int = typer.Option(10, "--cases", min=1, help="Number of patients."),
    seed: int = typer.Option(0, "--seed", help="Cohort seed: same seed, same cohort."),
    poses: int = typer.Option(
        4,
        "--poses",
        min=1,
        max=20,
        help="Radiographs per patient, or per session with --sessions (the first a standard AP).",
    ),
    sessions: int = typer.Option(
        0,
        "--sessions",
        min=0,
        max=20,
        help="Sessions (visits) per patient: each one device and its settings (kVp, processing, "
        "detector), its --poses radiographs differing only in pose, one DICOM study. 0: every "
        "radiograph its own device, as cohorts were made before sessions existed.",
    ),
    implant_fraction: float = typer.Option(
        0.0,
        "--implant-fraction",
        min=0.0,
        max=1.0,
        help="Share of patients with a metal implant in one hip (hip replacement, nail or "
        "screws; label 10 in labels.nii.gz, marked in truth.json and the manifest).",
    ),
    device_families: str = typer.Option(
        "",
        "--device-families",
        help="Comma-separated device families the radiographs may come from (default all: "
        f"{', '.join(sorted(DEVICE_FAMILIES))}).",
    ),
    processing: str = typer.Option(
        "fixed",
        "--processing",
        help="fixed: each family's own processing; random: a randomised processing graph on "
        "every device (unlike any family); mixed: on half of them.",
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="Parallel cases (0: all cores)."),
    ct_spacing: float = typer.Option(
        1.0, "--ct-spacing", min=0.3, max=4.0, help="CT voxel size, mm (isotropic)."
    ),
    xray_spacing: float = typer.Option(
        0.3, "--xray-spacing", min=0.1, max=2.0, help="Radiograph detector pixel size, mm."
    ),
    phantomless: float = typer.Option(
        0.15,
        "--phantomless-fraction",
        min=0.0,
        max=1.0,
        help="Share of cases scanned without the calibration phantom.",
    ),
    contrast: float = typer.Option(
        0.0,
        "--contrast-fraction",
        min=0.0,
        max=1.0,
        help="Share of cases whose CT is contrast-enhanced (bright vessels); 0: none.",
    ),
    tissue_labels: bool = typer.Option(
        False,
        "--tissue-labels",
        help="Also write tissues.nii.gz (muscle 253, fat 252, contrast vessels) per case.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    with user_errors():
        from xbmd.synth.cohort import SynthSettings, generate_cohort

        families = [f.strip() for f in device_families.split(",") if f.strip()]
        settings = SynthSettings(
            ct_spacing_mm=ct_spacing,
            xray_spacing_mm=xray_spacing,
            poses=poses,
            phantomless_fraction=phantomless,
            sessions=sessions,
            implant_fraction=implant_fraction,
            device_families=tuple(families) if families else None,
            processing=processing,
            contrast_fraction=contrast,
            tissue_labels=tissue_labels,
        )
        summary = generate_cohort(out, cases, seed, settings, workers or None, progress)
    secs = summary["seconds_per_case"]
    typer.echo(
        f"{summary['succeeded']} of {summary['cases']} cases written to {out}"
        + (f" (median {sorted(secs)[len(secs) // 2]:.1f} s per case per worker)" if secs else "")
    )
    for failure in summary["failed"]:
        typer.echo(f"FAILED {failure['case_id']}: {failure['error']}", err=True)
    if summary["succeeded"]:
        typer.echo(f"manifest: {out / 'manifest.csv'}   simulated DXA: {out / 'dxa.csv'}")
    if not summary["succeeded"]:
        raise typer.Exit(code=1)
    if summary["failed"]:
        raise typer.Exit(code=2)
