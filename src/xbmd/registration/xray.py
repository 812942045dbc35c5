"""One radiograph's bone poses: registered (the recipe ``xbmd register`` and ``xbmd prepare``
share), read back from a registration JSON, or known (a virtual case's truth)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import GeometryError, InputError
from xbmd.geometry import BodyPose, PerspectiveGeometry
from xbmd.io.xray import XRay, xray_geometry
from xbmd.registration.optimise import RegistrationSettings, register
from xbmd.registration.result import Registration, read_poses
from xbmd.registration.scene import Scene


def register_xray(
    scene: Scene,
    xray: XRay,
    settings: RegistrationSettings | None = None,
    init: dict[str, BodyPose] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Registration:
    """Register the bodies of ``scene`` to a radiograph read with ``xbmd.io.xray.read_xray``.

    The geometry comes from the file (:func:`xbmd.io.xray.xray_geometry`); the result carries
    the radiograph's path and every warning (the file's, the geometry's, the registration's).
    """
    geometry, warnings = xray_geometry(xray)
    result = register(scene, xray.pixels, geometry, settings=settings, init=init, progress=progress)
    result.xray = str(xray.source) if xray.source else None
    result.warnings = [*xray.warnings, *warnings, *result.warnings]
    return result


@dataclass
class XrayPoses:
    """The bones' poses in one radiograph, where they came from and how good they are."""

    poses: dict[str, BodyPose]
    geometry: PerspectiveGeometry
    source: str  # 'registered' or 'known'
    file: str
    quality: dict[str, str] = field(default_factory=dict)  # body -> 'good' | 'flagged' | 'known'
    similarity: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def quality_text(self) -> str:
        return ", ".join(
            f"{n} {self.quality[n]} {self.similarity.get(n, float('nan')):.3f}"
            + (f" [{'; '.join(self.reasons[n])}]" if self.reasons.get(n) else "")
            for n in self.poses
        )


def saved_registration(path: Path, xray: XRay, file: str | None = None) -> XrayPoses:
    """A registration JSON (``Registration.write``) read back, with each body's quality."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable registration ({exc})") from None
    bodies = doc.get("poses", {})
    return XrayPoses(
        poses=read_poses(path),
        geometry=geometry_of(doc, xray, path),
        source="registered",
        file=file or str(path),
        quality={n: b.get("quality", "good") for n, b in bodies.items()},
        similarity={n: float(b["similarity"]) for n, b in bodies.items() if "similarity" in b},
        reasons={n: list(b.get("reasons", [])) for n, b in bodies.items()},
        warnings=list(doc.get("warnings", [])),
    )


def known_poses(path: Path, xray: XRay, xray_path: Path) -> XrayPoses:
    """Known poses of one radiograph (a virtual case's truth.json, or a registration JSON).

    The poses hold in the geometry stored with them, when there is one (the truth's exact SOD
    and principal point), else in the geometry of the radiograph's file.
    """
    poses = read_poses(path, xray=xray_path)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if "xrays" in doc:  # truth.json: the entry of this radiograph (read_poses found it)
        name = Path(xray_path).name
        doc = next(e for e in doc["xrays"] if name in (e.get("dicom"), e.get("png"), e.get("name")))
    return XrayPoses(
        poses=poses,
        geometry=geometry_of(doc, xray, path),
        source="known",
        file=str(path),
        quality={n: "known" for n in poses},
    )


def geometry_of(doc: dict, xray: XRay, path: Path) -> PerspectiveGeometry:
    """The geometry stored in a poses document, checked against the radiograph's size."""
    if "geometry" not in doc:
        return xray_geometry(xray)[0]
    try:
        geometry = PerspectiveGeometry.from_dict(doc["geometry"])
    except (GeometryError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable geometry ({exc})") from None
    if tuple(geometry.size_px) != tuple(xray.pixels.shape):
        raise InputError(
            f"{path}: its geometry is {geometry.size_px[0]} x {geometry.size_px[1]} pixels but the "
            f"X-ray {xray.source} has {xray.pixels.shape[0]} x {xray.pixels.shape[1]}"
        )
    return geometry
