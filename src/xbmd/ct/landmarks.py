"""Anatomical landmarks of a proximal femur, in CT world coordinates (LPS, mm).

They define the standardised neutral pose and the regions of interest of ``xbmd.ct.femur`` (total
hip, femoral neck, proximal femur). The virtual cohort knows them exactly; for real CTs they come
from the manifest (a landmarks JSON per case).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.geometry import SIDES

_POINTS = (
    "head_center_mm",
    "head_neck_junction_mm",
    "neck_center_mm",
    "lesser_trochanter_mm",
    "greater_trochanter_mm",
)
_AXES = ("neck_axis", "shaft_axis")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v)
    if v.shape != (3,) or not np.isfinite(n) or n == 0:
        raise InputError(f"an axis must be a non-zero 3-vector, not {v.tolist()}")
    return v / n


@dataclass(frozen=True)
class FemurLandmarks:
    """Landmarks of one proximal femur (all points LPS mm in the CT world frame).

    side : 'left' or 'right' (the patient's side).
    head_center_mm : centre of the sphere fitted to the femoral head.
    head_radius_mm : its radius.
    neck_axis : unit vector along the femoral neck, from the head centre towards the trochanters.
    shaft_axis : unit vector along the femoral shaft, pointing proximally (towards the hip).
    head_neck_junction_mm : point on the neck axis where the head ends and the neck begins.
    neck_center_mm : point on the neck axis at the narrowest part of the neck (femoral-neck box).
    lesser_trochanter_mm, greater_trochanter_mm : tips of the trochanters.
    """

    side: str
    head_center_mm: np.ndarray
    head_radius_mm: float
    neck_axis: np.ndarray
    shaft_axis: np.ndarray
    head_neck_junction_mm: np.ndarray
    neck_center_mm: np.ndarray
    lesser_trochanter_mm: np.ndarray
    greater_trochanter_mm: np.ndarray
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise InputError(f"side must be 'left' or 'right', not {self.side!r}")
        for name in _POINTS:
            p = np.asarray(getattr(self, name), dtype=float)
            if p.shape != (3,) or not np.all(np.isfinite(p)):
                raise InputError(f"landmark {name} must be 3 finite numbers, not {p.tolist()}")
            object.__setattr__(self, name, p)
        for name in _AXES:
            object.__setattr__(self, name, _unit(getattr(self, name)))
        if not (np.isfinite(self.head_radius_mm) and self.head_radius_mm > 0):
            raise InputError(f"head_radius_mm must be > 0, not {self.head_radius_mm}")
        object.__setattr__(self, "head_radius_mm", float(self.head_radius_mm))

    def transformed(self, matrix: np.ndarray) -> FemurLandmarks:
        """The landmarks moved by a 4x4 rigid ``matrix`` (points and axes)."""
        m = np.asarray(matrix, dtype=float)
        kw = {n: m[:3, :3] @ getattr(self, n) + m[:3, 3] for n in _POINTS}
        kw |= {n: m[:3, :3] @ getattr(self, n) for n in _AXES}
        return FemurLandmarks(
            side=self.side, head_radius_mm=self.head_radius_mm, extra=dict(self.extra), **kw
        )

    def to_dict(self) -> dict:
        d: dict = {"side": self.side, "head_radius_mm": round(self.head_radius_mm, 4)}
        for name in _POINTS + _AXES:
            d[name] = [round(float(v), 5) for v in getattr(self, name)]
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "landmarks") -> FemurLandmarks:
        try:
            return cls(
                **{k: d[k] for k in ("side", "head_radius_mm", *_POINTS, *_AXES)},
                extra=dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise InputError(f"{source}: missing landmark {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise InputError(f"{source}: {e}") from None


def write_landmarks(landmarks: dict[str, FemurLandmarks], path: str | Path) -> None:
    """Write ``{side: FemurLandmarks}`` as JSON (``{"frame": "LPS mm", "femur": {side: ...}}``)."""
    doc = {"frame": "CT world, LPS, mm", "femur": {s: lm.to_dict() for s, lm in landmarks.items()}}
    Path(path).write_text(json.dumps(doc, indent=1))


def read_landmarks(path: str | Path) -> dict[str, FemurLandmarks]:
    """Read a landmarks JSON written by :func:`write_landmarks` (or by hand, same keys)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        femurs = doc["femur"]
    except FileNotFoundError:
        raise InputError(f"{path}: no such landmarks file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a landmarks JSON with a 'femur' section ({e})") from None
    return {side: FemurLandmarks.from_dict(d, f"{path} [{side}]") for side, d in femurs.items()}
