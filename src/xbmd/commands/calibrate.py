"""`xbmd calibrate`: fit a CT's HU -> mg/cm3 hydroxyapatite line and write it as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xbmd.commands._common import user_errors

HELP = """Calibrate a CT: fit density (mg/cm3 hydroxyapatite) = slope * HU + intercept.

With a phantom: xbmd calibrate CT --labels RODS --phantom bmas200 --out cal.json
(--phantom takes a phantom JSON file or a bundled name; RODS labels each rod with its label).
Without --labels the rods of a phantom with a layout (bmas200) are found automatically, and a QC
picture with the rods outlined is written next to the output (--qc to choose its path).

Without one: xbmd calibrate CT --phantomless --out cal.json [--kvp 120]
(air, fat and muscle found automatically; or give --labels L --tissue-labels air=1,fat=2,muscle=3;
--labels alone takes a TotalSegmentator output (folder, --ml file or DICOM SEG) and uses its
muscles and fat). A contrast-enhanced CT is detected and refused without muscle labels, unless
--allow-contrast. Phantom-less calibration is less exact: see docs/calibration.md.
"""


def main(
    ct: Annotated[
        Path,
        typer.Argument(metavar="CT", help="CT in HU: NIfTI, NRRD, MetaImage or a DICOM series."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")],
    labels: Annotated[
        Path | None,
        typer.Option(help="Label map on the CT grid: phantom rods, or reference tissues."),
    ] = None,
    phantom: Annotated[
        str | None,
        typer.Option(help="Phantom description JSON, or a bundled phantom name (bmas200)."),
    ] = None,
    phantomless: Annotated[
        bool, typer.Option("--phantomless", help="Calibrate from air, fat and muscle, no phantom.")
    ] = False,
    tissue_labels: Annotated[
        str | None,
        typer.Option(help="Tissue label values in --labels, e.g. air=1,fat=2,muscle=3."),
    ] = None,
    kvp: Annotated[
        float | None,
        typer.Option(help="Tube voltage (phantom-less); default from DICOM, else 120 assumed."),
    ] = None,
    no_erode: Annotated[
        bool, typer.Option("--no-erode", help="Use whole regions (default: erode one voxel).")
    ] = False,
    allow_contrast: Annotated[
        bool,
        typer.Option(
            "--allow-contrast",
            help="Phantom-less: go on (with a warning) when contrast medium is detected and no "
            "muscle is labelled.",
        ),
    ] = False,
    qc: Annotated[
        Path | None,
        typer.Option(help="QC picture of automatically found rods (default: OUT_rods.png)."),
    ] = None,
    save_rods: Annotated[
        Path | None,
        typer.Option(help="Write the automatically found rods as a label map (NIfTI, NRRD...)."),
    ] = None,
) -> None:
    with user_errors():
        from xbmd.ct import calibration
        from xbmd.errors import InputError
        from xbmd.io.ct import read_ct, read_labels
        from xbmd.stages import check_output_file

        if phantomless == (phantom is not None):
            raise InputError("give either --phantom P.json (or a bundled name) or --phantomless")
        if tissue_labels is not None and labels is None:
            raise InputError("--tissue-labels needs --labels: the label map they refer to")
        check_output_file(out, "calibration JSON")
        for extra, what in ((qc, "QC picture"), (save_rods, "rod label map")):
            if extra is not None:
                check_output_file(extra, what)

        if phantom is not None and labels is None:
            from dataclasses import replace

            from xbmd.ct.rods import find_rods, write_rods_qc_png
            from xbmd.io.ct import write_volume

            description = calibration.load_phantom(phantom)
            if description.layout is None:
                raise InputError(
                    f"phantom {phantom!r} has no layout, so its rods cannot be found "
                    "automatically: give --labels, a label map of its rods"
                )
            volume = read_ct(ct)
            found = find_rods(volume, description)
            result = calibration.phantom_calibration(
                volume, found.labels, description, erode=not no_erode
            )
            result = replace(result, notes=(*result.notes, *found.notes))
            picture = write_rods_qc_png(
                found, volume, qc or out.with_name(f"{out.stem}_rods.png"), result
            )
            typer.echo(f"rods QC picture: {picture}")
            if save_rods is not None:
                write_volume(found.labels, save_rods)
                typer.echo(f"rod labels: {save_rods}")
        elif phantom is not None:
            description = calibration.load_phantom(phantom)  # before reading a large CT
            volume = read_ct(ct)
            rods = read_labels(labels, reference=volume)
            result = calibration.phantom_calibration(volume, rods, description, erode=not no_erode)
        elif tissue_labels is not None:
            tissues = calibration.parse_tissue_labels(tissue_labels)
            volume = read_ct(ct)
            tissue_map = read_labels(labels, reference=volume)
            result = calibration.phantomless_calibration(
                volume, tissue_map, tissues, kvp=kvp, erode=not no_erode
            )
        else:
            from xbmd.ct.contrast import phantomless_with_labels

            volume = read_ct(ct)
            tissue_map = read_labels(labels, reference=volume) if labels is not None else None
            result, _ = phantomless_with_labels(volume, tissue_map, kvp, allow_contrast)
        result.to_json(out)
        typer.echo(result.summary())
        typer.echo(f"wrote {out}")
