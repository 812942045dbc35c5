"""A case's radiograph as ``xbmd prepare`` reads it: the file, completed by what the manifest says
about it (``xray_pixel_spacing_mm``, ``xray_sdd_mm``, ``xray_sod_mm``; docs/data-format.md).

PNG, JPEG and TIFF files carry no pixel spacing and no source distances; DICOM files usually
do. The manifest's values are used for every format: the spacing through
``read_xray(pixel_spacing_mm=...)`` (recorded as spacing source ``user``, the file's own value
kept in ``meta['file_spacing_mm']``), the distances in ``XRay.meta`` (``sdd_mm``, ``sod_mm``, the
file's own in ``meta['file_sdd_mm']``, ``meta['file_sod_mm']``), where
``xbmd.io.xray.xray_geometry`` finds them. A value that disagrees with the file's by more than
1 % is noted in the radiograph's warnings. A radiograph with no spacing at all is refused: its
geometry, and so its registration and DRRs, would be guesses.
"""

from __future__ import annotations

from pathlib import Path

from xbmd.dataset.manifest import RadiographInfo
from xbmd.errors import InputError
from xbmd.io.xray import XRay, read_xray

#: Relative disagreement between the manifest and the file that is noted in the warnings.
DISAGREEMENT = 0.01


def read_case_xray(path: str | Path, info: RadiographInfo | None = None) -> XRay:
    """Read a radiograph of a case with the manifest's spacing and distances.

    Raises InputError (naming the file) when no pixel spacing is known, from the file or the
    manifest.

    Examples
    --------
    >>> info = RadiographInfo(pixel_spacing_mm=(0.15, 0.15), sdd_mm=1100.0, sod_mm=950.0)
    >>> xray = read_case_xray("hip.png", info)  # doctest: +SKIP
    >>> xray.spacing_source, xray.meta["sdd_mm"]  # doctest: +SKIP
    ('user', 1100.0)
    """
    info = info or RadiographInfo()
    xray = read_xray(path, info.pixel_spacing_mm)
    if xray.pixel_spacing_mm is None:
        fmt = str(xray.meta.get("format") or "image").upper()
        raise InputError(
            f"{path}: this {fmt} radiograph has no pixel spacing; give the detector pixel "
            "spacing (mm) in the manifest's xray_pixel_spacing_mm column (and the distances in "
            "xray_sdd_mm, xray_sod_mm)"
        )
    for key, value in (("sdd_mm", info.sdd_mm), ("sod_mm", info.sod_mm)):
        if value is None:
            continue
        file_value = xray.meta.get(key)
        xray.meta[f"file_{key}"] = file_value
        if file_value and abs(value - file_value) > DISAGREEMENT * file_value:
            xray.warnings.append(
                f"manifest xray_{key} {value:g} mm overrides {file_value:g} mm from the file"
            )
        xray.meta[key] = float(value)
    if info.sdd_mm is not None and info.sod_mm is None:
        sod = xray.meta.get("sod_mm")
        if sod and sod >= info.sdd_mm:  # the file's SOD no longer fits the manifest's SDD
            xray.meta["sod_mm"] = None
    return xray
