"""One case of a manifest on the CT side, as ``xbmd prepare`` uses it: the calibrated CT, the
labels measured on it, its rendering bodies and registration scene, and the fingerprint of the
case's inputs (so that samples made from other inputs are made again)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from xbmd import units
from xbmd.ct.calibration import (
    Calibration,
    load_phantom,
    phantom_calibration,
    phantomless_calibration,
)
from xbmd.ct.femur import measure_femur
from xbmd.ct.landmarks import FemurLandmarks
from xbmd.dataset.hip import HipBodies, hip_bodies
from xbmd.dataset.manifest import ManifestCase
from xbmd.errors import InputError
from xbmd.volume import Volume

#: Read in chunks of this many bytes when hashing files.
_CHUNK = 1 << 20


def calibrate_case(case: ManifestCase, ct: Volume, labels: Volume) -> Calibration:
    """The HU -> mg/cm3 calibration the manifest asks for (as ``xbmd calibrate`` makes it).

    ``phantom``: rods labelled in ``labels``, densities from the phantom JSON or bundled name;
    ``line``: the manifest's slope and intercept; ``phantomless``: air, fat and muscle found
    automatically, at the manifest's kVp (else the CT's, else 120 kVp).
    """
    if case.calibration == "line":
        slope, intercept = case.calibration_line
        return Calibration.given(
            slope, intercept, note=f"line given in the manifest for {case.case_id}"
        )
    if case.calibration == "phantom":
        return phantom_calibration(ct, labels, load_phantom(case.phantom))
    if case.calibration == "phantomless":
        return phantomless_calibration(ct, kvp=case.kvp)
    raise InputError(f"case {case.case_id}: unknown calibration {case.calibration!r}")


def side_labels(
    density: Volume, labels: Volume, label_map: dict[str, int], landmarks: FemurLandmarks
) -> dict:
    """The CT labels of one femur (``xbmd.ct.femur.FemurBmd`` as a dict: g/cm2, mg/cm3, cm2,
    cm3)."""
    side = landmarks.side
    bone = f"femur_{side}"
    if bone not in label_map:
        raise InputError(f"the label map {label_map} names no {bone}")
    return measure_femur(density, labels, label_map[bone], landmarks).to_dict()


@dataclass
class CaseData:
    """A case's calibrated CT and what is derived from it once (labels, bodies, scene)."""

    case: ManifestCase
    ct: Volume  # HU: the registration renders bones as the radiograph sees them
    density: Volume
    labels: Volume
    calibration: Calibration
    landmarks: dict[str, FemurLandmarks]
    _labels: dict = field(default_factory=dict)
    _bodies: dict = field(default_factory=dict)
    _scene: object = None

    def femur_landmarks(self, side: str) -> FemurLandmarks:
        if side not in self.landmarks:
            raise InputError(f"{self.case.landmarks}: no {side} femur landmarks")
        return self.landmarks[side]

    def side_labels(self, side: str) -> dict:
        if side not in self._labels:
            lm = self.femur_landmarks(side)
            self._labels[side] = side_labels(self.density, self.labels, self.case.label_map, lm)
        return self._labels[side]

    def bodies(self, side: str) -> HipBodies:
        if side not in self._bodies:
            lm = self.femur_landmarks(side)
            self._bodies[side] = hip_bodies(self.density, self.labels, self.case.label_map, lm)
        return self._bodies[side]

    def scene(self):
        if self._scene is None:
            from xbmd.registration.scene import build_scene

            self._scene = build_scene(self.ct, self.labels, self.case.label_map, self.landmarks)
        return self._scene


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, sorted); 'missing'
    for a path that does not exist (the stage that reads it reports that)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.relative_to(path).as_posix().encode())
            digest.update(file_digest(item).encode())
        return digest.hexdigest()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return digest.hexdigest()


def case_fingerprint(case: ManifestCase) -> str:
    """SHA-256 over everything of a case that its samples depend on, radiographs excepted: the
    manifest's values and the bytes of the CT, labels, landmarks, phantom and known poses."""
    files = {
        "ct": case.ct,
        "labels": case.labels,
        "landmarks": case.landmarks,
        "known_poses": case.known_poses,
        "phantom": Path(case.phantom) if case.phantom and case.phantom.endswith(".json") else None,
    }
    doc = {
        "patient_id": case.patient_id,
        "label_map": case.label_map,
        "calibration": case.calibration,
        "calibration_line": case.calibration_line,
        "phantom": case.phantom if files["phantom"] is None else None,
        "kvp": case.kvp,
        "age_years": case.age_years,
        "sex": case.sex,
        "dxa_g_cm2": case.dxa_g_cm2,
        "files": {k: file_digest(p) if p is not None else None for k, p in files.items()},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def load_case(case: ManifestCase, stage) -> CaseData:
    """Landmarks, CT, label map, calibration and the density volume (mg/cm3) of a case.

    ``stage(name, path)`` is a context manager that names the failing stage (``prepare``'s).
    """
    from xbmd.ct.landmarks import read_landmarks
    from xbmd.drr import volume_values
    from xbmd.io.ct import read_ct, read_labels

    with stage("landmarks", case.landmarks):
        landmarks = read_landmarks(case.landmarks)
    with stage("ct", case.ct):
        ct = read_ct(case.ct)
    with stage("labels", case.labels):
        labels = read_labels(case.labels, reference=ct)
    with stage("calibration", case.ct):
        calibration = calibrate_case(case, ct, labels)
        density = ct.with_data(volume_values(ct, "density", calibration), unit=units.MG_CM3)
    return CaseData(case, ct, density, labels, calibration, landmarks)
