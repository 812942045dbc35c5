"""``xbmd synth``: write a virtual QCT cohort (CT, labels, phantom, X-rays, truth, manifest).

Per case (docs/data-format.md, "Virtual cohort"):

    DIR/cases/<case_id>/ct.nii.gz        CT in HU (int16)
                       labels.nii.gz    bones 1-4, phantom rods 101-105
                       phantom.json     rod densities (cases with a phantom)
                       landmarks.json   femur landmarks (xbmd.ct.landmarks)
                       xray_NN.dcm/.png AP radiographs (DICOM DX and 16-bit PNG)
                       truth.json       patient, per-side BMD truth, scanner, per X-ray poses
                                        (sessions, devices), the implant if any
    DIR/manifest.csv   one row per case (xbmd.dataset.manifest)
    DIR/dxa.csv        simulated DXA results (truth + precision noise), as a hospital has them
    DIR/cohort.json    seed, settings, version, failures; the folder's marker (xbmd.stages)

Every case is generated from its patient's own seed, so a case is identical whatever the number
of workers or the order in which cases finish. The folder is claimed, the cases run and the
cohort files written through ``xbmd.stages`` (as ``xbmd prepare`` does): a folder of another
cohort is refused, an interrupted one resumes, a case whose worker process dies is listed as
failed and the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from xbmd import __version__
from xbmd.ct.calibration import Calibration
from xbmd.ct.femur import measure_femur, neutral_projection
from xbmd.ct.landmarks import write_landmarks
from xbmd.dataset.manifest import ManifestCase, read_manifest, write_manifest
from xbmd.errors import GeometryError, InputError
from xbmd.io.ct import write_volume
from xbmd.io.totalseg import TISSUE_TYPE_IDS
from xbmd.stages import claim_folder, run_cases, write_atomic, write_csv, write_json
from xbmd.synth import anatomy as anatomy_mod
from xbmd.synth import contrast as contrast_mod
from xbmd.synth.device import check_families
from xbmd.synth.implants import IMPLANT_LABEL, draw_implant, insert_implant
from xbmd.synth.model import BONE_LABELS, DRAW_SIDES, Anatomy, Patient
from xbmd.synth.population import sample_patients
from xbmd.synth.scanner import (
    ROD_DENSITIES_MG_CM3,
    Scanner,
    sample_scanner,
    scan,
    soft_tissue_at_kvp,
)
from xbmd.synth.sessions import PROCESSING_MODES, write_radiographs
from xbmd.tscore import t_score, who_category
from xbmd.volume import Volume, bounding_box, box_affine

FEMUR_LABEL = {"right": BONE_LABELS["femur_right"], "left": BONE_LABELS["femur_left"]}
#: The cohort folder's marker (``xbmd.stages.claim_folder``) and summary, and its format name.
MARKER = "cohort.json"
COHORT_FORMAT = "xbmd-virtual-cohort"
DXA_COLUMNS = (
    "case_id",
    "patient_id",
    "side",
    "total_hip_g_cm2",
    "femoral_neck_g_cm2",
    "total_hip_t_score",
    "who_category",
)


@dataclass(frozen=True)
class SynthSettings:
    """Settings of a cohort (recorded in cohort.json).

    ct_spacing_mm : isotropic CT voxel size, mm.
    xray_spacing_mm : detector pixel size of the radiographs, mm (clinical detectors: 0.14-0.2;
        coarser here to keep the cohort small: the CT's 1 mm voxels bound the detail anyway).
    poses : radiographs per session (the first is a well-positioned standard AP).
    phantomless_fraction : share of cases scanned without the calibration phantom.
    dxa_precision : relative SD of the simulated DXA measurement (1 %: a good DXA centre).
    sessions : visits per patient, each with its own device and ``poses`` radiographs that
        differ only in pose (``xbmd.synth.sessions``); 0 (default): every radiograph has its
        own device, as cohorts were made before sessions existed.
    implant_fraction : share of patients with a metal implant on one side
        (``xbmd.synth.implants``).
    device_families : the device families radiographs may come from (names of
        ``xbmd.synth.device.DEVICE_FAMILIES``); None: all.
    processing : 'fixed' (each family's own processing), 'random' (a randomised processing
        graph on every device, ``xbmd.synth.processing_graph``) or 'mixed' (on half of them).

    contrast_fraction : share of cases whose CT is contrast-enhanced (``xbmd.synth.contrast``;
        own random draws, so 0 leaves every case as it was).
    tissue_labels : also write ``tissues.nii.gz``: skeletal muscle 253, fat 252 and the
        contrast-filled vessels (TotalSegmentator's vessel ids), as a segmenter would give them.

    The last six were added later; at their defaults a cohort is byte-identical to one made
    before they existed, and they are left out of cohort.json's settings and identity.
    """

    ct_spacing_mm: float = 1.0
    xray_spacing_mm: float = 0.3
    poses: int = 4
    phantomless_fraction: float = 0.15
    dxa_precision: float = 0.01
    sessions: int = 0
    implant_fraction: float = 0.0
    device_families: tuple[str, ...] | None = None
    processing: str = "fixed"
    contrast_fraction: float = 0.0
    tissue_labels: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.sessions, int) and 0 <= self.sessions <= 20):
            raise InputError(f"sessions must be an integer from 0 to 20, not {self.sessions!r}")
        if not (0.0 <= self.implant_fraction <= 1.0):
            raise InputError(f"implant_fraction must be in [0, 1], not {self.implant_fraction}")
        if self.processing not in PROCESSING_MODES:
            raise InputError(
                f"processing must be one of {', '.join(PROCESSING_MODES)}, not {self.processing!r}"
            )
        if self.device_families is not None:
            object.__setattr__(self, "device_families", check_families(self.device_families))

    def record(self) -> dict:
        """The settings for cohort.json: the later-added ones only when not at their default
        (so that a cohort made before them resumes, and reads the same)."""
        out = asdict(self)
        for f in fields(self):
            if f.name in LATER_SETTINGS and out[f.name] == f.default:
                del out[f.name]
        if out.get("device_families") is not None:
            out["device_families"] = list(out["device_families"])
        return out


#: Settings added after the first cohorts (recorded only when not at their default).
LATER_SETTINGS = (
    "sessions", "implant_fraction", "device_families", "processing", "contrast_fraction",
    "tissue_labels",
)  # fmt: skip


@dataclass
class CaseResult:
    case_id: str
    ok: bool
    seconds: float
    manifest: ManifestCase | None = None
    dxa_rows: list | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------------
# Bone mineral scaling


def _blur(data: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(data.astype(np.float32), sigma_vox, mode="nearest")


def scale_mineral_to_targets(anatomy: Anatomy, patient: Patient, scanner: Scanner) -> dict:
    """Scale each femur's mineral so its CT total-hip aBMD equals the patient's target.

    The CT a calibration sees is ``blur(soft(kVp))/slope + blur(mineral)`` (mg/cm3), linear in the
    mineral scale s, so aBMD(s) = s * A_mineral + A_rest is solved exactly on the noise-free,
    blurred components (noise averages out in the region). The pelvis gets the mean scale.
    Returns {side: scale, 'pelvis': scale}; the anatomy's mineral is scaled in place.
    """
    spacing = np.linalg.norm(anatomy.affine[:3, :3], axis=0)[::-1]  # (z, y, x) mm
    sigma = scanner.psf_sigma_mm / spacing
    margin = int(np.ceil(4 * sigma.max())) + 2
    scales = {}
    for side in DRAW_SIDES:
        label = FEMUR_LABEL[side]
        box = bounding_box(anatomy.labels == label, margin)
        if box is None:
            raise ValueError(f"the anatomy has no voxel of label {label}")
        affine = box_affine(anatomy.affine, box)
        soft = soft_tissue_at_kvp(anatomy.soft_tissue_hu[box], scanner.kvp)
        mineral = anatomy.mineral_mg_cm3[box]
        own = np.where(anatomy.mineral_owner[box] == label, mineral, 0)
        rest = _blur(soft / np.float32(scanner.hu_per_mg_cm3), sigma) + _blur(mineral - own, sigma)
        labels = Volume(np.ascontiguousarray(anatomy.labels[box]), affine, "label")
        lm = anatomy.landmarks[side]
        a_min, a_rest = (
            _roi_mean(neutral_projection(Volume(v, affine, "mg/cm3"), labels, label, lm))
            for v in (_blur(own, sigma), rest)
        )
        target = patient.total_hip_abmd_g_cm2[side]
        scales[side] = float(np.clip((target - a_rest) / a_min, 0.3, 3.0))
    scales["pelvis"] = float(np.mean([scales[s] for s in DRAW_SIDES]))
    factor = np.ones(256, np.float32)
    for name, ident in BONE_LABELS.items():
        factor[ident] = scales[name.split("_")[1]] if name.startswith("femur") else scales["pelvis"]
    anatomy.mineral_mg_cm3 *= factor[anatomy.mineral_owner]
    return scales


def _roi_mean(proj) -> float:
    return float(proj.abmd_g_cm2[proj.total_hip_roi].mean())


# ------------------------------------------------------------------------------------------------
# One case


def case_id_of(patient: Patient) -> str:
    return f"case_{patient.patient_id}"


def generate_case(patient: Patient, settings: SynthSettings, case_dir: Path) -> dict:
    """Generate one case into ``case_dir`` (created); returns its truth dict."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(patient.seed)
    shape = anatomy_mod.sample_shape(patient, rng)
    spacing = (settings.ct_spacing_mm,) * 3
    anatomy = anatomy_mod.build_anatomy(patient, shape, spacing_mm=spacing, rng=rng)
    scanner = sample_scanner(rng)
    has_phantom = bool(rng.random() >= settings.phantomless_fraction)
    scales = scale_mineral_to_targets(anatomy, patient, scanner)
    implant = None
    if settings.implant_fraction > 0:  # after the scaling: the patient's bone as it was
        plan = draw_implant(patient.seed, settings.implant_fraction)
        implant = insert_implant(anatomy, plan) if plan else None
    contrast = None
    if settings.contrast_fraction > 0:
        crng = contrast_mod.rng_for(patient.seed)
        if crng.random() < settings.contrast_fraction:
            contrast = contrast_mod.sample_contrast(crng)
    result = scan(anatomy, scanner, rng, phantom=has_phantom, contrast=contrast)
    case_dir.mkdir(parents=True, exist_ok=True)
    write_volume(result.ct, case_dir / "ct.nii.gz")
    write_volume(result.labels, case_dir / "labels.nii.gz")
    if settings.tissue_labels:
        write_volume(_tissue_labels(anatomy, result), case_dir / "tissues.nii.gz")
    write_landmarks(anatomy.landmarks, case_dir / "landmarks.json")
    if has_phantom:
        _write_phantom(case_dir / "phantom.json")
    true_line = Calibration.given(
        1.0 / scanner.hu_per_mg_cm3,
        -scanner.water_hu / scanner.hu_per_mg_cm3,
        note="the simulated scanner's true HU scale",
    )
    density = true_line.apply(result.ct)
    sides = {}
    for side in DRAW_SIDES:
        sides[side] = _side_truth(density, result.labels, anatomy, side, implant) | {
            "target_abmd_g_cm2": round(patient.total_hip_abmd_g_cm2[side], 6),
            "mineral_scale": round(scales[side], 5),
        }
        if settings.implant_fraction > 0:  # the mark: this hip's BMD truth is not meaningful
            sides[side]["implant"] = (
                implant["type"] if implant and implant["side"] == side else None
            )
    t_ct = time.perf_counter() - t0
    xrays, sessions = write_radiographs(anatomy, patient, settings, rng, case_dir)
    extra_ct = {}
    if settings.contrast_fraction > 0:
        extra_ct["contrast"] = None if contrast is None else contrast.to_dict()
    if settings.tissue_labels:
        extra_ct["tissues"] = "tissues.nii.gz"
    truth = {
        "format": "xbmd-virtual-case",
        "format_version": 1,
        "xbmd_version": __version__,
        "case_id": case_id_of(patient),
        "patient": {
            "patient_id": patient.patient_id,
            "age_years": round(patient.age_years, 2),
            "sex": patient.sex,
            "height_cm": round(patient.height_cm, 1),
            "weight_kg": round(patient.weight_kg, 1),
            "bone_z": round(patient.bone_z, 4),
            "seed": patient.seed,
        },
        "sides": sides,
        "definitions": "docs/bmd-definitions.md (xbmd.ct.femur)",
        "ct": {
            "file": "ct.nii.gz",
            "labels": "labels.nii.gz",
            "label_map": {
                **BONE_LABELS,
                **{f"rod_{d:g}": k for k, d in ROD_DENSITIES_MG_CM3.items()},
            }
            if has_phantom
            else dict(BONE_LABELS),
            "spacing_mm": list(spacing),
            "shape_kji": list(result.ct.shape),
            "has_phantom": has_phantom,
            "scanner": scanner.to_dict(),
            "true_calibration": {
                "slope_mg_cm3_per_hu": true_line.slope_mg_cm3_per_hu,
                "intercept_mg_cm3": true_line.intercept_mg_cm3,
            },
            **extra_ct,
        },
        "anatomy": anatomy.meta,
        "landmarks": "landmarks.json",
        "xrays": xrays,
    }
    if settings.implant_fraction > 0:
        truth["implant"] = implant
        if implant:
            truth["ct"]["label_map"]["implant"] = IMPLANT_LABEL
    if sessions is not None:
        truth["sessions"] = sessions
    truth["timing_s"] = {"ct": round(t_ct, 2), "total": round(time.perf_counter() - t0, 2)}
    return truth


def _side_truth(density, labels, anatomy: Anatomy, side: str, implant: dict | None) -> dict:
    """The BMD truth of one femur; on the side of an implant, measured as far as the regions
    allow (null where they are empty: the numbers mean nothing there anyway)."""
    try:
        return measure_femur(density, labels, FEMUR_LABEL[side], anatomy.landmarks[side]).to_dict()
    except (GeometryError, InputError):
        if not (implant and implant["side"] == side):
            raise
        return dict.fromkeys(
            ("ct_abmd_g_cm2", "neck_abmd_g_cm2", "qct_vbmd_mg_cm3", "total_hip_area_cm2",
             "neck_area_cm2", "pf_volume_cm3")
        )  # fmt: skip


def _tissue_labels(anatomy: Anatomy, result) -> Volume:
    """Skeletal muscle (253), fat (252) and drawn vessels on the CT grid, as segmented."""
    body = anatomy.meta["body"]
    soft, free = anatomy.soft_tissue_hu, anatomy.mineral_mg_cm3 == 0
    data = np.zeros(result.ct.shape, np.uint8)
    n = soft.shape[1]  # the CT's grid is the anatomy's, padded posteriorly
    data[:, :n][free & np.isclose(soft, body["fat_hu"], atol=1e-3)] = TISSUE_TYPE_IDS["torso_fat"]
    data[:, :n][free & np.isclose(soft, body["muscle_hu"], atol=1e-3)] = TISSUE_TYPE_IDS[
        "skeletal_muscle"
    ]
    if result.vessels is not None:
        data[result.vessels > 0] = result.vessels[result.vessels > 0]
    out = result.ct.with_data(data, unit="label")
    out.source = "synthetic tissue labels"
    return out


def _write_phantom(path: Path) -> None:
    rods = [
        {"label": k, "name": f"HA {d:g}", "density_mg_cm3": d}
        for k, d in sorted(ROD_DENSITIES_MG_CM3.items())
    ]
    doc = {"name": "B-MAS200-like (simulated)", "material": "hydroxyapatite", "rods": rods}
    path.write_text(json.dumps(doc, indent=1))


# ------------------------------------------------------------------------------------------------
# The cohort


def _case_entry(truth: dict, case_dir: Path, dxa: dict) -> ManifestCase:
    ct = truth["ct"]
    has_phantom = ct["has_phantom"]
    return ManifestCase(
        case_id=truth["case_id"],
        patient_id=truth["patient"]["patient_id"],
        ct=case_dir / ct["file"],
        labels=case_dir / ct["labels"],
        label_map=dict(BONE_LABELS),
        calibration="phantom" if has_phantom else "phantomless",
        phantom=str(case_dir / "phantom.json") if has_phantom else None,
        kvp=ct["scanner"]["kvp"],
        xrays=[case_dir / x["dicom"] for x in truth["xrays"]],
        landmarks=case_dir / truth["landmarks"],
        known_poses=case_dir / "truth.json",
        age_years=truth["patient"]["age_years"],
        sex=truth["patient"]["sex"],
        dxa_g_cm2=dxa,
        implants=implant_sides(truth),
    )


def implant_sides(truth: dict) -> dict[str, str]:
    """{side: implant type} of a case's truth.json (empty without implants)."""
    implant = truth.get("implant")
    return {implant["side"]: implant["type"]} if implant else {}


def _simulated_dxa(truth: dict, precision: float, seed: int) -> dict:
    """DXA results: truth times (1 + N(0, precision)), one draw per value, from the case seed."""
    rng = np.random.default_rng([seed, 2024])
    out = {}
    for side in DRAW_SIDES:
        s = truth["sides"][side]
        out[f"dxa_total_hip_{side}_g_cm2"] = s["ct_abmd_g_cm2"] * (1 + rng.normal(0, precision))
        out[f"dxa_neck_{side}_g_cm2"] = s["neck_abmd_g_cm2"] * (1 + rng.normal(0, precision))
    return {k: round(float(v), 4) for k, v in out.items()}


def _run_case(patient: Patient, settings: SynthSettings, out: Path) -> CaseResult:
    """Worker: one case on one thread (same numbers whatever the worker count); never raises."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_case_here(patient, settings, out)
    finally:
        torch.set_num_threads(threads)


def _run_case_here(patient: Patient, settings: SynthSettings, out: Path) -> CaseResult:
    """Generate one case atomically (temporary folder, then rename); never raises."""
    case_id = case_id_of(patient)
    final = out / "cases" / case_id
    t0 = time.perf_counter()
    if (final / "truth.json").exists():  # resumed: finished earlier
        truth = json.loads((final / "truth.json").read_text())
    else:
        tmp = out / "cases" / f".{case_id}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            truth = generate_case(patient, settings, tmp)
            (tmp / "truth.json").write_text(json.dumps(truth, indent=1))
        except Exception as exc:  # one case's failure must not stop the cohort
            shutil.rmtree(tmp, ignore_errors=True)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return CaseResult(case_id, False, time.perf_counter() - t0, error=detail)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dxa = _simulated_dxa(truth, settings.dxa_precision, patient.seed)
    for side in implant_sides(truth):  # DXA does not measure a hip with an implant
        dxa = {k: v for k, v in dxa.items() if f"_{side}_" not in k}
    rows = []
    for side in (s for s in DRAW_SIDES if s not in implant_sides(truth)):
        th = dxa[f"dxa_total_hip_{side}_g_cm2"]
        t = t_score(th, "total_hip", patient.sex)
        rows.append(
            {
                "case_id": case_id,
                "patient_id": patient.patient_id,
                "side": side,
                "total_hip_g_cm2": th,
                "femoral_neck_g_cm2": dxa[f"dxa_neck_{side}_g_cm2"],
                "total_hip_t_score": round(t, 2),
                "who_category": who_category(t),
            }
        )
    return CaseResult(case_id, True, time.perf_counter() - t0, _case_entry(truth, final, dxa), rows)


def _crashed(patient: Patient, exc: BaseException, out: Path) -> CaseResult:
    """The result of a case whose worker process died (killed, out of memory) or whose worker
    raised; what its temporary folder holds is removed."""
    case_id = case_id_of(patient)
    shutil.rmtree(out / "cases" / f".{case_id}.partial", ignore_errors=True)
    if isinstance(exc, BrokenProcessPool):
        error = "its worker process died (killed, or out of memory)"
    else:
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return CaseResult(case_id, False, 0.0, error=error)


def generate_cohort(
    out: str | Path,
    cases: int,
    seed: int,
    settings: SynthSettings | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate ``cases`` virtual patients into ``out``; returns the cohort summary.

    Cases already finished in ``out`` (same seed and settings) are kept, so an interrupted run
    resumes. A failing case is reported in the summary (and cohort.json) and the rest go on.
    """
    out = Path(out)
    settings = settings or SynthSettings()
    identity = {"seed": seed, "settings": settings.record()}
    _adopt_marker_without_identity(out, identity)
    claim_folder(out, MARKER, COHORT_FORMAT, identity)
    patients = sample_patients(cases, seed)
    workers = max(1, min(workers or os.cpu_count() or 1, cases))
    results = list(
        run_cases(
            patients,
            partial(_run_case, settings=settings, out=out),
            partial(_crashed, out=out),
            workers,
            "synth" if progress else None,
        )
    )
    results.sort(key=lambda r: r.case_id)
    return _write_cohort_files(out, seed, settings, results)


def _adopt_marker_without_identity(out: Path, identity: dict) -> None:
    """A cohort.json written before cohorts were claimed through ``xbmd.stages`` has the seed and
    settings but no ``identity``: add it when they are these, so that such a cohort resumes."""
    path = out / MARKER
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or unreadable (claim_folder says so)
        return
    if (
        isinstance(old, dict)
        and old.get("format") == COHORT_FORMAT
        and "identity" not in old
        and {k: old.get(k) for k in identity} == identity
    ):
        write_json(path, old | {"identity": identity})


def _write_cohort_files(out: Path, seed: int, settings: SynthSettings, results) -> dict:
    ok = [r for r in results if r.ok]
    manifest = [r.manifest for r in ok]
    write_atomic(out / "manifest.csv", lambda tmp: write_manifest(manifest, tmp))
    write_csv(out / "dxa.csv", DXA_COLUMNS, [row for r in ok for row in r.dxa_rows])
    summary = {
        "format": COHORT_FORMAT,
        "status": "done",
        "identity": {"seed": seed, "settings": settings.record()},
        "xbmd_version": __version__,
        "seed": seed,
        "settings": settings.record(),
        "cases": len(results),
        "succeeded": len(ok),
        "failed": [{"case_id": r.case_id, "error": r.error} for r in results if not r.ok],
        "seconds_per_case": [round(r.seconds, 2) for r in ok],
    }
    write_json(out / MARKER, summary)
    if ok:  # the manifest must read back with the project's own reader
        read_manifest(out / "manifest.csv")
    return summary
