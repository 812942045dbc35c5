"""What a registration gives: per body its pose, similarity and quality flag; the poses JSON
(``xbmd register``'s output, readable as known poses) and accuracy measures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd.errors import GeometryError, InputError
from xbmd.geometry import BodyPose, PerspectiveGeometry

POSES_FORMAT = "xbmd-registration"


@dataclass
class BodyResult:
    """The registered pose of one body and how much to trust it."""

    name: str
    pose: BodyPose
    similarity: float
    flagged: bool
    reasons: list[str] = field(default_factory=list)
    time_s: float = 0.0
    evaluations: int = 0
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.pose.to_dict() | {
            "similarity": round(self.similarity, 5),
            "quality": "flagged" if self.flagged else "good",
            "reasons": self.reasons,
            "time_s": round(self.time_s, 2),
            "evaluations": self.evaluations,
            "trace": self.trace,
        }


@dataclass
class Registration:
    """Poses of every registered body in one radiograph's geometry."""

    geometry: PerspectiveGeometry
    bodies: dict[str, BodyResult]
    similarity_kind: str = "gc"
    warnings: list[str] = field(default_factory=list)
    xray: str | None = None
    ct: str | None = None

    @property
    def flagged(self) -> bool:
        return any(b.flagged for b in self.bodies.values())

    def poses(self) -> dict[str, BodyPose]:
        return {n: b.pose for n, b in self.bodies.items()}

    def to_dict(self) -> dict:
        return {
            "format": POSES_FORMAT,
            "format_version": 1,
            "xray": self.xray,
            "ct": self.ct,
            "geometry": self.geometry.to_dict(),
            "similarity": self.similarity_kind,
            "quality": "flagged" if self.flagged else "good",
            "warnings": self.warnings,
            "poses": {n: b.to_dict() for n, b in self.bodies.items()},
        }

    def write(self, path: str | Path) -> None:
        """Write the JSON (atomically: a temporary file renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)


def read_poses(path: str | Path, xray: str | Path | None = None) -> dict[str, BodyPose]:
    """Body poses from a registration JSON (``xbmd register``) or a virtual case's truth.json.

    A truth.json holds one entry per radiograph; ``xray`` (its file name) picks the entry.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such poses file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    if isinstance(doc, dict) and "xrays" in doc:
        name = Path(xray).name if xray is not None else None
        entries = [e for e in doc["xrays"] if name in (e.get("dicom"), e.get("png"), e.get("name"))]
        if not entries:
            raise InputError(f"{path}: no poses for X-ray {name!r}")
        doc = entries[0]
    if not isinstance(doc, dict) or not isinstance(doc.get("poses"), dict):
        raise InputError(f"{path}: no 'poses' section (expected xbmd register output)")
    try:
        return {n: BodyPose.from_dict(d) for n, d in doc["poses"].items()}
    except GeometryError as e:
        raise InputError(f"{path}: {e}") from None


def projected_distance_mm(
    points_mm: np.ndarray, pose_a: BodyPose, pose_b: BodyPose, geometry: PerspectiveGeometry
) -> np.ndarray:
    """Distance (mm, at the detector) between the projections of CT points under two poses."""
    a = geometry.project(pose_a.points_to_room(points_mm))
    b = geometry.project(pose_b.points_to_room(points_mm))
    spacing = np.asarray(geometry.pixel_spacing_mm, dtype=float)
    return np.linalg.norm((a - b) * spacing, axis=1)


def rotation_error_deg(pose_a: BodyPose, pose_b: BodyPose) -> float:
    """Angle (degrees) of the rotation between two poses' orientations."""
    r = pose_a.transform.rotation_matrix @ pose_b.transform.rotation_matrix.T
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
