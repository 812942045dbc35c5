"""``xbmd prepare``: turn a case manifest into a training set of hip crops.

For every radiograph of every case and both hips, a sample holds (the format:
``xbmd.dataset.format``; docs/data-format.md, "Training dataset"):

- the radiograph resampled onto a fixed physical field of the detector around the hip (the
  *hip crop*: ``CROP_SIZE_PX`` x ``CROP_SIZE_PX`` pixels of ``CROP_PIXEL_MM`` detector mm, the
  projected femoral head centre at ``HEAD_POSITION`` of the crop);
- DRRs of the calibrated CT rendered in exactly that crop's rays with the bones' poses in that
  radiograph (registered, or known): the bones of the hip (g/cm2), the proximal femur (g/cm2),
  and the proximal-femur region mask;
- the labels measured on the CT (``xbmd.ct.femur.measure_femur``), the DRR's mean areal density in
  the proximal-femur region (``bmd_drr_g_cm2``), DXA when the manifest has it;
- everything needed to go back to the radiograph: the crop -> image affine, the mirror flag, the
  crop's geometry, the poses.

Left hips are mirrored (columns flipped) so that every sample looks like a right hip. Each
radiograph is also stored whole, reduced, for the localiser's training (the dataset is
self-contained).

The build is resumable (finished samples and registrations are kept), runs cases in parallel
(``xbmd.stages``), and records every failure with its stage and reason instead of stopping.
Samples remember the fingerprint of their inputs (``xbmd.dataset.case.case_fingerprint`` and the
radiograph's bytes): a sample or registration made from other inputs is made again, and the
samples of radiographs or cases no longer in the manifest are removed. A DICOM radiograph whose
Patient ID differs from the case's ``patient_id`` is refused (another patient's image).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from xbmd import __version__
from xbmd.ct.femur import SILHOUETTE_CHORD_MM
from xbmd.dataset.case import CaseData, case_fingerprint, file_digest, load_case
from xbmd.dataset.format import (
    DATASET_ENTRIES,
    DATASET_FORMAT,
    DATASET_FORMAT_VERSION,
    FAILURE_COLUMNS,
    INDEX_COLUMNS,
    SAMPLE_ARRAYS,
    SAMPLE_FORMAT,
    SAMPLE_FORMAT_VERSION,
    index_rows,
    radiograph_arrays,
)
from xbmd.dataset.hip import CROP_PIXEL_MM, CROP_SIZE_PX, HEAD_POSITION, make_sample
from xbmd.dataset.manifest import ManifestCase, read_manifest
from xbmd.dataset.radiograph import read_case_xray
from xbmd.errors import InputError, XbmdError
from xbmd.geometry import SIDES, rounded
from xbmd.io.xray import XRay
from xbmd.registration.optimise import RegistrationSettings
from xbmd.registration.xray import XrayPoses, known_poses, register_xray, saved_registration
from xbmd.stages import (
    CaseLog,
    claim_folder,
    run_cases,
    safe_name,
    write_atomic,
    write_csv,
    write_json,
    write_npz,
)

# ------------------------------------------------------------------------------------------------
# One case at a time, every failure recorded with its stage


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

    def fail(self, xray: str, side: str, failure: _Failed, samples: int, log: CaseLog) -> None:
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


def _xray_keys(xrays: list[Path]) -> list[str]:
    """One file-name key per radiograph: its stem, or its whole name where stems repeat."""
    stems = [x.stem for x in xrays]
    return [safe_name(x.stem if stems.count(x.stem) == 1 else x.name) for x in xrays]


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sample_path(out: Path, case_id: str, key: str, side: str) -> Path:
    return out / "samples" / safe_name(case_id) / f"{key}_{side}.npz"


def _sample_inputs(npz: Path) -> dict | None:
    """The ``inputs`` fingerprints of a finished sample (None: not finished or unreadable)."""
    sidecar = npz.with_suffix(".json")
    if not (npz.exists() and sidecar.exists()):
        return None
    try:
        import json

        return json.loads(sidecar.read_text(encoding="utf-8")).get("inputs", {})
    except (OSError, ValueError):
        return None


def _prepare_case(case: ManifestCase, options: _Options) -> _CaseReport:
    """Worker: every missing or outdated sample of one case. Never raises."""
    t0 = time.perf_counter()
    report = _CaseReport(case.case_id)
    with CaseLog(options.out / "logs" / f"{safe_name(case.case_id)}.log") as log:
        try:
            _run_case(case, options, report, log)
        except Exception as exc:  # a bug in one case must not stop the others
            failure = _Failed("case", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            report.fail("", "", failure, 0, log)
        report.seconds = time.perf_counter() - t0
        log(
            f"done in {report.seconds:.1f} s: {report.written} written, {report.skipped} "
            f"already there, {report.failed} failed"
        )
    return report


def _run_case(case: ManifestCase, options: _Options, report: _CaseReport, log: CaseLog) -> None:
    keys = _xray_keys(case.xrays)
    case_fp = case_fingerprint(case)
    xray_prints = {key: _xray_print(case, x) for key, x in zip(keys, case.xrays, strict=True)}
    todo = set()
    for key in keys:
        for side in SIDES:
            npz = _sample_path(options.out, case.case_id, key, side)
            inputs = _sample_inputs(npz)
            if inputs == {"case": case_fp, **xray_prints[key]}:
                continue
            if inputs is not None:  # made from other inputs: never keep it
                log(f"{key} {side}: inputs changed since the sample was made: made again")
                npz.unlink(missing_ok=True)
                npz.with_suffix(".json").unlink(missing_ok=True)
            todo.add((key, side))
    report.skipped = len(keys) * len(SIDES) - len(todo)
    poses = "known poses" if options.use_known_poses else "registration"
    log(f"prepare {case.case_id}: {len(todo)} samples to make ({poses}), {report.skipped} there")
    if not todo:
        return
    try:
        data = _load_case(case, options, log, case_fp)
    except _Failed as failure:
        report.fail("", "", failure, len(todo), log)
        return
    fingerprints = {"case": case_fp}
    for xray_path, key in zip(case.xrays, keys, strict=True):
        sides = [s for s in SIDES if (key, s) in todo]
        if sides:
            prints = fingerprints | xray_prints[key]
            _prepare_xray(data, xray_path, key, sides, prints, options, report, log)


def _xray_print(case: ManifestCase, xray_path: Path) -> dict:
    """A radiograph's part of a sample's ``inputs``: its bytes, and the manifest's geometry for
    it when given (spacing, SDD, SOD: a changed value makes the samples again)."""
    geometry = {k: v for k, v in case.radiograph(xray_path).given().items() if k != "date"}
    return {"xray": file_digest(xray_path)} | ({"xray_geometry": geometry} if geometry else {})


def _load_case(case: ManifestCase, options: _Options, log: CaseLog, fingerprint: str) -> CaseData:
    if options.use_known_poses and case.known_poses is None:
        raise _Failed(
            "poses",
            f"case {case.case_id}: known poses were asked for, but its known_poses column is empty",
        )
    t0 = time.perf_counter()
    data = load_case(case, _stage, options.out, fingerprint, log)
    cal = data.calibration
    log(
        f"CT {data.ct.shape} voxels of {rounded(data.ct.spacing_mm, 3)} mm read and calibrated in "
        f"{time.perf_counter() - t0:.1f} s: {cal.method}, density_mg_cm3 = "
        f"{cal.slope_mg_cm3_per_hu:.5f} * HU + {cal.intercept_mg_cm3:.2f}"
    )
    return data


def _check_patient(xray: XRay, case: ManifestCase, log: CaseLog) -> str:
    """'same', or 'unknown' with a log line; _Failed when the file names another patient."""
    found = xray.meta.get("patient_id")
    if found is None:
        log(f"{Path(str(xray.source)).name}: the file records no Patient ID: ownership not checked")
        return "unknown"
    if str(found).strip() != str(case.patient_id).strip():
        raise _Failed(
            "xray",
            f"{xray.source}: Patient ID {found!r} in the file differs from the case's patient_id "
            f"{case.patient_id!r}: another patient's radiograph? (fix the manifest's xrays column)",
        )
    return "same"


def _prepare_xray(
    data: CaseData,
    xray_path: Path,
    key: str,
    sides: list[str],
    prints: dict,
    options: _Options,
    report: _CaseReport,
    log: CaseLog,
) -> None:
    """Read one radiograph, check it, find its poses, and write its samples of ``sides``."""
    xray_name = _relative(xray_path, options.manifest_root)
    try:
        with _stage("xray", xray_path):
            xray = read_case_xray(xray_path, data.case.radiograph(xray_path))
        patient = _check_patient(xray, data.case, log)
        log(
            f"{key}: {xray.pixels.shape} pixels of {xray.pixel_spacing_mm} mm"
            + (f"; warnings: {'; '.join(xray.warnings)}" if xray.warnings else "")
        )
        radiograph = options.out / "radiographs" / safe_name(data.case.case_id) / f"{key}.npz"
        with _stage("write", radiograph):
            write_npz(radiograph, radiograph_arrays(xray.pixels))
        poses = _xray_poses(data, xray, xray_path, key, prints, options, report, log)
    except _Failed as failure:
        report.fail(xray_name, "", failure, len(sides), log)
        return
    for side in sides:
        t0 = time.perf_counter()
        try:
            doc = _sample_doc(data, xray, xray_path, key, side, poses, options)
            doc |= {"inputs": prints, "patient_check": patient}
            doc["radiograph"] = radiograph.relative_to(options.out).as_posix()
            _write_sample(data, xray, key, side, poses, options, doc)
        except _Failed as failure:
            report.fail(xray_name, side, failure, 1, log)
            continue
        report.written += 1
        log(f"{key} {side}: sample written in {time.perf_counter() - t0:.1f} s")


def _xray_poses(
    data: CaseData,
    xray: XRay,
    xray_path: Path,
    key: str,
    prints: dict,
    options: _Options,
    report: _CaseReport,
    log: CaseLog,
) -> XrayPoses:
    """Known poses, a registration saved earlier (by this stage from the same inputs, or by
    ``xbmd register`` beforehand), or a new registration."""
    import json

    case = data.case
    if options.use_known_poses:
        with _stage("poses", case.known_poses):
            return known_poses(case.known_poses, xray, xray_path)
    path = options.out / "registrations" / safe_name(case.case_id) / f"{key}.json"
    file = path.relative_to(options.out).as_posix()
    if path.exists():
        with _stage("registration", path):
            made_from = json.loads(path.read_text(encoding="utf-8")).get("inputs")
            if made_from in (None, prints):  # None: made beforehand by the user, welcome
                result = saved_registration(path, xray, file)
                report.registrations_reused += 1
                log(f"{key}: registration reused from {file} ({result.quality_text()})")
                if not path.with_suffix(".png").exists():
                    _write_overlay(data, xray, result, path.with_suffix(".png"), log)
                return result
            log(f"{key}: inputs changed since {file} was registered: registered again")
    with _stage("registration", xray_path):
        t0 = time.perf_counter()
        reg = register_xray(data.scene(), xray, settings=options.settings)
        reg.ct = str(case.ct)
        path.with_suffix(".png").unlink(missing_ok=True)  # an overlay of older poses
        write_json(path, reg.to_dict() | {"inputs": prints})
        report.registrations_run += 1
        result = saved_registration(path, xray, file)
    log(f"{key}: registered in {time.perf_counter() - t0:.1f} s ({result.quality_text()})")
    _write_overlay(data, xray, result, path.with_suffix(".png"), log)
    return result


def _write_overlay(data: CaseData, xray: XRay, poses: XrayPoses, path: Path, log: CaseLog) -> None:
    """The registration's QC picture next to its JSON: each bone's outline in its registered
    pose over the radiograph, with its similarity and flag (``xbmd.registration.overlay``). A
    picture that cannot be made is logged, not a failure of the samples."""
    import math

    from xbmd.registration.overlay import write_registration_overlay
    from xbmd.registration.result import BodyResult, Registration

    scene = data.scene()
    try:
        bodies = {
            name: BodyResult(
                name,
                pose.about(scene.centre(name)),
                poses.similarity.get(name, math.nan),
                poses.quality.get(name) == "flagged",
                list(poses.reasons.get(name, [])),
            )
            for name, pose in poses.poses.items()
            if name in scene.bodies
        }
        registration = Registration(poses.geometry, bodies)
        title = f"{data.case.case_id} {Path(str(xray.source)).name}"
        write_atomic(
            path,
            lambda tmp: write_registration_overlay(xray.pixels, scene, registration, tmp, title),
        )
    except Exception as exc:  # a QC picture must not cost the samples
        log(f"{path.name}: no overlay ({type(exc).__name__}: {exc})")


def _write_sample(
    data: CaseData, xray: XRay, key: str, side: str, poses: XrayPoses, options: _Options, doc: dict
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
    with _stage("render", xray.source):
        arrays, meta = make_sample(
            data.bodies(side),
            xray.pixels,
            poses.geometry,
            poses.poses["pelvis"],
            poses.poses[f"femur_{side}"],
        )
    npz = _sample_path(options.out, case.case_id, key, side)
    doc |= _sample_meta(labels, meta, case.dxa_g_cm2, side)
    doc["file"] = npz.relative_to(options.out).as_posix()
    doc["quality"] = "flagged" if flagged else poses.quality.get(f"femur_{side}", "good")
    doc["registration"]["reasons"] = flagged
    with _stage("write", npz):
        write_npz(npz, arrays)
        write_json(npz.with_suffix(".json"), doc)


def _sample_meta(labels: dict, meta: dict, dxa: dict, side: str) -> dict:
    """The parts of a sidecar that come from rendering the sample."""
    return {
        "mirrored": meta["crop"]["mirrored"],
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
        "landmarks_px": meta["landmarks_px"],
        "landmarks_image_px": meta["landmarks_image_px"],
        "pf_area_px": meta["pf_area_px"],
        "pf_valid_fraction": meta["pf_valid_fraction"],
    }


def _sample_doc(data, xray, xray_path, key, side, poses, options) -> dict:
    """The sidecar JSON of one sample, before rendering: provenance, poses, patient."""
    case = data.case
    sims = [poses.similarity[n] for n in ("pelvis", f"femur_{side}") if n in poses.similarity]
    return {
        "format": SAMPLE_FORMAT,
        "format_version": SAMPLE_FORMAT_VERSION,
        "xbmd_version": __version__,
        "sample_id": f"{case.case_id}/{key}_{side}",
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "xray": _relative(xray_path, options.manifest_root),
        "side": side,
        "arrays": SAMPLE_ARRAYS
        | {"pf_mask": f"bool, proximal-femur chord > {SILHOUETTE_CHORD_MM} mm"},
        "image_geometry": poses.geometry.to_dict(),
        "poses": {
            "pelvis": poses.poses["pelvis"].to_dict(),
            "femur": poses.poses[f"femur_{side}"].to_dict(),
        },
        "registration": {
            "pose_source": poses.source,
            "file": poses.file,
            "overlay": str(Path(poses.file).with_suffix(".png").as_posix())
            if poses.source == "registered"
            else None,
            "similarity": round(min(sims), 5) if sims else None,
            "similarity_by_body": {n: poses.similarity[n] for n in poses.similarity},
            "warnings": poses.warnings,
        },
        "patient": {"age_years": case.age_years, "sex": case.sex},
        "implant": case.implants.get(side),
        "acquisition": {
            "study_uid": xray.meta.get("study_instance_uid"),
            "kvp": xray.meta.get("kvp"),
            "manufacturer": xray.meta.get("manufacturer"),
            "manufacturer_model": xray.meta.get("manufacturer_model"),
            "spacing_source": xray.spacing_source,
        },
        "calibration": {
            "method": data.calibration.method,
            "slope_mg_cm3_per_hu": data.calibration.slope_mg_cm3_per_hu,
            "intercept_mg_cm3": data.calibration.intercept_mg_cm3,
        },
        "xray_warnings": list(xray.warnings),
        "xray_spacing_source": xray.spacing_source,
        "xray_manifest": case.radiograph(xray_path).given(),
    }


# ------------------------------------------------------------------------------------------------
# The whole dataset


def _duplicates(cases: list[ManifestCase]) -> list[dict]:
    """Radiographs listed twice (in one case or in two): failures of the later listings."""
    seen: dict[Path, str] = {}
    failures = []
    for case in cases:
        for x in case.xrays:
            key = Path(x).resolve()
            if key in seen:
                failures.append(
                    {
                        "case_id": case.case_id,
                        "xray": str(x),
                        "side": "",
                        "stage": "manifest",
                        "error": f"{x}: listed twice (first in case {seen[key]}); this listing "
                        "is skipped",
                    }
                )
            else:
                seen[key] = case.case_id
    return failures


def _without_duplicates(cases: list[ManifestCase], failures: list[dict]) -> list[ManifestCase]:
    drop = {(f["case_id"], str(f["xray"])) for f in failures}
    out = []
    for case in cases:
        xrays = [x for x in case.xrays if (case.case_id, str(x)) not in drop]
        if xrays:
            out.append(ManifestCase(**{**case.__dict__, "xrays": xrays}))
    return out


def _remove_stale(out: Path, cases: list[ManifestCase]) -> int:
    """Remove samples, radiographs and registrations of radiographs no longer in the manifest;
    returns the count of samples removed."""
    wanted = {(safe_name(c.case_id), key) for c in cases for key in _xray_keys(c.xrays)}
    removed = 0
    for folder in ("samples", "radiographs", "registrations"):
        for path in sorted((out / folder).glob("*/*")):
            key = path.stem.rsplit("_", 1)[0] if folder == "samples" else path.stem
            if (path.parent.name, key) in wanted or path.name.startswith("."):
                continue
            if folder == "samples" and path.suffix == ".npz":
                removed += 1
            path.unlink()
        for case_dir in (out / folder).glob("*"):
            if case_dir.is_dir() and not any(case_dir.iterdir()):
                shutil.rmtree(case_dir)
    return removed


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
    manifest_path : the case manifest (``xbmd.dataset.manifest``, docs/data-format.md).
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
    ``samples_skipped``, ``samples_failed``, ``samples_removed``, ``samples_in_index``, ...),
    ``seconds``, ``samples_per_minute``, ``failures`` (as in ``failures.csv``), settings and
    xbmd version.

    Examples
    --------
    >>> s = prepare_dataset("cohort/manifest.csv", "ds", use_known_poses=True)  # doctest: +SKIP
    >>> s["samples_written"], s["samples_failed"]  # doctest: +SKIP
    (40, 0)
    """
    t0 = time.perf_counter()
    manifest_path, out = Path(manifest_path), Path(out_dir)
    if workers < 1:
        raise InputError(f"workers must be at least 1, not {workers}")
    cases = read_manifest(manifest_path)
    settings = settings or RegistrationSettings()
    dataset_settings = {
        "format_version": DATASET_FORMAT_VERSION,
        "crop_size_px": CROP_SIZE_PX,
        "crop_pixel_mm": CROP_PIXEL_MM,
        "head_position": list(HEAD_POSITION),
        "pose_source": "known" if use_known_poses else "registered",
        "similarity": None if use_known_poses else settings.similarity,
    }
    claim_folder(out, "prepare.json", DATASET_FORMAT, dataset_settings, DATASET_ENTRIES)
    duplicates = _duplicates(cases)
    cases = _without_duplicates(cases, duplicates)
    removed = _remove_stale(out, cases)
    options = _Options(out, manifest_path.parent.resolve(), use_known_poses, keep_flagged, settings)
    workers = min(workers, max(len(cases), 1))
    reports: list[_CaseReport] = []
    finished = False
    try:
        for report in run_cases(
            cases, _prepare_case, _crashed, workers, "prepare" if progress else None, (options,)
        ):
            reports.append(report)
        finished = True
    finally:  # an interrupted run still leaves an index of what it finished
        summary = _finish(
            out, manifest_path, reports, duplicates, removed, dataset_settings, options, workers, t0
        )
        summary["status"] = "done" if finished else "interrupted"
        write_json(out / "prepare.json", summary)
    return summary


def _crashed(case: ManifestCase, exc: BaseException) -> _CaseReport:
    """The report of a case whose worker process died (out of memory, killed)."""
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


def _finish(
    out, manifest_path, reports, duplicates, removed, dataset_settings, options, workers, t0
) -> dict:
    """Write failures.csv and index.csv; return the summary (prepare.json's content)."""
    reports = sorted(reports, key=lambda r: r.case_id)
    failures = duplicates + [f for r in reports for f in r.failures]
    write_csv(out / "failures.csv", FAILURE_COLUMNS, failures)
    rows = index_rows(out)
    write_csv(out / "index.csv", INDEX_COLUMNS, rows)
    seconds = time.perf_counter() - t0
    written = sum(r.written for r in reports)
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "identity": dataset_settings,
        "xbmd_version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(manifest_path.resolve()),
        "dataset_settings": dataset_settings,
        "run_settings": {
            "workers": workers,
            "keep_flagged": options.keep_flagged,
            "registration": None if options.use_known_poses else asdict(options.settings),
        },
        "cases": len(reports),
        "cases_with_failures": len({f["case_id"] for f in failures}),
        "samples_written": written,
        "samples_skipped": sum(r.skipped for r in reports),
        "samples_failed": sum(r.failed for r in reports),
        "samples_removed": removed,
        "samples_in_index": len(rows),
        "registrations_run": sum(r.registrations_run for r in reports),
        "registrations_reused": sum(r.registrations_reused for r in reports),
        "seconds": round(seconds, 2),
        "samples_per_minute": round(60.0 * written / seconds, 2) if written else 0.0,
        "seconds_per_case": {r.case_id: round(r.seconds, 2) for r in reports},
        "failures": failures,
        "index": "index.csv",
    }
