"""The ``xbmd`` command line.

Thin: each command parses arguments and calls a library function.

Heavy modules (torch, SimpleITK, pydicom) are imported inside the commands, so that
``xbmd --help`` is fast. Every command module lives in ``xbmd.commands`` and exposes ``main``.
"""

from __future__ import annotations

import typer

from xbmd.commands import calibrate as _calibrate
from xbmd.commands import calibrate_model as _calibrate_model
from xbmd.commands import demo as _demo
from xbmd.commands import drr as _drr
from xbmd.commands import dxa as _dxa
from xbmd.commands import estimate as _estimate
from xbmd.commands import evaluate as _evaluate
from xbmd.commands import landmarks as _landmarks
from xbmd.commands import prepare as _prepare
from xbmd.commands import register as _register
from xbmd.commands import serve as _serve
from xbmd.commands import synth as _synth
from xbmd.commands import train as _train

app = typer.Typer(
    name="xbmd",
    help=(
        "Bone mineral density from a plain hip X-ray: CT calibration, DRR rendering, "
        "a virtual QCT cohort and more."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("calibrate", help=_calibrate.HELP)(_calibrate.main)
app.command("drr", help=_drr.HELP)(_drr.main)
app.command("synth", help=_synth.HELP)(_synth.main)
app.command("landmarks", help=_landmarks.HELP)(_landmarks.main)
app.command("register", help=_register.HELP)(_register.main)
app.command("prepare", help=_prepare.HELP)(_prepare.main)
app.command("estimate", help=_estimate.HELP)(_estimate.main)
app.command("train", help=_train.HELP)(_train.main)
app.command("evaluate", help=_evaluate.HELP)(_evaluate.main)
app.command("calibrate-model", help=_calibrate_model.HELP)(_calibrate_model.main)
app.add_typer(_dxa.app, name="dxa", help=_dxa.HELP)
app.command("serve", help=_serve.HELP)(_serve.main)
app.command("demo-ct", help=_demo.HELP)(_demo.main)


def _print_version(value: bool) -> None:
    if value:
        from xbmd import __version__

        typer.echo(f"xbmd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),
) -> None:
    """Eager options only; the commands do the work."""


if __name__ == "__main__":
    app()
