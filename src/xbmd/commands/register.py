"""`xbmd register`: 2D-3D registration of a CT's bones to one hip radiograph."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Register a CT's pelvis and femurs to one AP hip/pelvis radiograph (2D-3D, six parameters per "
    "bone): gradient correlation, CMA-ES then gradient refinement, pelvis first, then each femur "
    "near its acetabulum. Writes the poses (JSON, readable as known poses by `xbmd prepare`) and "
    "an overlay PNG of the bones' outlines on the radiograph. Exit code 0 when every bone "
    "registered well, 3 when one is flagged as untrustworthy (poses still written, with reasons)."
)
DEFAULT_LABEL_MAP = "pelvis_right=1;pelvis_left=2;femur_right=3;femur_left=4"


class Similarity(str, Enum):
    gc = "gc"
    ncc = "ncc"


class Strategy(str, Enum):
    cma_gradient = "cma+gradient"
    cma = "cma"
    gradient = "gradient"


def main(
    ct: Path = typer.Argument(..., help="CT (NIfTI, NRRD, MHA or a DICOM folder), in HU."),
    xray: Path = typer.Argument(..., help="The radiograph (DICOM, PNG, TIFF, JPEG)."),
    labels: Path = typer.Option(..., "--labels", help="Bone label map on the CT's grid."),
    out: Path = typer.Option(..., "--out", help="Output poses JSON."),
    label_map: str = typer.Option(
        DEFAULT_LABEL_MAP, "--label-map", help="Which label is which bone: name=id;..."
    ),
    landmarks: Path | None = typer.Option(
        None, "--landmarks", help="Femur landmarks JSON (head centres); else estimated."
    ),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Calibration JSON (xbmd calibrate): render bones as mineral density. Without it "
        "they render as attenuation from HU (poses do not need a calibration).",
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Start from these poses (a poses JSON) instead of the default AP."
    ),
    overlay: Path | None = typer.Option(
        None, "--overlay", help="Overlay PNG (default: next to --out, .png)."
    ),
    pixel_spacing: float | None = typer.Option(
        None, "--pixel-spacing", help="Detector pixel spacing, mm, when the file has none."
    ),
    similarity: Similarity = typer.Option(Similarity.gc, help="Similarity measure."),
    strategy: Strategy = typer.Option(Strategy.cma_gradient, help="Search strategy."),
    seed: int = typer.Option(0, help="Seed of the CMA-ES search."),
) -> None:
    with user_errors():
        import time

        from xbmd.ct.calibration import Calibration
        from xbmd.ct.landmarks import read_landmarks
        from xbmd.dataset.manifest import parse_label_map
        from xbmd.errors import InputError, XbmdError
        from xbmd.io.ct import read_ct, read_labels
        from xbmd.io.xray import read_xray, xray_geometry
        from xbmd.registration.optimise import RegistrationSettings
        from xbmd.registration.overlay import write_registration_overlay
        from xbmd.registration.result import read_poses
        from xbmd.registration.scene import build_scene
        from xbmd.registration.xray import register_xray
        from xbmd.stages import check_output_file

        check_output_file(out, "poses JSON")
        check_output_file(overlay or out.with_suffix(".png"), "overlay PNG")
        t0 = time.perf_counter()
        volume = read_ct(ct)
        lab = read_labels(labels, volume)
        if calibration is not None:
            volume = Calibration.from_json(calibration).apply(volume)
        lm = read_landmarks(landmarks) if landmarks else None
        scene = build_scene(volume, lab, parse_label_map(label_map, "--label-map"), lm)
        try:
            image = read_xray(xray, pixel_spacing)
        except XbmdError:
            raise
        except Exception as exc:  # a reader's unexpected failure on a damaged file: one line
            reason = f"{type(exc).__name__}: {exc}"
            raise InputError(f"{xray}: unreadable radiograph ({reason})") from None
        xray_geometry(image)  # no pixel spacing, a bad distance: said before the work starts
        settings = RegistrationSettings(
            similarity=similarity.value, strategy=strategy.value, seed=seed
        )
        start = read_poses(init, xray) if init else None
        typer.echo(f"registering {xray.name}: ", nl=False)
        result = register_xray(
            scene,
            image,
            settings=settings,
            init=start,
            progress=lambda name: typer.echo(f"{name}... ", nl=False),
        )
        typer.echo("done")
        result.ct = str(ct)
        out.parent.mkdir(parents=True, exist_ok=True)
        result.write(out)
        png = overlay or out.with_suffix(".png")
        write_registration_overlay(image.pixels, scene, result, png, title=xray.name)
    for name, body in result.bodies.items():
        rx, ry, rz, tx, ty, tz = body.pose.vector
        state = "FLAGGED (" + "; ".join(body.reasons) + ")" if body.flagged else "good"
        typer.echo(
            f"  {name:12s} rot ({rx:+6.1f}, {ry:+6.1f}, {rz:+6.1f}) deg  "
            f"shift ({tx:+6.1f}, {ty:+6.1f}, {tz:+6.1f}) mm  "
            f"similarity {body.similarity:.3f}  {body.time_s:5.1f} s  {state}"
        )
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"poses: {out}   overlay: {png}   ({time.perf_counter() - t0:.0f} s)")
    if result.flagged:
        typer.echo("error: registration flagged as untrustworthy; check the overlay", err=True)
        raise typer.Exit(code=3)
