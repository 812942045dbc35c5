"""`xbmd prepare`: build the training set (hip crops, DRRs, labels) from a case manifest."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Build the training set from a case manifest: for every radiograph and hip, a 256 x 256 "
    "crop of the radiograph (0.75 mm detector pixels, left hips mirrored), DRRs of the "
    "calibrated CT in the bones' poses (hip bones, proximal femur, its region mask), and the "
    "labels (QCT vBMD, DXA-like aBMD, DRR BMD, DXA when given). Poses are registered (saved and "
    "reused) or, with --known-poses, read from the manifest's known_poses files. Re-running "
    "into the same folder resumes. Exit code 0 when every sample was written, 2 when some "
    "failed (listed in failures.csv, the rest written), 1 when none could be."
)


class Similarity(str, Enum):
    gc = "gc"
    ncc = "ncc"


def main(
    manifest: Path = typer.Argument(..., help="Case manifest CSV (docs/data-format.md)."),
    out: Path = typer.Option(..., "--out", help="Dataset folder (new, or one to resume)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Parallel cases (0: all cores)."),
    known_poses: bool = typer.Option(
        False, "--known-poses", help="Use the manifest's known poses instead of registering."
    ),
    keep_flagged: bool = typer.Option(
        False,
        "--keep-flagged",
        help="Write samples of flagged registrations (quality 'flagged') instead of failing them.",
    ),
    similarity: Similarity = typer.Option(
        Similarity.gc, "--similarity", help="Registration similarity: gradient correlation or NCC."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    with user_errors():
        import os

        from xbmd.dataset.prepare import prepare_dataset
        from xbmd.registration.optimise import RegistrationSettings

        summary = prepare_dataset(
            manifest,
            out,
            workers=workers or os.cpu_count() or 1,
            use_known_poses=known_poses,
            keep_flagged=keep_flagged,
            settings=RegistrationSettings(similarity=similarity.value),
            progress=progress,
        )
    typer.echo(
        f"{summary['samples_written']} samples written, {summary['samples_skipped']} already "
        f"there, {summary['samples_failed']} failed in {summary['seconds']:.1f} s "
        f"({summary['samples_per_minute']:.1f} samples per minute)"
    )
    failures = summary["failures"]
    for failure in failures[:10]:
        where = " ".join(s for s in (failure["case_id"], failure["xray"], failure["side"]) if s)
        typer.echo(f"FAILED {where} [{failure['stage']}]: {failure['error']}", err=True)
    if len(failures) > 10:
        typer.echo(f"... and {len(failures) - 10} more failures", err=True)
    typer.echo(
        f"index: {out / 'index.csv'} ({summary['samples_in_index']} samples)"
        + (f"   failures: {out / 'failures.csv'}" if failures else "")
    )
    if failures and not summary["samples_in_index"]:
        raise typer.Exit(code=1)
    if failures:
        raise typer.Exit(code=2)
