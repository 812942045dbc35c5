"""`xbmd evaluate`: agreement, diagnostic performance, reproducibility and robustness report."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from xbmd.commands._common import user_errors

HELP = (
    "Validate a model on a dataset written by `xbmd prepare` (or existing estimates in a CSV "
    "with patient_id, est_<name> and ref_<name> columns): agreement with every reference "
    "present (Pearson r with 95 % CI, ICC(2,1), MAE, RMSE, Bland-Altman), per image and per "
    "hip; osteoporosis and low-bone-mass detection at the WHO thresholds (AUC, sensitivity, "
    "specificity, confusion matrices); PSNR, SSIM and gradient correlation of the virtual X-ray; "
    "reproducibility across each hip's images (RMS-CV, LSC); and the change of the estimate "
    "after JPEG compression, exposure, gamma and noise. Writes REPORT/report.html "
    "(self-contained), metrics.json, predictions.csv and figures/. Exit code 0 when every "
    "sample was evaluated, 2 when some could not be read (listed in metrics.json), 1 on "
    "unusable input. With DXA in the data it also fits the site-calibration line estimate -> "
    "DXA (Passing-Bablok or Deming, one point per hip) and writes REPORT/site_calibration.json "
    "for xbmd estimate --site-calibration."
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
        kinds = [k.strip() for k in robustness.split(",") if k.strip() and k.strip() != "none"]

        def bar(items):
            return tqdm(items, disable=not progress, file=sys.stderr, leave=False)

        metrics = evaluate(
            out,
            model=model,
            dataset=dataset,
            predictions=predictions,
            target=target.value,
            robustness=kinds,
            batch=batch,
            command="xbmd evaluate " + " ".join(sys.argv[2:]),
            progress=bar,
            site_fit=None if site_fit is SiteFit.none else site_fit.value,
            site_delta=deming_delta,
        )
    for line in summary_lines(metrics):
        typer.echo(line)
    typer.echo(f"report: {out / 'report.html'}   metrics: {out / 'metrics.json'}")
    if metrics["failures"]:
        typer.echo(f"{len(metrics['failures'])} samples could not be read (metrics.json)", err=True)
        raise typer.Exit(code=2)


def summary_lines(metrics: dict) -> list[str]:
    """The headline figures, one per line."""

    def f(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    c = metrics["counts"]
    lines = [f"{c['images']} images, {c['hips']} hips, {c['patients']} patients"]
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
    site = metrics.get("site_calibration")
    if site:
        lines.append(
            f"site calibration ({site['method']}, {site['n_hips']} hips): DXA = "
            f"{f(site['intercept'], '+.4f')} + {f(site['slope'], '.4f')} x estimate"
            + (f" -> {site['file']}" if site.get("file") else " (not written)")
        )
    lines.append(f"run time {metrics['runtime_s'].get('total', 0):.1f} s")
    return lines
