"""`xbmd train`: hierarchical learning (stages 1-3) and the hip localiser into a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from xbmd.commands._common import user_errors
from xbmd.errors import InputError

HELP = (
    "Train the decomposition network in three stages (1: X-ray -> hip-bone DRR; 2: -> "
    "proximal-femur DRR, from stage 1; 3: regression head for the BMD targets, fine-tuned) and "
    "the hip localiser on a dataset written by `xbmd prepare`. Patients are split into training "
    "and validation sets (no patient in both). Each stage checkpoints every epoch and resumes "
    "when re-run into the same folder; a finished stage is skipped. Writes RUN/model.pt for "
    "`xbmd estimate --model`. Config keys and defaults: docs/training.md and configs/. Exit "
    "code 0 when every sample was used, 2 when some could not be read (listed, left out, the "
    "rest trained on), 1 on unusable input."
)


def main(
    dataset: Path = typer.Argument(..., help="Dataset folder written by `xbmd prepare`."),
    out: Path = typer.Option(..., "--out", help="Run folder (new, or one to resume)."),
    config: Path = typer.Option(
        None, "--config", help="YAML config (configs/*.yaml); default: the built-in defaults."
    ),
    stages: str = typer.Option(
        "1,2,3,loc", "--stages", help="Comma list of stages to run: 1, 2, 3, loc (localiser)."
    ),
    devices: int = typer.Option(
        1, "--devices", min=1, help="Processes/GPUs (DDP when > 1; on CPU, one process each)."
    ),
    accelerator: str = typer.Option(
        "auto", "--accelerator", help="Lightning accelerator: auto, cpu, gpu."
    ),
    max_steps: int = typer.Option(
        0, "--max-steps", min=0, help="Cap optimiser steps per stage (0: no cap; smoke tests)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    with user_errors():
        from xbmd.learn import config as cfg

        try:
            from xbmd.learn.train import train
        except ImportError as exc:
            raise InputError(
                f"training needs the 'train' extra ({exc.name} is missing): "
                "pip install 'xbmd[train]'"
            ) from None

        resolved = cfg.load_config(config)
        summary = train(
            dataset,
            out,
            resolved,
            stages=cfg.parse_stages(stages),
            devices=devices,
            accelerator=accelerator,
            progress=progress,
            max_steps=max_steps or None,
        )
    for line in summary.get("warnings", []):
        typer.echo(f"warning: {line}", err=True)
    skipped = summary.get("skipped_samples", [])
    for item in skipped[:10]:
        typer.echo(f"SKIPPED {item['sample_id']}: {item['error']}", err=True)
    if len(skipped) > 10:
        typer.echo(f"... and {len(skipped) - 10} more (train.json)", err=True)
    for stage, result in summary.get("stages", {}).items():
        if "skipped" in result:
            typer.echo(f"stage {stage}: skipped ({result['skipped']})")
        else:
            typer.echo(f"stage {stage}: {result.get('seconds', 0):.0f} s")
    if summary.get("model"):
        typer.echo(f"model: {summary['model']}")
    if skipped:
        raise typer.Exit(code=2)
