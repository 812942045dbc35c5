"""`xbmd evaluate`: agreement, diagnostic performance, reproducibility and robustness report."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Validate a model on a dataset written by `xbmd prepare` (or existing estimates in a CSV "
    "with patient_id, est_<name> and ref_<name> columns). End to end first, as users get it: "
    "the estimator (localiser included) on the dataset's original whole radiographs, found "
    "through prepare.json's manifest (on by default when they are all found), each hip matched "
    "to its index row, hips not reported listed as failures; then on the true crops (the model "
    "alone). Reports agreement with every reference (Pearson r with 95 % CI, ICC(2,1), MAE, "
    "RMSE, Bland-Altman) per image and per hip, both side by side; WHO-threshold diagnostics; "
    "PSNR, SSIM and gradient correlation of the virtual X-ray; same-session (pose) and "
    "cross-device (session) RMS-CV with LSC; robustness of the delivered file (whole-radiograph "
    "JPEG as .jpg and inside the DICOM, 8-bit export, resizing, pixel spacing +-5/10/15 %) and of "
    "the crop (JPEG, exposure, gamma, noise); the 95 % interval's coverage and width; the quality "
    "gate on implant and clean hips and the out-of-distribution share. Writes "
    "REPORT/report.html (self-contained), metrics.json, predictions.csv, "
    "predictions_end_to_end.csv and figures/. Exit code 0 when every input was read, 2 when some "
    "sample or original radiograph could not be read or some CSV cells are not numbers (listed, "
    "left out, in metrics.json), 1 on unusable input (fewer than 3 usable rows included). With "
    "DXA in the data it also fits the site-calibration line estimate -> DXA (Passing-Bablok or "
    "Deming, one point per hip) and writes REPORT/site_calibration.json for xbmd estimate "
    "--site-calibration."
)


class SiteFit(str, Enum):
    passing_bablok = "passing-bablok"
    deming = "deming"
    none = "none"


class Target(str, Enum):
    ct_abmd_g_cm2 = "ct_abmd_g_cm2"
    qct_vbmd_mg_cm3 = "qct_vbmd_mg_cm3"
    dxa = "dxa"


def main(
    out: Path = typer.Option(..., "--out", help="Report folder."),
    dataset: Path | None = typer.Option(
        None, "--dataset", help="Dataset folder written by `xbmd prepare` (needs a model)."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model bundle (xbmd train's model.pt); default: the bundled one."
    ),
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        help="CSV of existing estimates and references instead of a model and dataset.",
    ),
    target: Target = typer.Option(
        Target.ct_abmd_g_cm2,
        "--target",
        help="The reference the main plots and the robustness test use (dxa: dxa_total_hip_g_cm2).",
    ),
    robustness: str = typer.Option(
        "pose,jpeg,exposure,gamma,noise",
        "--robustness",
        help="Comma list of: pose (reproducibility), jpeg, exposure, gamma, noise; 'none' for "
        "none.",
    ),
    end_to_end: bool | None = typer.Option(
        None,
        "--end-to-end/--no-end-to-end",
        help="Run the estimator on the original whole radiographs (default: when every one is "
        "found; --end-to-end insists and lists missing ones as failures).",
        show_default=False,
    ),
    radiographs: Path | None = typer.Option(
        None,
        "--radiographs",
        help="Folder the index's xray paths are relative to (default: the folder of the "
        "manifest named in the dataset's prepare.json).",
    ),
    file_robustness: str = typer.Option(
        "png8,jpeg,dicom8,dicom_jpeg,resize,spacing",
        "--file-robustness",
        help="Comma list of whole-file tests (end to end): png8, jpeg (.jpg q95/85/75/50 against "
        "png8), dicom8, dicom_jpeg (JPEG inside the DICOM against dicom8), resize (x0.5), "
        "spacing (+-5/10/15 %); 'none' for none.",
    ),
    robustness_images: int = typer.Option(
        20,
        "--robustness-images",
        min=0,
        help="Radiographs re-encoded for the whole-file tests (evenly spread; 0: none).",
    ),
    site_fit: SiteFit = typer.Option(
        SiteFit.passing_bablok,
        "--site-fit",
        help="With DXA in the data: fit the line estimate -> site DXA (one point per hip) and "
        "write it to REPORT/site_calibration.json for xbmd estimate --site-calibration; none: "
        "no fit.",
    ),
    deming_delta: float = typer.Option(
        1.0,
        "--deming-delta",
        min=1e-6,
        help="Deming only: ratio of the error variances, var(DXA error) / var(estimate error).",
    ),
    batch: int = typer.Option(16, "--batch", min=1, help="Hips per model call."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    with user_errors():
        from tqdm import tqdm

        from xbmd.errors import InputError
        from xbmd.evaluation.evaluate import evaluate

        if predictions is not None and (dataset is not None or model is not None):
            raise InputError("--predictions replaces --dataset and --model; give one or the other")
        if predictions is None and dataset is None:
            raise InputError("give --dataset (a folder written by xbmd prepare) or --predictions")
        kinds = _comma_list(robustness)
        file_kinds = _comma_list(file_robustness.replace("-", "_"))
        if predictions is not None and end_to_end:
            raise InputError("--end-to-end needs --dataset (the radiographs), not --predictions")

        def bar(items):
            return tqdm(items, disable=not progress, file=sys.stderr, leave=False)

        metrics = evaluate(
            out,
            model=model,
            dataset=dataset,
            predictions=predictions,
            target=target.value,
            robustness=kinds,
            end_to_end=end_to_end,
            radiographs=radiographs,
            file_robustness=file_kinds,
            robustness_images=robustness_images,
            batch=batch,
            command="xbmd evaluate " + " ".join(_shown_args(sys.argv[2:])),
            progress=bar,
            site_fit=None if site_fit is SiteFit.none else site_fit.value,
            site_delta=deming_delta,
        )
    for line in summary_lines(metrics):
        typer.echo(line)
    for note in metrics.get("notes", []):
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"report: {out / 'report.html'}   metrics: {out / 'metrics.json'}")
    failures = metrics["failures"]
    e2e = metrics.get("end_to_end") or {}
    missing = sum(1 for f in e2e.get("failures") or [] if f.get("stage") == "read")
    if failures:
        for failure in failures[:10]:
            typer.echo(f"FAILED {failure['sample_id']}: {failure['error']}", err=True)
        if len(failures) > 10:
            typer.echo(f"... and {len(failures) - 10} more", err=True)
        what = "samples could not be read" if dataset is not None else "cells are not numbers"
        typer.echo(f"{len(failures)} {what}: left out of the statistics (metrics.json)", err=True)
    if missing:
        typer.echo(
            f"{missing} hips' original radiographs could not be read (metrics.json)", err=True
        )
    if failures or missing:
        raise typer.Exit(code=2)


def _comma_list(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]


def _shown_args(args: list[str]) -> list[str]:
    """The command line for the report, absolute paths shown as ``shown_path`` shows them."""
    from xbmd.evaluation.evaluate import shown_path

    return [shown_path(a) if Path(a).is_absolute() and Path(a).exists() else a for a in args]


def summary_lines(metrics: dict) -> list[str]:
    """The headline figures, one per line."""

    def f(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    c = metrics["counts"]
    lines = []
    head = metrics.get("headline") or {}
    for a in head.get("rows") or []:
        lines.append(
            f"{a['mode']} ({a['level']}, n={a['n']}): {head['estimate']} vs {head['reference']}: "
            f"r {f(a.get('pearson_r'), '.3f')}, ICC {f(a.get('icc_a1'), '.3f')}, "
            f"MAE {f(a.get('mae'), '.4g')} ({f(a.get('mae_pct'), '.1f')} %)"
            + (f", {a['failures']} failures" if a["level"] == "image" and a["failures"] else "")
        )
    e2e = metrics.get("end_to_end")
    if e2e:
        e = e2e["counts"]
        lines.append(
            f"end to end: {e['hips_reported']} of {e['hips_expected']} hips reported on "
            f"{e['radiographs']} radiographs ({e['implant_hips']} with an implant)"
        )
    source = "true crops" if (metrics.get("source") or {}).get("model") else "predictions"
    lines.append(f"{source}: {c['images']} images, {c['hips']} hips, {c['patients']} patients")
    for a in metrics["agreement"]:
        lines.append(
            f"{a['estimate']} vs {a['reference']} ({a['level']}, n={a['n']}): "
            f"r {f(a['pearson_r'], '.3f')}, ICC(2,1) {f(a['icc_a1'], '.3f')}, "
            f"MAE {f(a['mae'], '.4g')} {a['unit']} ({f(a['mae_pct'], '.1f')} %), "
            f"bias {f(a['bias'], '+.4g')}"
        )
    if metrics["diagnostic"]:
        for t in metrics["diagnostic"]["tasks"]:
            lines.append(
                f"{t['name']} ({t['definition']}, {t['n_positive']}/{t['n']} positive): "
                f"AUC {f(t['auc'], '.3f')}, sensitivity {f(t['sensitivity'], '.2f')}, "
                f"specificity {f(t['specificity'], '.2f')}"
            )
    if metrics["decomposition"]:
        d = metrics["decomposition"]
        lines.append(
            f"virtual X-ray: PSNR {d['psnr_db']['mean']:.2f} dB, SSIM {d['ssim']['mean']:.3f}, "
            f"GC {d['gradient_correlation']['mean']:.3f}"
        )
    if metrics["reproducibility"]:
        for name, r in metrics["reproducibility"]["estimates"].items():
            lines.append(
                f"RMS-CV {name}: {f(r['rms_cv_pct'], '.2f')} % over {r['groups']} hips "
                f"(LSC {f(r['lsc'], '.4g')} {r['unit']})"
            )
    if metrics["robustness"]:
        for r in metrics["robustness"]["rows"]:
            lines.append(
                f"{r['label']}: mean |change| {r['mean_abs_change_pct']:.2f} %, "
                f"p95 {r['p95_abs_change_pct']:.2f} %"
            )
        met = metrics["robustness"]["jpeg_target"]["met"]
        if met is not None:
            lines.append(
                f"JPEG target (mean |change| <= 1 % at quality >= 50): {'met' if met else 'MISSED'}"
            )
    lines += _user_lines(metrics, f)
    site = metrics.get("site_calibration")
    if site:
        lines.append(
            f"site calibration ({site['method']}, {site['n_hips']} hips): DXA = "
            f"{f(site['intercept'], '+.4f')} + {f(site['slope'], '.4f')} x estimate"
            + (f" -> {site['file']}" if site.get("file") else " (not written)")
        )
    lines.append(f"run time {metrics['runtime_s'].get('total', 0):.1f} s")
    return lines


def _user_lines(metrics: dict, f) -> list[str]:
    """Sessions, whole-file robustness, interval and gate, one line each."""
    lines = []
    sessions = metrics.get("sessions") or {}
    for mode, block in (sessions.get("modes") or {}).items():
        s, x = block["same_session"], block["cross_device"]
        lines.append(
            f"{mode}: same-session RMS-CV {f(s['rms_cv_pct'], '.2f')} % "
            f"(LSC {f(s['lsc'], '.3g')} {sessions['unit']}), cross-device "
            f"{f(x['rms_cv_pct'], '.2f')} % (LSC {f(x['lsc'], '.3g')})"
        )
    whole = metrics.get("whole_file_robustness") or {}
    for r in whole.get("rows") or []:
        lines.append(
            f"file {r['label']} (vs {r['reference']}): mean |change| "
            f"{f(r['mean_abs_change_pct'], '.2f')} %, p95 {f(r['p95_abs_change_pct'], '.2f')} %, "
            f"signed {f(r['mean_change_pct'], '+.2f')} %, {r['turned_not_confident']} turned not "
            "confident"
        )
    interval = metrics.get("interval")
    if interval:
        lines.append(
            f"interval: coverage {f(interval['coverage'], '.1%')} over {interval['compared']} "
            f"hips, median width {f(interval['median_width_g_cm2'], '.3f')} g/cm2"
        )
    gate = metrics.get("gate") or {}
    if gate.get("implant"):
        lines.append(
            f"gate: implant hips flagged or refused "
            f"{f(gate['implant']['share_flagged_or_refused'], '.0%')}"
        )
    if gate.get("clean"):
        lines.append(f"gate: clean hips wrongly flagged {f(gate['clean']['share_flagged'], '.1%')}")
    return lines
