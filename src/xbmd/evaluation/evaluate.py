"""Validation of a model (or of existing predictions) against references: ``xbmd evaluate``.

Sources of estimates:

- **end to end** (``xbmd.evaluation.end_to_end``): the estimator (localiser, crop, model, checks)
  on the dataset's original whole radiographs, found through prepare.json's manifest, as a user
  runs ``xbmd estimate``. The headline whenever the originals are reachable (``end_to_end=None``);
  hips the estimator did not report are listed as failures.
- **true crops** (``xbmd.evaluation.crops``): the model on every sample's crop at its known or
  registered head, so the figures measure the model without the localiser.
- **a predictions CSV** (``--predictions``): one row per hip image with ``patient_id``,
  ``est_<name>`` and ``ref_<name>`` columns (the ``predictions*.csv`` this command writes have
  that format). Agreement, diagnostic performance and reproducibility only.

Hips with an implant (index ``implant``) are left out of agreement, diagnostics and precision
(their CT labels mean nothing); the quality gate is measured on them.

Sections (``metrics.json``; ``report.html`` shows them, see ``xbmd.evaluation.report``):

- ``headline``: Pearson r, ICC, MAE of the primary estimate per image and per hip, end to end and
  on true crops side by side;
- ``end_to_end``: agreement, diagnostics, the localiser's error, failures and unmatched hips;
- ``sessions``: same-session pose and cross-device precision with LSC
  (``xbmd.evaluation.sessions``), end to end and on true crops;
- ``whole_file_robustness``: the delivered file re-encoded (``xbmd.evaluation.whole_file``);
- ``interval`` and ``gate``: the 95 % interval's coverage and width, the quality gate's flags
  (``xbmd.evaluation.gate``);
- true crops (or the CSV): ``agreement``, ``diagnostic``, ``decomposition`` (the virtual X-ray
  against the reference DRR), ``reproducibility`` over each hip's images, ``robustness`` to
  crop perturbations (``xbmd.evaluation.robustness``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.evaluation.crops import decomposition_section, gallery, predict_dataset
from xbmd.evaluation.end_to_end import (
    EndToEndRun,
    find_originals,
    localisation_summary,
    run_end_to_end,
    write_end_to_end_csv,
)
from xbmd.evaluation.gate import gate_section, interval_section
from xbmd.evaluation.robustness import PERTURBATIONS, robustness_section
from xbmd.evaluation.samples import (
    AREAL_TOTAL_HIP,
    TARGETS,
    Samples,
    agreement_rows,
    check_enough,
    diagnostic_section,
    hip_means,
    plain,
    primary_pair,
    read_predictions,
    reproducibility_section,
    table,
    write_predictions,
)
from xbmd.evaluation.sessions import sessions_section
from xbmd.evaluation.stats import agreement
from xbmd.evaluation.whole_file import DEFAULT_IMAGES, FILE_PERTURBATIONS, whole_file_section

ROBUSTNESS_KINDS = ("pose", *PERTURBATIONS)
FILE_ROBUSTNESS_KINDS = tuple(FILE_PERTURBATIONS)
SETTINGS = {
    "icc": "ICC(2,1) (Shrout & Fleiss): two-way random effects, absolute agreement, single "
    "measurement",
    "pearson_ci": "95 % CI of r from scipy (Fisher z)",
    "bland_altman": "bias = mean(estimate - reference); limits = bias +/- 1.96 SD of the "
    "differences",
    "hip_level": "per hip: the mean of the estimates and of the references over a patient's "
    "images of that hip",
    "psnr": "10 log10(max(reference)^2 / MSE), per image, at model resolution",
    "ssim": "scikit-image structural_similarity, Gaussian window sigma 1.5, sample covariance "
    "off, data range = max(reference)",
    "gradient_correlation": "mean of the normalised cross-correlations of the Sobel x and y "
    "gradients",
    "auc": "ROC area of the estimated T-score (lower = positive) against the reference's WHO "
    "class; Mann-Whitney U / (n_pos n_neg)",
    "reproducibility": "per hip: SD and CV over its images; RMS over hips; LSC = 2.77 x RMS-SD",
    "robustness": "change of the estimate against the untouched crop, % of the untouched value",
    "end_to_end": "Estimator.estimate_xray on the original whole radiograph (localiser "
    "included); hips matched to index rows by radiograph and side; hips not reported are "
    "failures; hips with an implant are left out of agreement",
    "sessions": "session = DICOM study (study_uid); same-session: RMS over (hip, session) "
    "groups; cross-device: RMS over hips of the SD/CV of their session means; LSC = 2.77 x RMS-SD",
    "whole_file_robustness": "the original file re-encoded and estimated again; change of "
    "bmd_g_cm2 in % of the reference variant's (JPEG: the lossless 8-bit export of the same "
    "format; others: the original file)",
    "interval": "coverage: share of hips whose reference lies inside bmd_interval_g_cm2; widths "
    "in g/cm2 and T-score units (t_score_interval)",
    "gate": "flagged = confident false (or not reported, for implant hips); out of "
    "distribution = ood_score > ood_threshold",
}


def headline(modes: dict[str, tuple[Samples, int, int]], primary: tuple[str, str]) -> dict:
    """The primary pair's agreement per image and per hip for each mode, side by side.

    ``modes``: {mode: (samples, hips expected, failures)}.
    """
    est, ref = primary
    rows = []
    for mode, (samples, expected, failed) in modes.items():
        if est not in samples.estimates or ref not in samples.references:
            continue
        for level in ("image", "hip"):
            e, r = samples.estimates[est], samples.references[ref]
            if level == "hip":
                hips = [row["hip"] for row in samples.rows]
                e, _ = hip_means(e, hips)
                r, _ = hip_means(r, hips)
            ok = np.isfinite(e) & np.isfinite(r)
            row = {"mode": mode, "level": level, "expected": None, "failures": None}
            if level == "image":  # hips of the index (without an implant), those not reported
                row.update(expected=expected, failures=failed)
            if ok.sum() >= 3:
                row.update(agreement(e, r))
            else:
                row["n"] = int(ok.sum())
            rows.append(row)
    return {"estimate": display_name(est), "reference": ref, "rows": rows}


def display_name(estimate: str) -> str:
    """The name users see: ``bmd_g_cm2`` for the total-hip aBMD head."""
    return "bmd_g_cm2" if estimate == "ct_abmd_g_cm2" else estimate


def _kinds(values, allowed, what: str) -> list[str]:
    kinds = list(values)
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise InputError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return kinds


def _end_to_end(bundle, dataset, radiographs, wanted: bool | None, progress):
    """(estimator, EndToEndRun) or (None, None, reason) per the ``--end-to-end`` choice."""
    from xbmd.dataset.format import read_index
    from xbmd.estimation.estimator import Estimator

    if wanted is False:
        return None, None, "not requested (--no-end-to-end)"
    rows = read_index(dataset)
    originals = find_originals(dataset, rows, radiographs)
    problem = ""
    if not originals.paths:
        problem = f"the original radiographs are not reachable: {originals.reason}"
    elif wanted is None and not originals.all_found:
        problem = f"not every original radiograph is reachable: {originals.reason}"
    elif bundle.localiser is None:
        problem = f"the model {bundle.source} has no hip localiser"
    if problem:
        if wanted:
            raise InputError(f"--end-to-end: {problem}")
        return None, None, problem
    try:
        estimator = Estimator(bundle)
    except InputError as exc:
        if wanted:
            raise
        return None, None, str(exc)
    return estimator, run_end_to_end(estimator, dataset, rows, originals, progress), ""


def _end_to_end_block(e2e: EndToEndRun, target: str) -> tuple[dict, tuple[str, str] | None]:
    samples = e2e.samples
    block = {
        "radiographs_root": None if e2e.root is None else shown_path(e2e.root),
        "counts": {
            "radiographs": len(e2e.radiographs),
            "hips_expected": len(e2e.records),
            "hips_reported": sum(r["result"] is not None for r in e2e.records),
            "implant_hips": sum(bool(r["implant"]) for r in e2e.records),
            "images": len(samples.rows),
            "hips": len({r["hip"] for r in samples.rows}),
            "patients": len({r["patient_id"] for r in samples.rows}),
            "failed": len(e2e.failures),
            "unmatched": len(e2e.unmatched),
        },
        "agreement": agreement_rows(samples) if samples.rows else [],
        "diagnostic": None,
        "localisation": localisation_summary(e2e.records),
        "failures": e2e.failures,
        "unmatched": e2e.unmatched,
    }
    try:
        primary = primary_pair(samples, target)
    except InputError:
        return block, None
    block["diagnostic"], _ = diagnostic_section(samples, primary)
    return block, primary


def evaluate(
    out: str | Path,
    *,
    model: str | Path | None = None,
    dataset: str | Path | None = None,
    predictions: str | Path | None = None,
    target: str = "ct_abmd_g_cm2",
    robustness: list[str] | None = None,
    end_to_end: bool | None = None,
    radiographs: str | Path | None = None,
    file_robustness: list[str] | None = None,
    robustness_images: int = DEFAULT_IMAGES,
    batch: int = 16,
    command: str = "",
    progress: Callable | None = None,
    site_fit: str | None = "passing-bablok",
    site_delta: float = 1.0,
) -> dict:
    """Evaluate and write ``out``/{metrics.json, predictions.csv, predictions_end_to_end.csv,
    report.html, figures/}.

    Give ``dataset`` (with ``model``, None = the bundled default) or ``predictions``.
    ``end_to_end``: None runs it when every original radiograph is found (``radiographs``: the
    folder the index's xray paths are relative to; default: the manifest's), True insists, False
    skips. ``robustness``: crop tests (``ROBUSTNESS_KINDS``; 'pose' = reproducibility and
    sessions); ``file_robustness``: whole-file tests on ``robustness_images`` radiographs. With
    DXA in the data, ``site_fit`` ('passing-bablok', 'deming' with error ratio ``site_delta``,
    or None) fits the site-calibration line estimate -> DXA (on the end-to-end estimates when
    they ran) and writes it to ``out``/site_calibration.json (``xbmd.evaluation.site_fit``).
    Returns the metrics.
    """
    import datetime
    import json

    from xbmd import __version__
    from xbmd.evaluation.report import write_report
    from xbmd.evaluation.site_fit import FILE_NAME, fit_site_calibration

    if (dataset is None) == (predictions is None):
        raise InputError("give either a dataset (with a model) or a predictions CSV")
    if predictions is not None and end_to_end:
        raise InputError("end to end needs a dataset (its radiographs), not a predictions CSV")
    kinds = _kinds(ROBUSTNESS_KINDS if robustness is None else robustness, ROBUSTNESS_KINDS,
                   "robustness test(s)")  # fmt: skip
    file_kinds = _kinds(
        FILE_ROBUSTNESS_KINDS if file_robustness is None else file_robustness,
        FILE_ROBUSTNESS_KINDS,
        "whole-file robustness test(s)",
    )
    from xbmd.stages import check_output_folder

    out = check_output_folder(Path(out))
    t0 = time.perf_counter()
    runtime = {}
    run, e2e, estimator = None, None, None
    failures: list[dict] = []
    reasons = {}
    if dataset is not None:
        from xbmd.model.bundle import load_bundle

        bundle = load_bundle(model)
        run = predict_dataset(bundle, dataset, batch=batch, progress=progress)
        samples, failures = run.samples, run.failures
        runtime["predict"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        estimator, e2e, reasons["end_to_end"] = _end_to_end(
            bundle, dataset, radiographs, end_to_end, progress
        )
        if e2e is not None:
            runtime["end_to_end"] = time.perf_counter() - t1
    else:
        samples = read_predictions(predictions)
        failures = list(samples.problems)
        reasons["end_to_end"] = "predictions CSV: no radiographs to estimate"
    primary = primary_pair(samples, target)
    check_enough(samples, primary, str(predictions if dataset is None else dataset))
    diag, reasons["diagnostic"] = diagnostic_section(samples, primary)
    decomposition, reasons["decomposition"] = (
        decomposition_section(run) if run else (None, "predictions CSV: no virtual X-rays")
    )
    repro, reasons["reproducibility"] = (
        reproducibility_section(samples) if "pose" in kinds else (None, "not requested")
    )
    robust = None
    perturbations = [k for k in kinds if k in PERTURBATIONS]
    if run is None:
        reasons["robustness"] = "predictions CSV: nothing to re-estimate"
    elif not perturbations:
        reasons["robustness"] = "not requested"
    else:
        t1 = time.perf_counter()
        robust = robustness_section(run, primary[0], perturbations, batch, progress=progress)
        runtime["robustness"] = time.perf_counter() - t1

    e2e_block, e2e_primary, e2e_rows = None, None, []
    sessions = whole = interval = gate = None
    if e2e is not None:
        e2e_block, e2e_primary = _end_to_end_block(e2e, target)
        if e2e_primary is not None:
            e2e_rows = table(e2e.samples, e2e_primary)
        interval_ref = primary[1] if primary[1] in AREAL_TOTAL_HIP else "ct_abmd_g_cm2"
        interval, reasons["interval"] = interval_section(e2e.records, interval_ref)
        gate, reasons["gate"] = gate_section(e2e.records)
        t1 = time.perf_counter()
        whole, reasons["whole_file_robustness"] = whole_file_section(
            estimator, e2e, file_kinds, robustness_images, progress
        )
        runtime["whole_file_robustness"] = time.perf_counter() - t1
    else:
        for key in ("interval", "gate", "whole_file_robustness"):
            reasons[key] = f"needs the end-to-end run ({reasons['end_to_end']})"
    mode = "true_crops" if run is not None else "predictions_csv"
    if "pose" in kinds:
        sessions, reasons["sessions"] = sessions_section(
            {"end_to_end": e2e.samples if e2e else None, mode: samples}, primary[0]
        )
        if sessions:
            sessions["estimate"] = display_name(primary[0])
    else:
        reasons["sessions"] = "not requested"
    modes = {}
    if e2e is not None:
        clean = sum(not r["implant"] for r in e2e.records)
        clean_failed = sum(not f["implant"] for f in e2e.failures)
        modes["end_to_end"] = (e2e.samples, clean, clean_failed)
    modes[mode] = (samples, len(samples.rows) + len(failures), len(failures))
    if site_fit:
        model_info = {}
        if run is not None:
            model_info = {
                "path": shown_path(run.bundle.source),
                "created": run.bundle.created,
                "xbmd_version": run.bundle.xbmd_version,
            }
        # the line maps what `xbmd estimate` reports: fitted on the end-to-end estimates when run
        site_samples = e2e.samples if e2e is not None and e2e.samples.rows else samples
        calibration, site_section, reasons["site_calibration"] = fit_site_calibration(
            site_samples, site_fit, site_delta, model_info, dataset
        )
    else:
        calibration, site_section, reasons["site_calibration"] = None, None, "not requested"
    rows = table(samples, primary)
    _, unit, label = TARGETS[target]
    metrics = {
        "xbmd_version": __version__,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "source": {
            "model": None if run is None else shown_path(run.bundle.source),
            "dataset": None if dataset is None else shown_path(dataset),
            "predictions_csv": None if predictions is None else shown_path(predictions),
            "radiographs": None if e2e is None or e2e.root is None else shown_path(e2e.root),
        },
        "notes": samples.notes,
        "target": {"estimate": primary[0], "reference": primary[1], "unit": unit, "label": label},
        "headline": headline(modes, primary),
        "end_to_end": e2e_block,
        "sessions": sessions,
        "whole_file_robustness": whole,
        "interval": interval,
        "gate": gate,
        "counts": {
            "images": len(samples.rows),
            "hips": len({r["hip"] for r in samples.rows}),
            "patients": len({r["patient_id"] for r in samples.rows}),
            "failed": len(failures),
            "implant_samples_left_out": run.implant_samples if run else 0,
        },
        "settings": SETTINGS,
        "agreement": agreement_rows(samples),
        "diagnostic": diag,
        "decomposition": decomposition,
        "reproducibility": repro,
        "robustness": robust,
        "site_calibration": site_section,
        "not_available": {k: v for k, v in reasons.items() if v},
        "failures": failures,
        "runtime_s": runtime,
    }
    metrics = plain(metrics)
    if calibration is not None:
        calibration.write(out / FILE_NAME)
        metrics["site_calibration"]["file"] = FILE_NAME
    write_predictions(rows, out / "predictions.csv")
    if e2e is not None:
        write_end_to_end_csv(e2e.records, out / "predictions_end_to_end.csv")
    t2 = time.perf_counter()
    write_report(out, metrics, rows, gallery(run, primary) if run else [], e2e_rows)
    runtime["report"] = time.perf_counter() - t2
    runtime["total"] = time.perf_counter() - t0
    metrics["runtime_s"] = plain(runtime)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def shown_path(path) -> str | None:
    """A path as the report shows it: relative to the working folder when inside it, the
    package-relative name for a file shipped with xbmd (the bundled model), else the file's
    name; never the absolute path of the machine the report was made on."""
    if path is None:
        return None
    import xbmd

    path = Path(str(path))
    if not path.is_absolute():
        return path.as_posix()
    resolved = path.resolve()
    package = Path(xbmd.__file__).resolve().parent
    for root, prefix in ((Path.cwd().resolve(), ""), (package, "xbmd/")):
        try:
            return prefix + resolved.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.name
