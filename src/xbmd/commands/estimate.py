"""`xbmd estimate`: hip BMD, T-score and a virtual X-ray from plain AP pelvis or hip radiographs."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors
from xbmd.tscore import DEFAULT_REFERENCE, REFERENCES

HELP = (
    "Estimate the bone mineral density of each hip on plain AP pelvis or hip radiographs (DICOM "
    "DX/CR, PNG, JPEG, TIFF; folders, walked recursively, and DICOMDIR files): the model's "
    "localiser finds each femoral head, each hip is cropped "
    "as `xbmd prepare` does (left hips mirrored), and the model predicts the total hip aBMD "
    "(g/cm2, DXA-like), its T-score and WHO category, and a virtual X-ray of the proximal femur "
    "(g/cm2) mapped back onto the radiograph. Writes DIR/<image>/<side>/result.json with the "
    "virtual X-ray (.npy, .png) and an overlay, DIR/<image>/overview.png and DIR/results.csv. "
    "Results the checks find implausible (no hip in the crop, values beyond the training range) "
    "are marked 'confident: false' with warnings. In folders and DICOMDIRs, DICOM files that are "
    "not hip radiographs (SOP Class other than CR/DX, Modality other than DX/CR, Body Part "
    "Examined not a hip, a lateral View Position) and files that are not images are skipped, "
    "listed with the reason in DIR/skipped.csv, and not counted as failures. With --dicom-out, "
    "each DICOM radiograph also gets a TID 1500 measurement report (SR) and a Secondary Capture "
    "of the overlay, in its study, marked preliminary and research use only (docs/pacs.md). "
    "Exit code 0 when every image was estimated, 2 when some could not be (unusable or refused; "
    "listed in DIR/failures.csv, the rest written), 1 when none could."
)


class Sex(str, Enum):
    F = "F"
    M = "M"


class Side(str, Enum):
    right = "right"
    left = "left"


Reference = Enum("Reference", {r: r for r in REFERENCES}, type=str)
_DEFAULT_REFERENCE = Reference(DEFAULT_REFERENCE)


def main(
    images: list[Path] = typer.Argument(
        ...,
        help="Radiographs (DICOM, PNG, JPEG, TIFF), folders (recursive) or DICOMDIR files.",
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model bundle (xbmd train's model.pt); default: the bundled one."
    ),
    out: Path = typer.Option(Path("xbmd_estimate"), "--out", help="Output folder."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the results as JSON on stdout (the summary goes to stderr)."
    ),
    pixel_spacing: float | None = typer.Option(
        None,
        "--pixel-spacing",
        help="Detector pixel spacing, mm, for images that record none (PNG, JPEG, some TIFF); "
        "files with their own keep it (a warning says when it differs).",
    ),
    site_calibration: Path | None = typer.Option(
        None,
        "--site-calibration",
        help="A site-calibration file (site_calibration.json, written by xbmd evaluate from the "
        "site's own DXA): the BMD and its interval are mapped onto the site's DXA scale before "
        "the T-score; recorded in every result.json.",
    ),
    reference: Reference = typer.Option(
        _DEFAULT_REFERENCE,
        "--reference",
        help="T-score reference (default: ISCD, white women for everybody).",
    ),
    age: float | None = typer.Option(
        None,
        "--age",
        min=0,
        max=130,
        help="Patient age, years, for files that record none (PNG, JPEG, anonymised DICOM): "
        "WHO categories need age >= 50 and the sex, Z-scores age and sex.",
    ),
    sex: Sex | None = typer.Option(None, "--sex", help="Patient sex, for files that record none."),
    unilateral: Side | None = typer.Option(
        None,
        "--unilateral",
        help="The images are crops of one hip, this side. If the localiser finds no head, it is "
        "assumed where `xbmd prepare` puts it (40 % of the height, centred) and the result is "
        "marked not confident.",
    ),
    dicom_out: Path | None = typer.Option(
        None,
        "--dicom-out",
        help="Also write, per DICOM radiograph, DIR/<image>_sr.dcm (TID 1500 measurement report) "
        "and DIR/<image>_sc.dcm (Secondary Capture of the overlay), in the source's study, ready "
        "to send to PACS. Images that are not DICOM get none (no study to put them in).",
    ),
    figures: bool = typer.Option(
        True,
        "--figures/--no-figures",
        help="Write the PNG figures (overview, overlay, virtual X-ray); --no-figures for "
        "throughput (result.json, .npy and the CSV are still written).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    with user_errors():
        from tqdm import tqdm

        from xbmd.errors import InputError
        from xbmd.estimation.batch import estimate_batch
        from xbmd.estimation.estimator import Estimator
        from xbmd.estimation.output import summary_line

        estimator = Estimator(model, reference=reference.value, site_calibration=site_calibration)

        def bar(images):
            return tqdm(images, unit="image", disable=not progress or len(images) < 2, file=_err())

        # stdout is for the JSON with --json; tqdm.write keeps the bar intact
        batch = estimate_batch(
            images,
            out,
            estimator,
            pixel_spacing_mm=pixel_spacing,
            unilateral=unilateral.value if unilateral else None,
            age_years=age,
            sex=sex.value if sex else None,
            figures=figures,
            dicom_writer=None if dicom_out is None else _dicom_writer(dicom_out),
            progress=bar,
            on_hip=lambda r: tqdm.write(summary_line(r), file=_err() if as_json else _out()),
            on_failure=lambda path, error: tqdm.write(f"error: {error}", file=_err()),
        )
        if not batch.results and not batch.failures:
            raise InputError(
                f"no radiographs to estimate in {', '.join(str(i) for i in images)} "
                f"({len(batch.skipped)} files skipped, "
                f"listed in {out / 'skipped.csv'})"
            )
    if as_json:
        typer.echo(json.dumps(batch.results + batch.failures, indent=2))
    tail = f"   failures: {out / 'failures.csv'}" if batch.failures else ""
    if batch.skipped:
        tail += f"   {len(batch.skipped)} files skipped: {out / 'skipped.csv'}"
    typer.echo(
        f"{len(batch.results)} hips of {batch.images_done} images estimated, "
        f"{len(batch.failures)} images failed; results: {out / 'results.csv'}{tail}",
        err=as_json,
    )
    typer.echo("research use only, not for diagnosis", err=True)
    if batch.failures and not batch.results:
        raise typer.Exit(code=1)
    if batch.failures:
        raise typer.Exit(code=2)


def _err():
    import sys

    return sys.stderr


def _out():
    import sys

    return sys.stdout


def _dicom_writer(folder: Path):
    from xbmd.pacs.outputs import dicom_writer

    return dicom_writer(folder)
