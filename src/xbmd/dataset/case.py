"""One case of a manifest on the CT side, as ``xbmd prepare`` uses it: the calibrated CT, the
labels measured on it, its rendering bodies and registration scene, and the fingerprint of the
case's inputs (so that samples made from other inputs are made again)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd import units
from xbmd.ct.calibration import Calibration, load_phantom, phantom_calibration
from xbmd.ct.femur import measure_femur
from xbmd.ct.landmarks import FemurLandmarks
from xbmd.dataset.hip import HipBodies, hip_bodies
from xbmd.dataset.manifest import ManifestCase
from xbmd.errors import InputError
from xbmd.volume import Volume

#: Read in chunks of this many bytes when hashing files.
_CHUNK = 1 << 20


def calibrate_case(
    case: ManifestCase, ct: Volume, labels: Volume, qc_dir: Path | None = None
) -> Calibration:
    """The HU -> mg/cm3 calibration the manifest asks for (as ``xbmd calibrate`` makes it).

    ``phantom``: densities from the phantom JSON or bundled name; rods from the case's
    ``phantom_labels`` map, else from ``labels`` when its rod ids are there, else found
    automatically (``xbmd.ct.rods``; a QC picture goes to ``qc_dir``); ``line``: the manifest's
    slope and intercept; ``phantomless``: air, fat and muscle, labelled muscle and fat preferred
    (``xbmd.ct.contrast``; a contrast-enhanced CT without muscle labels is refused), at the
    manifest's kVp (else the CT's, else 120 kVp).
    """
    from xbmd.io.ct import read_labels

    if case.calibration == "line":
        slope, intercept = case.calibration_line
        return Calibration.given(
            slope, intercept, note=f"line given in the manifest for {case.case_id}"
        )
    if case.calibration == "phantom":
        phantom = load_phantom(case.phantom)
        if case.phantom_labels is not None:
            return phantom_calibration(ct, read_labels(case.phantom_labels, reference=ct), phantom)
        if np.isin(labels.data, [rod.label for rod in phantom.rods]).any():
            return phantom_calibration(ct, labels, phantom)
        return _automatic_rods(case, ct, phantom, qc_dir)
    if case.calibration == "phantomless":
        from xbmd.ct.contrast import phantomless_with_labels

        return phantomless_with_labels(ct, labels, kvp=case.kvp)[0]
    raise InputError(f"case {case.case_id}: unknown calibration {case.calibration!r}")


def _automatic_rods(case: ManifestCase, ct: Volume, phantom, qc_dir: Path | None) -> Calibration:
    """Phantom calibration with the rods found in the CT (no rod labels in the case)."""
    from dataclasses import replace

    from xbmd.ct.rods import find_rods, write_rods_qc_png
    from xbmd.stages import safe_name

    if phantom.layout is None:
        raise InputError(
            f"case {case.case_id}: no rod labels (phantom_labels column, or rod ids "
            f"{[rod.label for rod in phantom.rods]} in its labels), and phantom "
            f"{phantom.name!r} has no layout for finding them automatically"
        )
    found = find_rods(ct, phantom)
    cal = phantom_calibration(ct, found.labels, phantom)
    if qc_dir is not None:
        write_rods_qc_png(found, ct, qc_dir / f"{safe_name(case.case_id)}_rods.png", cal)
    return replace(cal, notes=(*cal.notes, *found.notes))


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
    landmark_errors: dict[str, str] = field(default_factory=dict)  # side -> why none
    _labels: dict = field(default_factory=dict)
    _bodies: dict = field(default_factory=dict)
    _scene: object = None

    def femur_landmarks(self, side: str) -> FemurLandmarks:
        if side not in self.landmarks:
            if side in self.landmark_errors:
                raise InputError(self.landmark_errors[side])
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
        "phantom_labels": case.phantom_labels,
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


def load_case(case: ManifestCase, stage, out: Path, fingerprint: str, log) -> CaseData:
    """Landmarks, CT, label map, calibration and the density volume (mg/cm3) of a case.

    ``stage(name, path)`` is a context manager that names the failing stage (``prepare``'s);
    ``out`` the dataset folder. Without a landmarks file in the manifest, the landmarks are found
    from the femur labels (``xbmd.ct.auto_landmarks``), saved in ``out/landmarks/`` with the
    case's ``fingerprint`` (reused while it holds), a QC picture per femur in ``out/qc/``.
    """
    from xbmd.ct.landmarks import read_landmarks
    from xbmd.drr import volume_values
    from xbmd.io.ct import read_ct, read_labels

    landmarks: dict[str, FemurLandmarks] = {}
    if case.landmarks is not None:
        with stage("landmarks", case.landmarks):
            landmarks = read_landmarks(case.landmarks)
    with stage("ct", case.ct):
        ct = read_ct(case.ct)
    with stage("labels", case.labels):
        labels = read_labels(case.labels, reference=ct)
    errors: dict[str, str] = {}
    if case.landmarks is None:
        with stage("landmarks", case.labels):
            landmarks, errors = automatic_landmarks(case, labels, out, fingerprint, log)
    with stage("calibration", case.ct):
        calibration = calibrate_case(case, ct, labels, out / "qc")
        density = ct.with_data(volume_values(ct, "density", calibration), unit=units.MG_CM3)
    return CaseData(case, ct, density, labels, calibration, landmarks, errors)


def automatic_landmarks(
    case: ManifestCase, labels: Volume, out: Path, fingerprint: str, log
) -> tuple[dict[str, FemurLandmarks], dict[str, str]]:
    """Femur landmarks from the labels, or those saved from the same inputs (out/landmarks/)."""
    from xbmd.ct.auto_landmarks import case_landmarks
    from xbmd.ct.landmarks import read_landmarks, write_landmarks
    from xbmd.stages import safe_name, write_atomic

    name = safe_name(case.case_id)
    saved, made_from = out / "landmarks" / f"{name}.json", out / "landmarks" / f"{name}.inputs"
    if saved.exists() and made_from.exists() and made_from.read_text().strip() == fingerprint:
        log(f"landmarks reused from {saved.relative_to(out).as_posix()}")
        return read_landmarks(saved), {}
    found, errors = case_landmarks(labels, case.label_map, out / "qc", f"{name}_")
    if not found:
        raise InputError("; ".join(errors.values()) or "no femur in the label map")
    write_atomic(saved, lambda tmp: write_landmarks(found, tmp))
    write_atomic(made_from, lambda tmp: tmp.write_text(fingerprint + "\n"))
    log(
        f"landmarks found automatically for {', '.join(sorted(found))} femur (QC pictures in qc/)"
        + "".join(f"; {e}" for e in errors.values())
    )
    return found, errors
