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
        help="Detector pixel spacing, mm (needed for images without one: PNG, JPEG, some TIFF).",
    ),
    reference: Reference = typer.Option(
        _DEFAULT_REFERENCE,
        "--reference",
        help="T-score reference (default: ISCD, white women for everybody).",
    ),
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

        from xbmd.errors import InputError, XbmdError
        from xbmd.estimation.estimator import Estimator
        from xbmd.estimation.output import summary_line, write_csv, write_results
        from xbmd.io.inputs import gather_inputs, write_skipped

        gathered = gather_inputs(images)
        if gathered.skipped:
            write_skipped(gathered.skipped, out / "skipped.csv")
        images = gathered.images
        if not images:
            raise InputError(
                f"no radiographs to estimate ({len(gathered.skipped)} files skipped, "
                f"listed in {out / 'skipped.csv'})"
            )
        estimator = Estimator(model, reference=reference.value)
        names = _folder_names(images)
        results, failures = [], []
        bar = tqdm(images, unit="image", disable=not progress or len(images) < 2, file=_stderr())
        for path, name in zip(bar, names, strict=True):
            try:
                found = estimator.estimate(
                    path, pixel_spacing, unilateral.value if unilateral else None
                )
                if dicom_out is not None:
                    _write_dicom(found, path, dicom_out, name)
                write_results(found, out, name, figures=figures)
            except XbmdError as exc:
                failures.append({"image": str(path), "error": str(exc)})
                tqdm.write(f"error: {exc}", file=_stderr())
                continue
            for r in found:
                # stdout is for the JSON with --json; tqdm.write keeps the bar intact
                tqdm.write(summary_line(r), file=_stderr() if as_json else _stdout())
                r.xray = None  # the radiograph's pixels are not needed any more
            results.extend(found)
        if results:
            write_csv(results, out / "results.csv")
        if failures:
            _write_failures(failures, out / "failures.csv")
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results] + failures, indent=2))
    n_ok = len({r.image for r in results})
    tail = f"   failures: {out / 'failures.csv'}" if failures else ""
    if gathered.skipped:
        tail += f"   {len(gathered.skipped)} files skipped: {out / 'skipped.csv'}"
    typer.echo(
        f"{len(results)} hips of {n_ok} images estimated, {len(failures)} images failed; "
        f"results: {out / 'results.csv'}{tail}",
        err=as_json,
    )
    if failures and not results:
        raise typer.Exit(code=1)
    if failures:
        raise typer.Exit(code=2)


def _write_dicom(found: list, path: Path, folder: Path, name: str) -> None:
    """The SR and SC of one radiograph into ``folder``; their paths and UIDs into the results."""
    from tqdm import tqdm

    from xbmd.pacs.outputs import dicom_outputs, read_header, write_outputs

    if found[0].xray.meta.get("format") != "dicom":
        tqdm.write(f"{path}: not DICOM, no SR or SC written", file=_stderr())
        return
    written = write_outputs(dicom_outputs(read_header(path), found), folder, name)
    for r in found:
        r.files.update(written)


def _stderr():
    import sys

    return sys.stderr


def _stdout():
    import sys

    return sys.stdout


def _folder_names(images: list[Path]) -> list[str]:
    """One output folder per image: its stem, numbered when two images share one."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _write_failures(failures: list[dict], path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "error"])
        writer.writeheader()
        writer.writerows(failures)
