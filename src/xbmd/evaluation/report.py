"""The validation report of ``xbmd evaluate``: one self-contained HTML page plus its figures.

``xbmd evaluate`` computes every number (``metrics``, also written as metrics.json), per-image
tables (true crops and end to end) and a small ``gallery``; :func:`write_report` only lays them
out:

1. header: what was evaluated, counts, version, date, command line, run time;
2. headline: the primary pair end to end and on true crops, side by side
   (``xbmd.evaluation.report_sections``);
3. part 1, end to end: agreement, scatter and Bland-Altman plots, diagnostics, the localiser's
   error, failures; reproducibility by session; robustness of the delivered file; the interval;
   the quality gate;
4. part 2, true crops (or the predictions CSV): agreement of the BMD estimate with its reference
   (table of every estimate/reference/level, a scatter plot and a Bland-Altman plot of the
   primary pair per image); diagnostic performance of the estimated T-score (AUC, sensitivity,
   specificity, confusion matrices, WHO 3x3 table); decomposition: predicted proximal-femur DRR
   against the reference DRR (PSNR, SSIM, ...); reproducibility over poses (RMS-CV, RMS-SD,
   least significant change; per-hip spread plot); robustness to JPEG, exposure, gamma and noise
   of the crop (table, plot, whether the JPEG target is met); gallery of the best, median and
   worst images (X-ray, reference DRR, prediction, error map).

The page has no external links, styles, scripts or fonts: every figure is an inline base64 PNG,
so the file can be mailed or archived as it is. The same figures are written as PNG files under
``figures/``. A section whose metrics entry is None or missing says "not available: <reason>";
missing and NaN numbers print as "n/a". Figures are plain :class:`matplotlib.figure.Figure`
objects rendered by Agg, never registered with pyplot, so nothing accumulates across calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xbmd.evaluation import report_sections as sections
from xbmd.evaluation.html_parts import embed as _embed
from xbmd.evaluation.html_parts import esc as _e
from xbmd.evaluation.html_parts import html_table as _table
from xbmd.evaluation.html_parts import not_available as _not_available
from xbmd.evaluation.html_parts import pct_of_one
from xbmd.evaluation.html_parts import plot_or_reason as _plot_or_reason
from xbmd.evaluation.numbers import (
    _finite,
    fmt_int,
    fmt_number,
    fmt_p,
    fmt_range,
    fmt_seconds,
)
from xbmd.evaluation.plots import (
    bland_altman_plot,
    bmd_at_t_thresholds,
    gallery_figure,
    pose_spread_plot,
    robustness_plot,
    scatter_plot,
)
from xbmd.evaluation.site_fit import site_calibration_html

#: Largest gallery PNG, bytes: noisy radiographs compress badly, so a bigger row is redrawn at a
#: lower resolution (three rows then stay under ~0.9 MB of base64).
GALLERY_MAX_PNG_BYTES = 220_000
#: Figures written under figures/, besides gallery_<n>_<label>.png.
FIGURE_NAMES = (
    "scatter",
    "bland_altman",
    "pose_spread",
    "robustness",
    "e2e_scatter",
    "e2e_bland_altman",
    "file_robustness",
)
#: Why a section is missing, unless metrics["not_available"][section] says otherwise.
MISSING_REASONS = {
    "diagnostic": "not computed in this evaluation (needs reference T-scores)",
    "decomposition": "not computed in this evaluation (needs reference DRRs)",
    "reproducibility": "not computed in this evaluation (needs hips imaged in two or more poses)",
    "robustness": "not computed in this evaluation (robustness run not asked for)",
    "end_to_end": "not computed in this evaluation",
    "sessions": "not computed in this evaluation (needs study UIDs)",
    "whole_file_robustness": "not computed in this evaluation",
    "interval": "not computed in this evaluation",
    "gate": "not computed in this evaluation",
}
_CSS = """
body { font-family: sans-serif; max-width: 1150px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h1.part { font-size: 1.35em; margin-top: 2.2em; color: #234; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td.t, th.t { text-align: left; }
tr.primary td { background: #fff7d6; }
pre { background: #f5f5f5; padding: 0.6em; white-space: pre-wrap; word-break: break-all; }
.na { color: #a33; font-style: italic; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; } figure { margin: 0.8em 0; display: inline-block; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; font-size: 0.9em; }
dt { font-weight: bold; } dd { margin: 0; }
"""


# --------------------------------------------------------------------------- sections


def _header(metrics: dict) -> str:
    source = metrics.get("source") or {}
    counts = metrics.get("counts") or {}
    target = metrics.get("target") or {}
    runtime = metrics.get("runtime_s") or {}
    facts = [
        ("model", source.get("model")),
        ("dataset", source.get("dataset")),
        ("predictions", source.get("predictions_csv")),
        ("estimate", target.get("estimate")),
        ("reference", f"{target.get('reference')} ({target.get('label', '')})"),
        (
            "images / hips / patients",
            " / ".join(fmt_int(counts.get(k)) for k in ("images", "hips", "patients")),
        ),
        ("xbmd version", metrics.get("xbmd_version")),
        ("created (UTC)", metrics.get("created_utc")),
        ("run time", ", ".join(f"{k} {fmt_seconds(v)}" for k, v in runtime.items()) or None),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v is not None)
    settings = metrics.get("settings") or {}
    defined = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in settings.items())
    return (
        "<h1>xbmd validation report</h1>"
        f"<dl>{items}</dl><p>command:</p><pre>{_e(metrics.get('command', 'n/a'))}</pre>"
        + (f"<h3>Definitions</h3><dl>{defined}</dl>" if defined else "")
    )


def _agreement_section(
    metrics: dict,
    table: Sequence[dict],
    figures_dir: Path,
    rows: Sequence[dict] | None = None,
    title: str = "<h2>Agreement</h2>",
    prefix: str = "",
    estimate_label: str | None = None,
) -> str:
    """Agreement table, scatter and Bland-Altman plots (figures ``<prefix>scatter`` and
    ``<prefix>bland_altman``); ``rows`` default to ``metrics["agreement"]``;
    ``estimate_label`` names the primary estimate (default: the target's)."""
    parts = [title]
    rows = metrics.get("agreement") if rows is None else rows
    target = metrics.get("target") or {}
    if not rows:
        parts.append(_not_available("no agreement rows"))
    else:
        parts.append(_agreement_table(rows, target))
    unit = target.get("unit", "g/cm2")
    est = [row.get("estimate") for row in table]
    ref = [row.get("reference") for row in table]
    label = target.get("label") or target.get("reference") or "reference"
    estimate_label = estimate_label or str(target.get("estimate", "estimate"))
    parts.append(f"<p>Primary pair per image: {_e(estimate_label)} against {_e(label)}.</p>")
    thresholds = bmd_at_t_thresholds(table)
    parts.append(
        _plot_or_reason(
            lambda: scatter_plot(
                est,
                ref,
                unit,
                estimate_label=estimate_label,
                reference_label=str(label),
                thresholds=thresholds,
            ),
            figures_dir,
            f"{prefix}scatter",
            "estimate against reference"
            + ("; dotted: WHO T-score thresholds" if thresholds else ""),
        )
    )
    parts.append(
        _plot_or_reason(
            lambda: bland_altman_plot(est, ref, unit),
            figures_dir,
            f"{prefix}bland_altman",
            "difference against mean; limits of agreement = bias +/- 1.96 SD",
        )
    )
    return "".join(parts)


def _agreement_table(rows: Sequence[dict], target: dict) -> str:
    header = [
        "estimate",
        "reference",
        "level",
        "n",
        "Pearson r [95 % CI]",
        "p",
        "ICC(A,1)",
        "MAE",
        "MAE %",
        "RMSE",
        "bias",
        "95 % limits of agreement",
    ]
    cells, classes = [], []
    for row in rows:
        unit = row.get("unit", "")
        cells.append(
            [
                _e(row.get("estimate")),
                _e(row.get("reference")),
                _e(row.get("level")),
                fmt_int(row.get("n")),
                f"{fmt_number(row.get('pearson_r'))} [{fmt_range(row.get('pearson_ci95'))}]",
                fmt_p(row.get("pearson_p")),
                fmt_number(row.get("icc_a1")),
                _e(fmt_number(row.get("mae"), 3, unit)),
                fmt_number(row.get("mae_pct"), 1, "%"),
                _e(fmt_number(row.get("rmse"), 3, unit)),
                _e(fmt_number(row.get("bias"), 3, unit)),
                _e(fmt_range(row.get("limits_of_agreement"), 3, unit)),
            ]
        )
        primary = (row.get("estimate"), row.get("reference"), row.get("level")) == (
            target.get("estimate"),
            target.get("reference"),
            "image",
        )
        classes.append("primary" if primary else "")
    note = '<p class="note">Highlighted: the primary pair, plotted below.</p>'
    return _table(header, cells, left=3, classes=classes) + note


def _diagnostic_section(
    diagnostic: dict | None, missing: str, title: str = "<h2>Diagnostic performance</h2>"
) -> str:
    parts = [title]
    if not diagnostic:
        return parts[0] + _not_available(missing)
    parts.append(
        f"<p>Truth: T-score of {_e(diagnostic.get('reference'))}; young-adult reference "
        f"{_e(diagnostic.get('t_score_reference'))}.</p>"
    )
    header = [
        "task",
        "definition",
        "n",
        "positive",
        "AUC",
        "sensitivity",
        "specificity",
        "TP",
        "FP",
        "TN",
        "FN",
    ]
    rows = []
    for task in diagnostic.get("tasks") or []:
        confusion = task.get("confusion") or {}
        rows.append(
            [
                _e(task.get("name")),
                _e(task.get("definition")),
                fmt_int(task.get("n")),
                fmt_int(task.get("n_positive")),
                fmt_number(task.get("auc")),
                pct_of_one(task.get("sensitivity")),
                pct_of_one(task.get("specificity")),
                *(fmt_int(confusion.get(k)) for k in ("tp", "fp", "tn", "fn")),
            ]
        )
    parts.append(_table(header, rows, left=2) if rows else _not_available("no tasks"))
    parts.append(_who_table(diagnostic.get("who")))
    return "".join(parts)


def _who_table(who: dict | None) -> str:
    if not who or not who.get("matrix"):
        return _not_available("no WHO category table")
    labels = [str(v) for v in who.get("labels", [])]
    matrix = np.asarray(who["matrix"], dtype=float)
    header = ["reference \\ estimated", *(_e(v) for v in labels), "total"]
    rows = [
        [_e(label), *(fmt_int(v) for v in row), fmt_int(row.sum())]
        for label, row in zip(labels, matrix, strict=True)
    ]
    total = matrix.sum()
    agree = np.trace(matrix) / total * 100 if total else float("nan")
    return (
        "<h3>WHO category (rows: reference, columns: estimate)</h3>"
        + _table(header, rows)
        + f"<p>Same category: {fmt_int(np.trace(matrix))} of {fmt_int(total)} "
        f"({fmt_number(agree, 1, '%')}).</p>"
    )


def _decomposition_section(decomposition: dict | None, missing: str) -> str:
    title = "<h2>Decomposition (predicted against reference DRR)</h2>"
    if not decomposition:
        return title + _not_available(missing)
    image_rows = [
        ("PSNR", "psnr_db", 2, "dB"),
        ("SSIM", "ssim", 3, ""),
        ("gradient correlation", "gradient_correlation", 3, ""),
    ]
    rows = []
    for name, key, digits, unit in image_rows:
        summary = decomposition.get(key) or {}
        rows.append([name, *(fmt_number(summary.get(s), digits, unit) for s in ("mean", "median"))])
    pf = decomposition.get("pf_abmd") or {}
    pf_rows = [
        ["bias", fmt_number(pf.get("bias_g_cm2"), 3, "g/cm2")],
        ["mean |error|", fmt_number(pf.get("mean_abs_error_g_cm2"), 3, "g/cm2")],
        ["mean |error| %", fmt_number(pf.get("mean_abs_error_pct"), 2, "%")],
        ["median |error| %", fmt_number(pf.get("median_abs_error_pct"), 2, "%")],
    ]
    return (
        title
        + f"<p>n = {fmt_int(decomposition.get('n'))} images.</p>"
        + _table(["image similarity", "mean", "median"], rows)
        + "<h3>Proximal-femur aBMD from the predicted DRR</h3>"
        + _table(["", "value"], pf_rows)
    )


def _reproducibility_section(
    reproducibility: dict | None, missing: str, table: Sequence[dict], figures_dir: Path, unit: str
) -> str:
    title = "<h2>Reproducibility over poses</h2>"
    if not reproducibility:
        return title + _not_available(missing)
    rows = []
    for kind, key in (("estimate", "estimates"), ("reference itself", "reference_itself")):
        for name, values in (reproducibility.get(key) or {}).items():
            u = values.get("unit", "")
            rows.append(
                [
                    _e(name),
                    kind,
                    fmt_int(values.get("groups")),
                    fmt_number(values.get("rms_cv_pct"), 2, "%"),
                    _e(fmt_number(values.get("rms_sd"), 4, u)),
                    _e(fmt_number(values.get("lsc"), 3, u)),
                ]
            )
    for name, key in (
        ("published X-ray BMD", "published_rms_cv_pct"),
        ("DXA total hip precision", "dxa_total_hip_precision_pct"),
    ):
        rows.append([name, "literature", "", fmt_range(reproducibility.get(key), 2, "%"), "", ""])
    header = ["quantity", "kind", "hips", "RMS-CV", "RMS-SD", "LSC (95 %)"]
    return (
        title
        + _table(header, rows, left=2)
        + '<p class="note">RMS-CV: root-mean-square coefficient of variation over the poses of '
        "each hip; LSC: least significant change (2.77 x RMS-SD).</p>"
        + _plot_or_reason(
            lambda: pose_spread_plot(table, unit),
            figures_dir,
            "pose_spread",
            "per-hip spread of the estimate over poses",
        )
    )


def _fmt_level(value) -> str:
    """A perturbation level (JPEG quality 50, gamma 1.25, noise 0.005) in its shortest form."""
    return f"{float(value):.4g}" if _finite(value) else "n/a"


def _robustness_section(robustness: dict | None, missing: str, figures_dir: Path) -> str:
    title = "<h2>Robustness</h2>"
    if not robustness:
        return title + _not_available(missing)
    rows = robustness.get("rows") or []
    cells = [
        [
            _e(r.get("kind")),
            _e(r.get("label")),
            _fmt_level(r.get("level")),
            fmt_int(r.get("n")),
            fmt_number(r.get("mean_abs_change_pct"), 2, "%"),
            fmt_number(r.get("p95_abs_change_pct"), 2, "%"),
            fmt_number(r.get("mean_change_pct"), 2, "%"),
        ]
        for r in rows
    ]
    header = [
        "kind",
        "perturbation",
        "level",
        "n",
        "mean |change|",
        "95th pct |change|",
        "mean change (signed)",
    ]
    target = robustness.get("jpeg_target") or {}
    met = {True: "met", False: "NOT met"}.get(target.get("met"), "not assessed")
    return (
        title
        + f"<p>Change of {_e(robustness.get('estimate'))} against the unperturbed image.</p>"
        + (_table(header, cells, left=2) if cells else _not_available("no rows"))
        + f"<p><b>JPEG target</b> (mean |change| &le; "
        f"{fmt_number(target.get('max_mean_abs_change_pct'), 1, '%')} down to quality "
        f"{fmt_int(target.get('min_quality'))}): <b>{met}</b>.</p>"
        + _plot_or_reason(lambda: robustness_plot(rows, target), figures_dir, "robustness")
    )


def _gallery_section(gallery: Sequence[dict], figures_dir: Path, unit: str) -> str:
    title = "<h2>Gallery</h2>"
    if not gallery:
        return title + _not_available("no gallery images")
    parts = [
        title,
        '<p class="note">X-ray | reference DRR | predicted DRR (one colour scale) | '
        "prediction - reference.</p>",
    ]
    for index, item in enumerate(gallery, start=1):
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", str(item.get("label", "item")))
        caption = (
            f"{item.get('label', '')}: {item.get('sample_id', '')}, |BMD error| = "
            f"{fmt_number(item.get('abs_error_pct'), 1, '%')}"
        )
        if item.get("region") is not None:
            caption += "; cyan outline: predicted proximal-femur region"
        figure = gallery_figure(item, unit)
        name = f"gallery_{index}_{label}"
        parts.append(_embed(figure, figures_dir, name, caption, GALLERY_MAX_PNG_BYTES))
    return "".join(parts)


def _end_to_end_section(
    metrics: dict, table: Sequence[dict], figures_dir: Path, missing: str
) -> str:
    title = "<h2>End to end</h2>"
    block = metrics.get("end_to_end")
    if not block:
        return title + _not_available(missing)
    c = block.get("counts") or {}
    intro = (
        f"<p>The estimator on {fmt_int(c.get('radiographs'))} original radiographs (under "
        f"{_e(block.get('radiographs_root'))}): {fmt_int(c.get('hips_reported'))} of "
        f"{fmt_int(c.get('hips_expected'))} hips of the index reported, "
        f"{fmt_int(c.get('implant_hips'))} with an implant (left out of agreement), "
        f"{fmt_int(c.get('failed'))} failures, {fmt_int(c.get('unmatched'))} reported hips with "
        "no index row.</p>"
    )
    unmatched = block.get("unmatched") or []
    return (
        title
        + intro
        + _agreement_section(
            metrics,
            table,
            figures_dir,
            block.get("agreement") or [],
            "",
            prefix="e2e_",
            estimate_label=f"{(metrics.get('headline') or {}).get('estimate', 'estimate')}, "
            "end to end",
        )
        + _diagnostic_section(
            block.get("diagnostic"),
            "no total-hip areal BMD reference",
            "<h3>Diagnostic performance, end to end</h3>",
        )
        + sections.localisation_line(block.get("localisation"))
        + sections.failures_table(block.get("failures") or [])
        + (
            "<h3>Reported hips with no index row</h3>"
            + _table(
                ["radiograph", "side", "why", "bmd_g_cm2"],
                [
                    [
                        _e(u.get("xray")),
                        _e(u.get("side")),
                        _e(u.get("reason")),
                        fmt_number(u.get("bmd_g_cm2")),
                    ]
                    for u in unmatched
                ],
                left=3,
            )
            if unmatched
            else ""
        )
    )


# --------------------------------------------------------------------------- entry point


def write_report(
    out_dir: Path,
    metrics: dict,
    table: list[dict],
    gallery: list[dict],
    end_to_end_table: list[dict] | None = None,
) -> Path:
    """Write out_dir/report.html (self-contained: every image embedded as base64 PNG, no external
    CSS/JS/fonts) and the same figures as PNG files under out_dir/figures/. Returns the html path.

    ``metrics``: the dict of ``xbmd evaluate`` (metrics.json); ``table``: one dict per image with
    at least ``hip``, ``estimate``, ``reference`` (primary pair, in ``metrics["target"]["unit"]``);
    ``gallery``: 0-3 dicts for :func:`gallery_figure`; ``end_to_end_table``: the same as
    ``table`` for the end-to-end estimates. The page: header, headline, part 1 end to end
    (agreement, sessions, delivered-file robustness, interval, gate), part 2 true crops (or the
    predictions CSV: agreement, diagnostics, decomposition, pose reproducibility, crop
    robustness, gallery).
    An optional ``metrics["not_available"]`` (section -> reason) replaces the default reasons
    (:data:`MISSING_REASONS`) printed for a section that is None. Figures this function wrote
    earlier in ``out_dir/figures`` are removed first, so none outlives a re-run.

    >>> write_report(Path("out"), metrics, table, gallery)  # doctest: +SKIP
    PosixPath('out/report.html')
    """
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):
        if old.stem in FIGURE_NAMES or old.stem.startswith("gallery_"):
            old.unlink()
    unit = (metrics.get("target") or {}).get("unit", "g/cm2")
    reasons = {**MISSING_REASONS, **(metrics.get("not_available") or {})}
    second = "true crops" if (metrics.get("source") or {}).get("model") else "predictions CSV"
    body = "".join(
        [
            _header(metrics),
            sections.headline_section(metrics.get("headline"), unit),
            '<h1 class="part">Part 1: end to end, as users get it</h1>',
            _end_to_end_section(
                metrics, end_to_end_table or [], figures_dir, reasons["end_to_end"]
            ),
            sections.sessions_section(metrics.get("sessions"), reasons["sessions"]),
            sections.whole_file_section(
                metrics.get("whole_file_robustness"), reasons["whole_file_robustness"], figures_dir
            ),
            sections.interval_section(metrics.get("interval"), reasons["interval"]),
            sections.gate_section(metrics.get("gate"), reasons["gate"]),
            f'<h1 class="part">Part 2: {second}</h1>',
            _agreement_section(metrics, table, figures_dir),
            _diagnostic_section(metrics.get("diagnostic"), reasons["diagnostic"]),
            _decomposition_section(metrics.get("decomposition"), reasons["decomposition"]),
            _reproducibility_section(
                metrics.get("reproducibility"), reasons["reproducibility"], table, figures_dir, unit
            ),
            _robustness_section(metrics.get("robustness"), reasons["robustness"], figures_dir),
            site_calibration_html(
                metrics.get("site_calibration"), reasons.get("site_calibration", "not computed")
            ),
            _gallery_section(gallery, figures_dir, unit),
        ]
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>xbmd validation report</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
