"""`xbmd calibrate-model`: a model's 95 % interval and out-of-distribution score."""

from __future__ import annotations

from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Calibrate a model's 95 % prediction interval and its out-of-distribution score on a held-out "
    "prepared dataset (`xbmd prepare`; its original radiographs must be reachable): the model is "
    "run end to end with test-time augmentation; the median offset of its estimates from the "
    "hips' references is taken out, the interval fitted by normalised split "
    "conformal prediction against the references, the score's threshold at the 99th "
    "percentile of the calibration images times a margin (docs/model-card.md). Writes a copy of "
    "the bundle carrying both; `xbmd estimate` with it reports an interval on every BMD and "
    "marks images above the threshold not confident (unfamiliar)."
)


def main(
    dataset: Path = typer.Argument(..., help="Held-out prepared dataset (xbmd prepare)."),
    out: Path = typer.Option(..., "--out", help="The calibrated bundle to write (.pt)."),
    model: Path | None = typer.Option(
        None, "--model", help="Model bundle to calibrate; default: the bundled one."
    ),
    target: str = typer.Option(
        "ct_abmd_g_cm2", "--target", help="The reference column the interval is fitted to."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    with user_errors():
        from tqdm import tqdm

        from xbmd.evaluation.calibrate import calibrate_model

        bar = (lambda items: tqdm(items, unit="image")) if progress else None
        summary = calibrate_model(model, dataset, out, target=target, progress=bar)
    typer.echo(
        f"calibrated on {summary['hips']} hips ({summary['radiographs_failed']} radiographs "
        f"failed): offset {summary['offset_g_cm2']:+.4f} g/cm2, interval +- {summary['q']:.2f} x "
        f"(TTA SD + {summary['sd_floor_g_cm2']:.4f}) g/cm2, feature score threshold "
        f"{summary['ood_threshold']:.2f}; model: {summary['model']}"
    )
