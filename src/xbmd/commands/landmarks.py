"""`xbmd landmarks`: femur landmarks found from the femur labels, with QC pictures."""

from __future__ import annotations

from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Find each femur's landmarks (head centre and radius, neck and shaft axes, neck centre, "
    "head-neck junction, greater and lesser trochanters; LPS mm) from its label, write them as "
    "a landmarks JSON (edit it and give it in a manifest's landmarks column to override) and a "
    "QC picture per femur next to it. LABELS: a label map, a TotalSegmentator folder or --ml "
    "file, or a DICOM SEG. Exit code 0 when every femur was found, 2 when some were not, 1 when "
    "none."
)


def main(
    labels: Path = typer.Argument(
        ..., metavar="LABELS", help="Label map (file, TotalSegmentator folder, SEG)."
    ),
    out: Path = typer.Option(..., "--out", help="Landmarks JSON to write."),
    label_map: str = typer.Option(
        "pelvis_right=1;pelvis_left=2;femur_right=3;femur_left=4",
        "--label-map",
        help="Which label is which femur: name=id;... or the preset totalsegmentator.",
    ),
    qc: Path | None = typer.Option(
        None, "--qc", help="Folder for the QC pictures (default: next to --out)."
    ),
) -> None:
    with user_errors():
        from xbmd.ct.auto_landmarks import case_landmarks
        from xbmd.ct.landmarks import write_landmarks
        from xbmd.dataset.manifest import parse_label_map
        from xbmd.errors import InputError
        from xbmd.io.ct import read_labels
        from xbmd.stages import check_output_file, check_output_folder

        check_output_file(out, "landmarks JSON")
        if qc is not None:
            check_output_folder(qc)
        bones = parse_label_map(label_map, "--label-map")
        if not {"femur_left", "femur_right"} & set(bones):
            raise InputError(f"--label-map {label_map!r} names no femur")
        volume = read_labels(labels)
        folder = qc or out.parent
        found, errors = case_landmarks(volume, bones, folder, f"{out.stem}_")
        for side in sorted(errors):
            typer.echo(f"FAILED {side} femur: {errors[side]}", err=True)
        if not found:
            raise typer.Exit(code=1)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_landmarks(found, out)
        for side, lm in sorted(found.items()):
            typer.echo(
                f"{side} femur: head {[round(v, 1) for v in lm.head_center_mm]} mm, radius "
                f"{lm.head_radius_mm:.1f} mm, neck-shaft angle "
                f"{lm.extra['neck_shaft_angle_deg']:.1f} deg; QC {folder}/{out.stem}_femur_{side}"
                "_landmarks.png"
            )
        typer.echo(f"wrote {out}")
    if errors:
        raise typer.Exit(code=2)
