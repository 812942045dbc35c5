"""`xbmd drr`: render one DRR of a CT (or mineral-density) volume."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Render a DRR (virtual X-ray) of a volume: areal mineral density in g/cm2 (default) or an "
    "attenuation line integral, in perspective (radiograph) or parallel (DXA-like) geometry. "
    "Writes float32 OUT.npy and a PNG preview next to it. --center-label ID centres the field on "
    "a label (e.g. one femur). Refused: an image with nothing in the field, and densities no "
    "tissue can have (a volume or calibration in g/cm3 or ug/cm3 instead of mg/cm3)."
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
    center_label: list[int] | None = typer.Option(
        None,
        "--center-label",
        help="Centre the field on these label ids of --labels (their bounding box; repeat the "
        "option); without --pixel-spacing the field then fits them, not the whole volume.",
    ),
    oversample: int = typer.Option(1, min=1, help="Samples per voxel plane along the rays."),
) -> None:
    with user_errors():
        import numpy as np
        import torch

        from xbmd.display import write_preview_png
        from xbmd.drr import label_corners_mm, prepare_volume, render
        from xbmd.errors import InputError
        from xbmd.geometry import ParallelGeometry, PerspectiveGeometry
        from xbmd.io.ct import read_labels, read_volume
        from xbmd.stages import check_output_file

        if out.suffix != ".npy":
            raise InputError(f"--out must end in .npy, got {out}")
        check_output_file(out, "DRR")
        if center_label and isocenter is not None:
            raise InputError("give --center-label or --isocenter, not both")
        unit = {"hu": "HU", "mg_cm3": "mg/cm3", "per_cm": "1/cm"}[input_unit.value]
        vol = read_volume(volume, unit=unit)
        cal = None
        if calibration is not None:
            from xbmd.ct.calibration import Calibration

            cal = Calibration.from_json(calibration)
        lab = read_labels(labels, reference=vol) if labels is not None else None
        if label and lab is None:
            raise InputError("--label needs --labels LABELS")
        if center_label and lab is None:
            raise InputError("--center-label needs --labels LABELS")
        corners = None
        if center_label:
            corners = label_corners_mm(lab, center_label)
            isocenter = tuple(corners.mean(axis=0))
        body = prepare_volume(
            vol,
            quantity.value,
            calibration=cal,
            labels=lab,
            label_ids=label or None,
            isocenter_mm=None if isocenter is None else np.asarray(isocenter),
        )
        if quantity == Quantity.density:
            _check_density_plausible(body, volume)
            if vol.unit == "HU":
                for line in _density_warnings(vol, body, lab, label):
                    typer.echo(f"warning: {line}", err=True)
        if corners is None:
            corners = _volume_corners_mm(vol)
        spacing = pixel_spacing or _fill_spacing(corners, size, sdd / sod, geometry.value)
        if geometry == GeometryKind.perspective:
            geo = PerspectiveGeometry(sdd, sod, size, spacing, view=view.value)
        else:
            geo = ParallelGeometry(size, spacing, view=view.value)
        with torch.no_grad():
            image = render(body, torch.tensor(pose), geo, oversample=oversample)[0].numpy()
        what = f"label(s) {label}" if label else f"{volume.name}"
        if not np.any(image != 0):
            raise InputError(
                f"{volume}: the DRR is empty: {what} project(s) outside the {size[0]}x{size[1]} "
                f"detector field of {spacing:.3g} mm pixels; centre the field on them with "
                "--center-label ID, or give a larger --pixel-spacing"
            )
        if label and _touches_edge(image):
            typer.echo(
                f"warning: {what} reach(es) the edge of the detector field: part of it is cut "
                "off; centre the field with --center-label ID or give a larger --pixel-spacing",
                err=True,
            )
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


def _volume_corners_mm(vol):
    """(8, 3) CT-world corners of the volume's grid."""
    import numpy as np

    i, j, k = (np.asarray(vol.size_ijk) - 1).tolist()
    return vol.index_to_world(
        np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
    )


def _fill_spacing(corners, size: tuple[int, int], magnification: float, geometry: str) -> float:
    """Pixel spacing (mm) at which the L-R and S-I extent of ``corners`` (the volume's or the
    centred labels' box) fills the detector."""
    import numpy as np

    extent = np.ptp(corners, axis=0)  # LPS mm; an AP view sees x (L-R) and z (S-I)
    mag = magnification if geometry == "perspective" else 1.0
    return float(max(extent[0] / size[1], extent[2] / size[0], 1.0 / max(size))) * mag * 1.05


def _touches_edge(image) -> bool:
    import numpy as np

    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return bool(np.any(np.abs(edges) > 1e-3 * np.abs(image).max()))


#: Mineral densities (mg/cm3 hydroxyapatite) no voxel can have: hydroxyapatite itself is 3160,
#: metal implants calibrate to at most about 25000 (31000 HU); fat and soft tissue sit above
#: -300. Beyond these the volume or its calibration is in another unit (1000x off).
DENSITY_LIMITS_MG_CM3 = (-5000.0, 50000.0)
#: The densest voxel of a rendering of bone is at least this (mg/cm3; cortical bone 800-1200).
MIN_PEAK_DENSITY_MG_CM3 = 50.0


def _check_density_plausible(body, source) -> None:
    """InputError when the voxels to render cannot be mineral densities in mg/cm3 (a volume or
    calibration in g/cm3 gives a DRR 1000x too small, one in ug/cm3 1000x too large)."""
    from xbmd.errors import InputError

    values = body.data
    lo, hi = float(values.min()), float(values.max())
    low, high = DENSITY_LIMITS_MG_CM3
    if lo < low or hi > high:
        raise InputError(
            f"{source}: densities {lo:.4g}..{hi:.4g} mg/cm3 are impossible (outside "
            f"{low:g}..{high:g}; hydroxyapatite itself is 3160): the volume or its calibration is "
            "in another unit (ug/cm3, or 1000x off?)"
        )
    if hi < MIN_PEAK_DENSITY_MG_CM3:
        raise InputError(
            f"{source}: the densest voxel to render is {hi:.4g} mg/cm3, below "
            f"{MIN_PEAK_DENSITY_MG_CM3:g}: no bone (cortical bone is 800-1200 mg/cm3); a volume "
            "or calibration in g/cm3 instead of mg/cm3 (1000x too small)?"
        )


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
