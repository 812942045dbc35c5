"""`xbmd serve`: the Orthanc-connected service with its web worklist."""

from __future__ import annotations

from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Run next to an Orthanc PACS: follow Orthanc's change feed, queue every new instance in a "
    "durable SQLite queue (STATE_DIR/jobs.sqlite), estimate the DX/CR hip radiographs that pass "
    "the filters (others are recorded as skipped), and store a TID 1500 measurement report (SR) "
    "and a Secondary Capture of the overlay back into the radiograph's study in Orthanc, marked "
    "preliminary and research use only. A job interrupted by a kill is redone at the next start; "
    "the outputs' UIDs are derived from the source instance and the model, so nothing is stored "
    "twice. The same process serves the web worklist (127.0.0.1:8765 by default, token "
    "required). Everything is set in one YAML file (docs/pacs.md). Stops cleanly on SIGTERM or "
    "Ctrl-C."
)


def main(
    config: Path = typer.Option(..., "--config", help="The service's YAML configuration file."),
    verbose: bool = typer.Option(False, "--verbose", help="Log every job, skipped ones too."),
) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "PIL", "matplotlib", "multipart", "python_multipart", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with user_errors():
        from xbmd.errors import InputError
        from xbmd.pacs.config import load_config
        from xbmd.pacs.service import serve
        from xbmd.stages import check_output_folder

        settings = load_config(config)
        try:
            check_output_folder(settings.state_dir)
        except InputError as exc:
            raise InputError(f"{config}: state_dir: {exc}") from None
        serve(settings)
