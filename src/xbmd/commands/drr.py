"""`xbmd drr`: render one DRR of a CT (or mineral-density) volume."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Render a DRR (virtual X-ray) of a volume: areal mineral density in g/cm2 (default) or an "
    "attenuation line integral, in perspective (radiograph) or parallel (DXA-like) geometry. "
    "Writes float32 OUT.npy and a PNG preview next to it."
)


class InputUnit(str, Enum):
    hu = "hu"
    mg_cm3 = "mg_cm3"
    per_cm = "per_cm"


class Quantity(str, Enum):
    density = "density"
    attenuation = "attenuation"


class GeometryKind(str, Enum):
    perspective = "perspective"
    parallel = "parallel"


class View(str, Enum):
    ap = "ap"
    pa = "pa"


def main(
    volume: Path = typer.Argument(..., help="CT or density volume (NIfTI, NRRD, MHA, DICOM dir)."),
    out: Path = typer.Option(..., "--out", help="Output .npy (float32); a .png preview is added."),
    input_unit: InputUnit = typer.Option(InputUnit.hu, help="Unit of the volume's values."),
    calibration: Path | None = typer.Option(
        None, help="Calibration JSON (xbmd calibrate); needed for density from HU."
    ),
    labels: Path | None = typer.Option(None, help="Label map on the volume's grid."),
    label: list[int] | None = typer.Option(
        None, "--label", help="Render only these label ids (repeat the option)."
    ),
    quantity: Quantity = typer.Option(
        Quantity.density, help="density: g/cm2; attenuation: line integral of 1/cm (unitless)."
    ),
    geometry: GeometryKind = typer.Option(GeometryKind.perspective, help="Projection geometry."),
    view: View = typer.Option(View.ap, help="ap: source anterior (beam A->P); pa: the reverse."),
    size: tuple[int, int] = typer.Option((256, 256), help="Detector rows and columns (H W)."),
    pixel_spacing: float | None = typer.Option(
        None,
        help="Pixel spacing in mm (at the detector for perspective). "
        "Default: the volume's projection fills the detector.",
    ),
    sdd: float = typer.Option(1100.0, help="Source-to-detector distance, mm (perspective)."),
    sod: float = typer.Option(950.0, help="Source-to-isocentre distance, mm (perspective)."),
    pose: tuple[float, float, float, float, float, float] = typer.Option(
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        help="RX RY RZ (degrees, about room x, y, z in that order) TX TY TZ (mm), "
        "applied around the isocentre.",
    ),
    isocenter: tuple[float, float, float] | None = typer.Option(
        None, help="CT-world point (LPS mm) placed at the isocentre. Default: volume centre."
    ),
    oversample: int = typer.Option(1, min=1, help="Samples per voxel plane along the rays."),
) -> None:
    with user_errors():
        import numpy as np
        import torch

        from xbmd.display import write_preview_png
        from xbmd.drr import prepare_volume, render
        from xbmd.errors import InputError
        from xbmd.geometry import ParallelGeometry, PerspectiveGeometry
        from xbmd.io.ct import read_labels, read_volume

        if out.suffix != ".npy":
            raise InputError(f"--out must end in .npy, got {out}")
        unit = {"hu": "HU", "mg_cm3": "mg/cm3", "per_cm": "1/cm"}[input_unit.value]
        vol = read_volume(volume, unit=unit)
        cal = None
        if calibration is not None:
            from xbmd.ct.calibration import Calibration

            cal = Calibration.from_json(calibration)
        lab = read_labels(labels, reference=vol) if labels is not None else None
        if label and lab is None:
            raise InputError("--label needs --labels LABELS")
        body = prepare_volume(
            vol,
            quantity.value,
            calibration=cal,
            labels=lab,
            label_ids=label or None,
            isocenter_mm=None if isocenter is None else np.asarray(isocenter),
        )
        if quantity == Quantity.density and vol.unit == "HU":
            for line in _density_warnings(vol, body, lab, label):
                typer.echo(f"warning: {line}", err=True)
        spacing = pixel_spacing or _fill_spacing(vol, size, sdd / sod, geometry.value)
        if geometry == GeometryKind.perspective:
            geo = PerspectiveGeometry(sdd, sod, size, spacing, view=view.value)
        else:
            geo = ParallelGeometry(size, spacing, view=view.value)
        with torch.no_grad():
            image = render(body, torch.tensor(pose), geo, oversample=oversample)[0].numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, image.astype(np.float32))
        preview = out.with_suffix(".png")
        unit = body.output_unit
        write_preview_png(image, preview, unit=unit, title=f"{volume.name} {quantity.value}")
        typer.echo(
            f"{out}: {size[0]}x{size[1]} {geometry.value} {view.value.upper()} DRR, "
            f"pixel {spacing:.3f} mm, {quantity.value} {unit}: "
            f"max {image.max():.4f}, mean over non-zero {image[image > 0].mean():.4f}"
        )
        typer.echo(f"preview: {preview}")


def _fill_spacing(vol, size: tuple[int, int], magnification: float, geometry: str) -> float:
    """Pixel spacing (mm) at which the volume's L-R and S-I extent fills the detector."""
    import numpy as np

    i, j, k = (np.asarray(vol.size_ijk) - 1).tolist()
    corners = vol.index_to_world(
        np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
    )
    extent = np.ptp(corners, axis=0)  # LPS mm; an AP view sees x (L-R) and z (S-I)
    mag = magnification if geometry == "perspective" else 1.0
    return float(max(extent[0] / size[1], extent[2] / size[0])) * mag * 1.05


def _density_warnings(vol, body, labels, label_ids) -> list[str]:
    """Why a density rendering of a CT may not be mineral: soft tissue and contrast medium.

    The calibration line maps fat and lung below 0 mg/cm3 and iodine above it; only bone labels
    make the rendering a bone mineral image.
    """
    import numpy as np

    values = body.data.numpy()
    rendered = values[values != 0]
    lines = []
    negative = float((rendered < -20.0).mean()) if rendered.size else 0.0
    if negative > 0.05:
        lines.append(
            f"density mode outside bone: {100 * negative:.0f} % of the rendered voxels hold "
            f"negative 'mineral' (fat, lung; down to {rendered.min():.0f} mg/cm3), which "
            "subtracts from the g/cm2; render bone labels only (--labels L --label ID)"
        )
    if not label_ids:
        from xbmd.ct.contrast import detect_contrast

        check = detect_contrast(vol, labels)
        if check.contrast:
            lines.append(
                f"contrast medium detected ({check.evidence}): it renders as mineral; render "
                "bone labels only (--labels L --label ID)"
            )
    elif rendered.size and np.median(rendered) < 50.0:
        lines.append(
            f"the rendered labels {label_ids} have a median density of "
            f"{np.median(rendered):.0f} mg/cm3: not bone?"
        )
    return lines
