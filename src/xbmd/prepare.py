"""``xbmd prepare``: turn a case manifest into a training set of hip crops.

For every radiograph of every case and both hips, a sample holds (docs/data-format.md,
"Training dataset"):

- the radiograph resampled onto a fixed physical field of the detector around the hip (the
  *hip crop*: ``CROP_SIZE_PX`` x ``CROP_SIZE_PX`` pixels of ``CROP_PIXEL_MM`` detector mm, the
  projected femoral head centre at ``HEAD_POSITION`` of the crop);
- DRRs of the calibrated CT rendered in exactly that crop's rays with the bones' poses in that
  radiograph (registered, or known): the bones of the hip (g/cm2), the proximal femur (g/cm2),
  and the proximal-femur region mask;
- the labels measured on the CT (``xbmd.femur.measure_femur``), the DRR's mean areal density in
  the proximal-femur region (``bmd_drr_g_cm2``), DXA when the manifest has it;
- everything needed to go back to the radiograph: the crop -> image affine, the mirror flag, the
  crop's geometry, the poses.

Left hips are mirrored (columns flipped) so that every sample looks like a right hip.

The build is resumable (finished samples and registrations are kept), runs cases in parallel, and
records every failure with its stage and reason instead of stopping.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from xbmd import __version__, units
from xbmd.calibration import (
    Calibration,
    load_phantom,
    phantom_calibration,
)
from xbmd.drr import volume_values
from xbmd.errors import GeometryError, InputError, XbmdError
from xbmd.femur import SILHOUETTE_CHORD_MM, measure_femur
from xbmd.geometry import BodyPose, PerspectiveGeometry, rounded
from xbmd.hip import (
    CROP_PIXEL_MM,
    CROP_SIZE_PX,
    HEAD_POSITION,
    SIDES,
    HipBodies,
    hip_bodies,
    make_sample,
)
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray
from xbmd.landmarks import FemurLandmarks, read_landmarks, write_landmarks
from xbmd.manifest import ManifestCase, read_manifest
from xbmd.registration import (
    RegistrationSettings,
    build_scene,
    read_poses,
    register,
    xray_geometry,
)
from xbmd.volume import Volume

#: What a dataset folder holds (anything else there: not a dataset, refused).
DATASET_ENTRIES = (
    "samples", "registrations", "landmarks", "qc", "logs", "index.csv", "failures.csv",
    "prepare.json",
)  # fmt: skip
SAMPLE_FORMAT = "xbmd-training-sample"
DATASET_FORMAT = "xbmd-training-set"
#: The labels of a sample, in its sidecar's ``labels`` and in the index.
LABEL_COLUMNS = (
    "qct_vbmd_mg_cm3",
    "ct_abmd_g_cm2",
    "neck_abmd_g_cm2",
    "bmd_drr_g_cm2",
    "dxa_total_hip_g_cm2",
    "dxa_neck_g_cm2",
)
INDEX_COLUMNS = (
    "sample_id",
    "case_id",
    "patient_id",
    "xray",
    "side",
    "mirrored",
    "file",
    *LABEL_COLUMNS,
    "pose_source",
    "registration_quality",
    "similarity",
    "age_years",
    "sex",
    "head_row",
    "head_col",
    "pf_valid_fraction",
)
FAILURE_COLUMNS = ("case_id", "xray", "side", "stage", "error")


# ------------------------------------------------------------------------------------------------
# The CT side: calibration and labels


def calibrate_case(
    case: ManifestCase, ct: Volume, labels: Volume, qc_dir: Path | None = None
) -> Calibration:
    """The HU -> mg/cm3 calibration the manifest asks for (as ``xbmd calibrate`` makes it).

    ``phantom``: densities from the phantom JSON or bundled name; rods from the case's
    ``phantom_labels`` map, else from ``labels`` when its rod ids are there, else found
    automatically (``xbmd.rods``; a QC picture goes to ``qc_dir``); ``line``: the manifest's
    slope and intercept; ``phantomless``: air, fat and muscle, labelled muscle and fat preferred
    (``xbmd.contrast``; a contrast-enhanced CT without muscle labels is refused), at the
    manifest's kVp (else the CT's, else 120 kVp).
    """
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
        from xbmd.contrast import phantomless_with_labels

        return phantomless_with_labels(ct, labels, kvp=case.kvp)[0]
    raise InputError(f"case {case.case_id}: unknown calibration {case.calibration!r}")


def _automatic_rods(case: ManifestCase, ct: Volume, phantom, qc_dir: Path | None) -> Calibration:
    """Phantom calibration with the rods found in the CT (no rod labels in the case)."""
    from dataclasses import replace

    from xbmd.rods import find_rods, write_rods_qc_png

    if phantom.layout is None:
        raise InputError(
            f"case {case.case_id}: no rod labels (phantom_labels column, or rod ids "
            f"{[rod.label for rod in phantom.rods]} in its labels), and phantom "
            f"{phantom.name!r} has no layout for finding them automatically"
        )
    found = find_rods(ct, phantom)
    cal = phantom_calibration(ct, found.labels, phantom)
    if qc_dir is not None:
        write_rods_qc_png(found, ct, qc_dir / f"{_safe(case.case_id)}_rods.png", cal)
    return replace(cal, notes=(*cal.notes, *found.notes))


def side_labels(
    density: Volume, labels: Volume, label_map: dict[str, int], landmarks: FemurLandmarks
) -> dict:
    """The CT labels of one femur (``xbmd.femur.FemurBmd`` as a dict: g/cm2, mg/cm3, cm2, cm3)."""
    side = landmarks.side
    bone = f"femur_{side}"
    if bone not in label_map:
        raise InputError(f"the label map {label_map} names no {bone}")
    return measure_femur(density, labels, label_map[bone], landmarks).to_dict()


# ------------------------------------------------------------------------------------------------
# Building a dataset: one case at a time, every failure recorded with its stage


@dataclass(frozen=True)
class _Options:
    out: Path
    manifest_root: Path
    use_known_poses: bool
    keep_flagged: bool
    settings: RegistrationSettings


class _Failed(Exception):
    """A stage of a case, radiograph or sample failed: ``stage`` and a one-line ``message``."""

    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.stage, self.message, self.detail = stage, message, detail


@contextlib.contextmanager
def _stage(name: str, path: Path | str | None = None) -> Iterator[None]:
    """Turn any error inside into ``_Failed(name, message)``, the message naming ``path``."""
    try:
        yield
    except _Failed:
        raise
    except XbmdError as exc:
        raise _Failed(name, _naming(str(exc), path)) from exc
    except Exception as exc:  # unexpected: keep its type and traceback for the log
        message = _naming(f"{type(exc).__name__}: {exc}", path)
        raise _Failed(name, message, traceback.format_exc()) from exc


def _naming(message: str, path: Path | str | None) -> str:
    message = " ".join(message.split())  # one line for the CSV
    if path is None or str(path) in message or Path(path).name in message:
        return message
    return f"{path}: {message}"


class _CaseLog:
    """Append-only log of one case, ``DATASET/logs/<case_id>.log``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        self._file.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class _CaseReport:
    """What happened to one case in this run (returned by the worker)."""

    case_id: str
    written: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    registrations_run: int = 0
    registrations_reused: int = 0
    seconds: float = 0.0

    def fail(self, xray: str, side: str, failure: _Failed, samples: int, log: _CaseLog) -> None:
        self.failed += samples
        self.failures.append(
            {
                "case_id": self.case_id,
                "xray": xray,
                "side": side,
                "stage": failure.stage,
                "error": failure.message,
            }
        )
        where = " ".join(s for s in (xray, side) if s) or "case"
        log(f"FAILED {where} [{failure.stage}]: {failure.message}")
        if failure.detail:
            log(failure.detail.rstrip())


@dataclass
class _CaseData:
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
            self._scene = build_scene(self.ct, self.labels, self.case.label_map, self.landmarks)
        return self._scene


@dataclass
class _XrayPoses:
    """The bones' poses in one radiograph, with where they came from and how good they are."""

    poses: dict[str, BodyPose]
    geometry: PerspectiveGeometry
    source: str  # 'registered' or 'known'
    file: str
    quality: dict[str, str] = field(default_factory=dict)  # body -> 'good' | 'flagged'
    similarity: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _safe(name: str) -> str:
    """A file-name-safe version of an id."""
    return re.sub(r"[^\w.-]", "_", name)


def _xray_keys(xrays: list[Path]) -> list[str]:
    """One file-name key per radiograph: its stem, or its whole name where stems repeat."""
    stems = [x.stem for x in xrays]
    return [_safe(x.stem if stems.count(x.stem) == 1 else x.name) for x in xrays]


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sample_path(out: Path, case_id: str, key: str, side: str) -> Path:
    return out / "samples" / _safe(case_id) / f"{key}_{side}.npz"


def _is_done(npz: Path) -> bool:
    return npz.exists() and npz.with_suffix(".json").exists()


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a hidden temporary file, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, doc: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8"))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)

    _write_atomic(path, write)


def _prepare_case(case: ManifestCase, options: _Options) -> _CaseReport:
    """Worker: every missing sample of one case. Never raises; failures are in the report."""
    t0 = time.perf_counter()
    report = _CaseReport(case.case_id)
    log = _CaseLog(options.out / "logs" / f"{_safe(case.case_id)}.log")
    try:
        _run_case(case, options, report, log)
    except Exception as exc:  # a bug in one case must not stop the others
        failure = _Failed("case", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        report.fail("", "", failure, 0, log)
    finally:
        report.seconds = time.perf_counter() - t0
        log(
            f"done in {report.seconds:.1f} s: {report.written} written, {report.skipped} "
            f"already there, {report.failed} failed"
        )
        log.close()
    return report


def _run_case(case: ManifestCase, options: _Options, report: _CaseReport, log: _CaseLog) -> None:
    keys = _xray_keys(case.xrays)
    todo = {
        (key, side)
        for key in keys
        for side in SIDES
        if not _is_done(_sample_path(options.out, case.case_id, key, side))
    }
    report.skipped = len(keys) * len(SIDES) - len(todo)
    poses = "known poses" if options.use_known_poses else "registration"
    log(f"prepare {case.case_id}: {len(todo)} samples to make ({poses}), {report.skipped} there")
    if not todo:
        return
    try:
        data = _load_case(case, options, log)
    except _Failed as failure:
        report.fail("", "", failure, len(todo), log)
        return
    for xray_path, key in zip(case.xrays, keys, strict=True):
        sides = [s for s in SIDES if (key, s) in todo]
        if sides:
            _prepare_xray(data, xray_path, key, sides, options, report, log)


def _load_case(case: ManifestCase, options: _Options, log: _CaseLog) -> _CaseData:
    """Landmarks, CT, label map, calibration and the density volume (mg/cm3) of a case.

    Without a landmarks file in the manifest, the landmarks are found from the femur labels
    (``xbmd.auto_landmarks``), saved in ``DATASET/landmarks/`` (a QC picture per femur in
    ``DATASET/qc/``) and reused when the build resumes.
    """
    if options.use_known_poses and case.known_poses is None:
        raise _Failed(
            "poses",
            f"case {case.case_id}: known poses were asked for, but its known_poses column is empty",
        )
    t0 = time.perf_counter()
    if case.landmarks is not None:
        with _stage("landmarks", case.landmarks):
            landmarks = read_landmarks(case.landmarks)
    with _stage("ct", case.ct):
        ct = read_ct(case.ct)
    with _stage("labels", case.labels):
        labels = read_labels(case.labels, reference=ct)
    errors: dict[str, str] = {}
    if case.landmarks is None:
        with _stage("landmarks", case.labels):
            landmarks, errors = _automatic_landmarks(case, labels, options.out, log)
    with _stage("calibration", case.ct):
        calibration = calibrate_case(case, ct, labels, options.out / "qc")
        density = ct.with_data(volume_values(ct, "density", calibration), unit=units.MG_CM3)
    log(
        f"CT {ct.shape} voxels of {rounded(ct.spacing_mm, 3)} mm read and calibrated in "
        f"{time.perf_counter() - t0:.1f} s: {calibration.method}, density_mg_cm3 = "
        f"{calibration.slope_mg_cm3_per_hu:.5f} * HU + {calibration.intercept_mg_cm3:.2f}"
    )
    return _CaseData(case, ct, density, labels, calibration, landmarks, errors)


def _automatic_landmarks(
    case: ManifestCase, labels: Volume, out: Path, log: _CaseLog
) -> tuple[dict[str, FemurLandmarks], dict[str, str]]:
    """Femur landmarks from the labels, or those an earlier run saved (DATASET/landmarks/)."""
    from xbmd.auto_landmarks import case_landmarks

    folder = out / "landmarks"
    saved = folder / f"{_safe(case.case_id)}.json"
    if saved.exists():
        log(f"landmarks reused from {saved.relative_to(out).as_posix()}")
        return read_landmarks(saved), {}
    t0 = time.perf_counter()
    found, errors = case_landmarks(labels, case.label_map, out / "qc", f"{_safe(case.case_id)}_")
    if not found:
        raise _Failed("landmarks", "; ".join(errors.values()) or "no femur in the label map")
    _write_atomic(saved, lambda tmp: write_landmarks(found, tmp))
    log(
        f"landmarks found automatically in {time.perf_counter() - t0:.1f} s for "
        f"{', '.join(sorted(found))} femur (QC pictures in qc/)"
        + "".join(f"; {e}" for e in errors.values())
    )
    return found, errors


def _prepare_xray(
    data: _CaseData,
    xray_path: Path,
    key: str,
    sides: list[str],
    options: _Options,
    report: _CaseReport,
    log: _CaseLog,
) -> None:
    """Read one radiograph, find its poses, and write its samples of ``sides``."""
    xray_name = _relative(xray_path, options.manifest_root)
    try:
        with _stage("xray", xray_path):
            xray = read_xray(xray_path)
        log(
            f"{key}: {xray.pixels.shape} pixels of {xray.pixel_spacing_mm} mm"
            + (f"; warnings: {'; '.join(xray.warnings)}" if xray.warnings else "")
        )
        poses = _xray_poses(data, xray, xray_path, key, options, report, log)
    except _Failed as failure:
        report.fail(xray_name, "", failure, len(sides), log)
        return
    for side in sides:
        t0 = time.perf_counter()
        try:
            _write_sample(data, xray, xray_path, key, side, poses, options)
        except _Failed as failure:
            report.fail(xray_name, side, failure, 1, log)
            continue
        report.written += 1
        log(f"{key} {side}: sample written in {time.perf_counter() - t0:.1f} s")


def _xray_poses(
    data: _CaseData,
    xray,
    xray_path: Path,
    key: str,
    options: _Options,
    report: _CaseReport,
    log: _CaseLog,
) -> _XrayPoses:
    """Known poses, a registration saved by an earlier run, or a new registration."""
    case = data.case
    if options.use_known_poses:
        with _stage("poses", case.known_poses):
            return _known_poses(case.known_poses, xray, xray_path)
    path = options.out / "registrations" / _safe(case.case_id) / f"{key}.json"
    file = path.relative_to(options.out).as_posix()
    if path.exists():
        with _stage("registration", path):
            result = _saved_registration(path, xray, file)
        report.registrations_reused += 1
        log(f"{key}: registration reused from {file} ({_quality_text(result)})")
        return result
    with _stage("registration", xray_path):
        t0 = time.perf_counter()
        geometry, warnings = xray_geometry(xray)
        reg = register(data.scene(), xray.pixels, geometry, settings=options.settings)
        reg.xray, reg.ct = str(xray_path), str(case.ct)
        reg.warnings = [*reg.warnings, *warnings]
        _write_atomic(path, reg.write)
        report.registrations_run += 1
        result = _saved_registration(path, xray, file)
    log(f"{key}: registered in {time.perf_counter() - t0:.1f} s ({_quality_text(result)})")
    return result


def _quality_text(poses: _XrayPoses) -> str:
    return ", ".join(
        f"{n} {poses.quality[n]} {poses.similarity.get(n, float('nan')):.3f}"
        + (f" [{'; '.join(poses.reasons[n])}]" if poses.reasons.get(n) else "")
        for n in poses.poses
    )


def _saved_registration(path: Path, xray, file: str) -> _XrayPoses:
    """An ``xbmd register`` JSON (Registration.write) read back, with each body's quality."""
    doc = json.loads(path.read_text())
    bodies = doc.get("poses", {})
    return _XrayPoses(
        poses=read_poses(path),
        geometry=_geometry_of(doc, xray, path),
        source="registered",
        file=file,
        quality={n: b.get("quality", "good") for n, b in bodies.items()},
        similarity={n: float(b["similarity"]) for n, b in bodies.items() if "similarity" in b},
        reasons={n: list(b.get("reasons", [])) for n, b in bodies.items()},
        warnings=list(doc.get("warnings", [])),
    )


def _known_poses(path: Path, xray, xray_path: Path) -> _XrayPoses:
    """Known poses of one radiograph (a virtual case's truth.json, or a registration JSON).

    The poses hold in the geometry stored with them, when there is one (the truth's exact SOD
    and principal point), else in the geometry of the radiograph's file.
    """
    poses = read_poses(path, xray=xray_path)
    doc = json.loads(Path(path).read_text())
    if "xrays" in doc:  # truth.json: the entry of this radiograph (read_poses found it)
        name = Path(xray_path).name
        doc = next(e for e in doc["xrays"] if name in (e.get("dicom"), e.get("png"), e.get("name")))
    return _XrayPoses(
        poses=poses,
        geometry=_geometry_of(doc, xray, path),
        source="known",
        file=str(path),
        quality={n: "known" for n in poses},
    )


def _geometry_of(doc: dict, xray, path: Path) -> PerspectiveGeometry:
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


def _write_sample(
    data: _CaseData,
    xray,
    xray_path: Path,
    key: str,
    side: str,
    poses: _XrayPoses,
    options: _Options,
) -> None:
    """Make one sample and write its ``.npz`` and then its ``.json`` (which marks it done)."""
    case = data.case
    bodies_needed = ("pelvis", f"femur_{side}")
    missing = [n for n in bodies_needed if n not in poses.poses]
    if missing:
        raise _Failed("poses", f"{poses.file}: no pose of the {' and '.join(missing)}")
    flagged = [
        f"{n}: {'; '.join(poses.reasons.get(n, [])) or 'flagged'}"
        for n in bodies_needed
        if poses.quality.get(n) == "flagged"
    ]
    if flagged and not options.keep_flagged:
        raise _Failed("registration", "untrustworthy registration: " + "; ".join(flagged))
    with _stage("labels", case.ct):
        labels = data.side_labels(side)
    with _stage("render", xray_path):
        arrays, meta = make_sample(
            data.bodies(side),
            xray.pixels,
            poses.geometry,
            poses.poses["pelvis"],
            poses.poses[f"femur_{side}"],
        )
    npz = _sample_path(options.out, case.case_id, key, side)
    doc = _sample_doc(data, xray, xray_path, key, side, poses, options, labels, meta)
    doc["file"] = npz.relative_to(options.out).as_posix()
    doc["quality"] = "flagged" if flagged else poses.quality.get(f"femur_{side}", "good")
    doc["registration"]["reasons"] = flagged
    with _stage("write", npz):
        _write_npz(npz, arrays)
        _write_json(npz.with_suffix(".json"), doc)


def _sample_doc(data, xray, xray_path, key, side, poses, options, labels, meta) -> dict:
    """The sidecar JSON of one sample: everything but the arrays."""
    case = data.case
    sims = [poses.similarity[n] for n in ("pelvis", f"femur_{side}") if n in poses.similarity]
    dxa = case.dxa_g_cm2
    return {
        "format": SAMPLE_FORMAT,
        "format_version": 1,
        "xbmd_version": __version__,
        "sample_id": f"{case.case_id}/{key}_{side}",
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "xray": _relative(xray_path, options.manifest_root),
        "side": side,
        "mirrored": meta["crop"]["mirrored"],
        "arrays": {
            "xray": "float32, the radiograph's values as read (bone bright), 0 where not valid",
            "valid": "bool, crop pixel inside the radiograph and its collimated field",
            "bone_drr_g_cm2": "float32, hemipelvis + femur, g/cm2",
            "pf_drr_g_cm2": "float32, proximal femur, g/cm2, 0 outside pf_mask",
            "pf_mask": f"bool, proximal-femur chord > {SILHOUETTE_CHORD_MM} mm",
        },
        "labels": {
            "qct_vbmd_mg_cm3": labels["qct_vbmd_mg_cm3"],
            "ct_abmd_g_cm2": labels["ct_abmd_g_cm2"],
            "neck_abmd_g_cm2": labels["neck_abmd_g_cm2"],
            "bmd_drr_g_cm2": round(meta["bmd_drr_g_cm2"], 6),
            "dxa_total_hip_g_cm2": dxa.get(f"dxa_total_hip_{side}_g_cm2"),
            "dxa_neck_g_cm2": dxa.get(f"dxa_neck_{side}_g_cm2"),
            "total_hip_area_cm2": labels["total_hip_area_cm2"],
            "neck_area_cm2": labels["neck_area_cm2"],
            "pf_volume_cm3": labels["pf_volume_cm3"],
        },
        "crop": meta["crop"] | {"head_position": list(HEAD_POSITION)},
        "image_geometry": poses.geometry.to_dict(),
        "landmarks_px": meta["landmarks_px"],
        "landmarks_image_px": meta["landmarks_image_px"],
        "pf_area_px": meta["pf_area_px"],
        "pf_valid_fraction": meta["pf_valid_fraction"],
        "poses": {
            "pelvis": poses.poses["pelvis"].to_dict(),
            "femur": poses.poses[f"femur_{side}"].to_dict(),
        },
        "registration": {
            "pose_source": poses.source,
            "file": poses.file,
            "similarity": round(min(sims), 5) if sims else None,
            "similarity_by_body": {n: poses.similarity[n] for n in poses.similarity},
            "warnings": poses.warnings,
        },
        "patient": {"age_years": case.age_years, "sex": case.sex},
        "calibration": {
            "method": data.calibration.method,
            "slope_mg_cm3_per_hu": data.calibration.slope_mg_cm3_per_hu,
            "intercept_mg_cm3": data.calibration.intercept_mg_cm3,
        },
        "xray_warnings": list(xray.warnings),
    }


# ------------------------------------------------------------------------------------------------
# The index, the failures and the summary


def _index_row(doc: dict) -> dict:
    """One row of index.csv from a sample's sidecar JSON."""
    labels, reg = doc["labels"], doc["registration"]
    head = doc["landmarks_px"]["head_center_px"]
    return {
        "sample_id": doc["sample_id"],
        "case_id": doc["case_id"],
        "patient_id": doc["patient_id"],
        "xray": doc["xray"],
        "side": doc["side"],
        "mirrored": doc["mirrored"],
        "file": doc["file"],
        **{k: labels[k] for k in LABEL_COLUMNS},
        "pose_source": reg["pose_source"],
        "registration_quality": doc["quality"],
        "similarity": reg["similarity"],
        "age_years": doc["patient"]["age_years"],
        "sex": doc["patient"]["sex"],
        "head_row": round(head[0], 3),
        "head_col": round(head[1], 3),
        "pf_valid_fraction": doc["pf_valid_fraction"],
    }


def _write_index(out: Path) -> list[dict]:
    """Rebuild ``index.csv`` from every finished sample's JSON; returns the rows."""
    rows = []
    for path in sorted((out / "samples").glob("*/*.json")):
        if path.with_suffix(".npz").exists():
            rows.append(_index_row(json.loads(path.read_text())))
    rows.sort(key=lambda r: r["sample_id"])
    _write_csv(out / "index.csv", INDEX_COLUMNS, rows)
    return rows


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})

    _write_atomic(path, write)


def _check_dataset(out: Path, dataset_settings: dict) -> None:
    """Refuse to mix training sets: a folder already used must have the same settings."""
    meta = out / "prepare.json"
    if meta.exists():
        old = json.loads(meta.read_text()).get("dataset_settings")
        if old != dataset_settings:
            raise InputError(
                f"{out} holds a training set made with other settings ({old} here, "
                f"{dataset_settings} asked); choose an empty folder or the same settings"
            )
    elif out.exists() and any(p.name not in DATASET_ENTRIES for p in out.iterdir()):
        # registrations/ made beforehand (xbmd register) are welcome: they are reused
        raise InputError(f"{out} holds other files and no prepare.json; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        started = {"format": DATASET_FORMAT, "status": "running"}
        _write_json(meta, started | {"dataset_settings": dataset_settings})


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def prepare_dataset(
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    use_known_poses: bool = False,
    keep_flagged: bool = False,
    settings: RegistrationSettings | None = None,
    progress: bool = True,
) -> dict:
    """Build (or resume) a training set from a case manifest.

    Parameters
    ----------
    manifest_path : the case manifest (``xbmd.manifest``, docs/data-format.md).
    out_dir : the dataset folder: new, or one to resume (made with the same settings).
    workers : cases prepared in parallel (processes; each gets cpu_count // workers threads).
    use_known_poses : take the poses from each case's ``known_poses`` file instead of registering.
    keep_flagged : write the samples of flagged registrations (quality 'flagged') instead of
        reporting them as failed.
    settings : registration settings (default ``RegistrationSettings()``).
    progress : show a progress bar over cases on stderr.

    Returns
    -------
    dict, the summary also written to ``out_dir/prepare.json``: counts (``samples_written``,
    ``samples_skipped``, ``samples_failed``, ``samples_in_index``, ...), ``seconds``,
    ``samples_per_minute``, ``failures`` (as in ``failures.csv``), settings and xbmd version.

    Examples
    --------
    >>> s = prepare_dataset("cohort/manifest.csv", "ds", use_known_poses=True)  # doctest: +SKIP
    >>> s["samples_written"], s["samples_failed"]  # doctest: +SKIP
    (40, 0)
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    manifest_path, out = Path(manifest_path), Path(out_dir)
    if workers < 1:
        raise InputError(f"workers must be at least 1, not {workers}")
    cases = read_manifest(manifest_path)
    settings = settings or RegistrationSettings()
    dataset_settings = {
        "crop_size_px": CROP_SIZE_PX,
        "crop_pixel_mm": CROP_PIXEL_MM,
        "head_position": list(HEAD_POSITION),
        "pose_source": "known" if use_known_poses else "registered",
        "similarity": None if use_known_poses else settings.similarity,
    }
    _check_dataset(out, dataset_settings)
    options = _Options(out, manifest_path.parent.resolve(), use_known_poses, keep_flagged, settings)
    workers = min(workers, len(cases))
    reports: list[_CaseReport] = []
    bar = tqdm(total=len(cases), desc="prepare", unit="case", disable=not progress)
    if workers == 1:
        for case in cases:
            reports.append(_prepare_case(case, options))
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(_prepare_case, case, options): case for case in cases}
            for future in as_completed(futures):
                reports.append(_result_or_crash(future, futures[future]))
                bar.update()
    bar.close()
    return _finish(out, manifest_path, reports, dataset_settings, options, workers, t0)


def _result_or_crash(future, case: ManifestCase) -> _CaseReport:
    """A worker's report, or a failure when its process died (out of memory, killed)."""
    try:
        return future.result()
    except Exception as exc:  # the worker process itself failed: record it for its case
        report = _CaseReport(case.case_id, failed=len(case.xrays) * len(SIDES))
        report.failures.append(
            {
                "case_id": case.case_id,
                "xray": "",
                "side": "",
                "stage": "worker",
                "error": f"{type(exc).__name__}: {exc}",
            }
        )
        return report


def _finish(out, manifest_path, reports, dataset_settings, options, workers, t0) -> dict:
    """Write failures.csv, index.csv and prepare.json; return the summary."""
    reports = sorted(reports, key=lambda r: r.case_id)
    failures = [f for r in reports for f in r.failures]
    _write_csv(out / "failures.csv", FAILURE_COLUMNS, failures)
    rows = _write_index(out)
    seconds = time.perf_counter() - t0
    written = sum(r.written for r in reports)
    summary = {
        "format": DATASET_FORMAT,
        "format_version": 1,
        "xbmd_version": __version__,
        "status": "done",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(manifest_path.resolve()),
        "dataset_settings": dataset_settings,
        "run_settings": {
            "workers": workers,
            "keep_flagged": options.keep_flagged,
            "registration": None if options.use_known_poses else asdict(options.settings),
        },
        "cases": len(reports),
        "cases_with_failures": sum(1 for r in reports if r.failures),
        "samples_written": written,
        "samples_skipped": sum(r.skipped for r in reports),
        "samples_failed": sum(r.failed for r in reports),
        "samples_in_index": len(rows),
        "registrations_run": sum(r.registrations_run for r in reports),
        "registrations_reused": sum(r.registrations_reused for r in reports),
        "seconds": round(seconds, 2),
        "samples_per_minute": round(60.0 * written / seconds, 2) if written else 0.0,
        "seconds_per_case": {r.case_id: round(r.seconds, 2) for r in reports},
        "failures": failures,
        "index": "index.csv",
    }
    _write_json(out / "prepare.json", summary)
    return summary
