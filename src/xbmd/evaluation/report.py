"""The validation report of ``xbmd evaluate``: one self-contained HTML page plus its figures.

``xbmd evaluate`` computes every number (``metrics``, also written as metrics.json), a per-image
``table`` and a small ``gallery``; :func:`write_report` only lays them out:

1. header: what was evaluated, counts, version, date, command line, run time;
2. agreement of the BMD estimate with its reference (table of every estimate/reference/level, a
   scatter plot and a Bland-Altman plot of the primary pair per image);
3. diagnostic performance of the estimated T-score (AUC, sensitivity, specificity, confusion
   matrices, WHO 3x3 table);
4. decomposition: predicted proximal-femur DRR against the reference DRR (PSNR, SSIM, ...);
5. reproducibility over poses (RMS-CV, RMS-SD, least significant change; per-hip spread plot);
6. robustness to JPEG, exposure, gamma and noise (table, plot, whether the JPEG target is met);
7. gallery of the best, median and worst images (X-ray, reference DRR, prediction, error map).

The page has no external links, styles, scripts or fonts: every figure is an inline base64 PNG,
so the file can be mailed or archived as it is. The same figures are written as PNG files under
``figures/``. A section whose metrics entry is None or missing says "not available: <reason>";
missing and NaN numbers print as "n/a". Figures are plain :class:`matplotlib.figure.Figure`
objects rendered by Agg, never registered with pyplot, so nothing accumulates across calls.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from xbmd.errors import InputError

#: Display resolution of every figure, dots per inch (keeps the page small).
DPI = 90
#: Largest gallery PNG, bytes: noisy radiographs compress badly, so a bigger row is redrawn at a
#: lower resolution (three rows then stay under ~0.9 MB of base64).
GALLERY_MAX_PNG_BYTES = 220_000
#: Lowest resolution a gallery row is redrawn at, dots per inch.
GALLERY_MIN_DPI = 50
#: Fewest finite (estimate, reference) pairs worth a scatter or Bland-Altman plot.
MIN_PAIRS = 3
#: WHO T-score thresholds drawn on the scatter plot when they can be converted to BMD.
WHO_T_THRESHOLDS = {"T = -1": -1.0, "T = -2.5": -2.5}
#: Figures written under figures/, besides gallery_<n>_<label>.png.
FIGURE_NAMES = ("scatter", "bland_altman", "pose_spread", "robustness")
#: Why a section is missing, unless metrics["not_available"][section] says otherwise.
MISSING_REASONS = {
    "diagnostic": "not computed in this evaluation (needs reference T-scores)",
    "decomposition": "not computed in this evaluation (needs reference DRRs)",
    "reproducibility": "not computed in this evaluation (needs hips imaged in two or more poses)",
    "robustness": "not computed in this evaluation (robustness run not asked for)",
}
#: Axis label and order of the robustness perturbations.
ROBUSTNESS_KINDS = {
    "jpeg": "JPEG quality",
    "exposure": "exposure gradient across the crop (%)",
    "gamma": "gamma",
    "noise": "noise SD (% of the intensity window)",
}
_CSS = """
body { font-family: sans-serif; max-width: 1150px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
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


class TooFewValuesError(InputError):
    """A plot was asked for with too few finite values to draw it."""


# --------------------------------------------------------------------------- formatting


def _finite(value) -> bool:
    """True for a real, finite number (not None, NaN, inf or a non-number)."""
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt_number(value, digits: int = 3, unit: str = "") -> str:
    """``value`` with ``digits`` decimals and an optional unit; "n/a" when missing or not finite.

    >>> fmt_number(0.91234, 3, "g/cm2"), fmt_number(float("nan"))
    ('0.912 g/cm2', 'n/a')
    """
    if not _finite(value):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    return f"{text} {unit}" if unit else text


def fmt_int(value) -> str:
    """An integer count, or "n/a"."""
    return str(int(value)) if _finite(value) else "n/a"


def fmt_p(value) -> str:
    """A p-value: 4 decimals down to 1e-4, scientific notation below; "n/a" when missing."""
    if not _finite(value):
        return "n/a"
    value = float(value)
    if value == 0.0:
        return "< 1e-300"
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def fmt_range(pair, digits: int = 3, unit: str = "") -> str:
    """``[lo, hi]`` as "lo to hi unit"; "n/a" when missing."""
    if not isinstance(pair, Sequence) or len(pair) != 2 or not all(_finite(v) for v in pair):
        return "n/a"
    text = f"{fmt_number(pair[0], digits)} to {fmt_number(pair[1], digits)}"
    return f"{text} {unit}" if unit else text


def fmt_seconds(value) -> str:
    """A duration in seconds, with minutes added from two minutes on."""
    if not _finite(value):
        return "n/a"
    value = float(value)
    return f"{value:.1f} s" + (f" ({value / 60:.1f} min)" if value >= 120 else "")


def _e(value) -> str:
    """HTML-escaped text of anything (None -> "n/a")."""
    return "n/a" if value is None else html.escape(str(value), quote=True)


def _not_available(reason: str) -> str:
    return f'<p class="na">not available: {_e(reason)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, classes=()) -> str:
    """An HTML table of already escaped cells; the first ``left`` columns are left-aligned."""

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(
            f'<{tag} class="t">{c}</{tag}>' if i < left else f"<{tag}>{c}</{tag}>"
            for i, c in enumerate(row)
        )

    classes = list(classes) + [""] * (len(rows) - len(classes))
    body = "".join(
        f'<tr class="{cls}">{cells("td", row)}</tr>' if cls else f"<tr>{cells('td', row)}</tr>"
        for row, cls in zip(rows, classes, strict=True)
    )
    return f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- figures


def _finite_pairs(estimate, reference) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite numbers (None counts as missing)."""
    est = np.array([float(v) if _finite(v) else np.nan for v in estimate], dtype=float)
    ref = np.array([float(v) if _finite(v) else np.nan for v in reference], dtype=float)
    keep = np.isfinite(est) & np.isfinite(ref)
    return est[keep], ref[keep]


def bmd_at_t_thresholds(table: Sequence[dict]) -> dict[str, float] | None:
    """BMD (the table's unit) at T = -1 and T = -2.5, from the table's (BMD, T-score) pairs.

    T-scores are linear in BMD, so two distinct pairs fix the line; returns None when the table
    has no such pairs or they do not lie on one line (e.g. sex-specific references).
    """
    bmd, t = [], []
    for row in table:
        for value_key, t_key in (("estimate", "estimate_t"), ("reference", "reference_t")):
            if _finite(row.get(value_key)) and _finite(row.get(t_key)):
                bmd.append(float(row[value_key]))
                t.append(float(row[t_key]))
    if len(bmd) < 2 or np.ptp(bmd) <= 0:
        return None
    slope, intercept = np.polyfit(bmd, t, 1)
    if slope <= 0 or np.max(np.abs(np.polyval([slope, intercept], bmd) - t)) > 1e-3:
        return None
    return {name: (t_value - intercept) / slope for name, t_value in WHO_T_THRESHOLDS.items()}


def scatter_plot(
    estimate: Sequence[float],
    reference: Sequence[float],
    unit: str,
    *,
    estimate_label: str = "estimate",
    reference_label: str = "reference",
    thresholds: dict[str, float] | None = None,
) -> Figure:
    """Estimate (y) against reference (x), in ``unit``, with the identity and least-squares lines.

    ``thresholds`` (name -> value in ``unit``, e.g. from :func:`bmd_at_t_thresholds`) are drawn
    as faint lines on both axes. Raises :class:`TooFewValuesError` below 3 finite pairs.
    """
    est, ref = _finite_pairs(estimate, reference)
    if est.size < MIN_PAIRS:
        raise TooFewValuesError(f"{est.size} finite estimate/reference pairs, {MIN_PAIRS} needed")
    fig = Figure(figsize=(5, 4.4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    lo, hi = float(min(est.min(), ref.min())), float(max(est.max(), ref.max()))
    pad = 0.05 * (hi - lo or 1.0)
    lims = (lo - pad, hi + pad)
    above = blended_transform_factory(ax.transData, ax.transAxes)
    for name, value in (thresholds or {}).items():
        if lims[0] < value < lims[1]:
            ax.axvline(value, color="0.75", lw=0.8, ls=":")
            ax.axhline(value, color="0.75", lw=0.8, ls=":")
            # Named above the frame: inside it the labels would cross the points.
            ax.text(
                value,
                1.01,
                name,
                transform=above,
                color="0.45",
                fontsize=7,
                ha="center",
                va="bottom",
            )
    ax.scatter(ref, est, s=14, alpha=0.7, color="tab:blue", edgecolors="none", zorder=3)
    ax.plot(lims, lims, color="0.4", lw=1, ls="--", label="identity")
    if np.ptp(ref) > 0:
        slope, intercept = np.polyfit(ref, est, 1)
        r = float(np.corrcoef(ref, est)[0, 1]) if np.ptp(est) > 0 else float("nan")
        sign = "-" if intercept < 0 else "+"
        label = f"fit: y = {slope:.3f} x {sign} {abs(intercept):.3f}\n(r = {fmt_number(r)}, "
        label += f"n = {est.size})"
        ax.plot(lims, slope * np.array(lims) + intercept, color="tab:red", lw=1.3, label=label)
    ax.set(xlim=lims, ylim=lims, aspect="equal")
    ax.set_xlabel(f"{reference_label} ({unit})")
    ax.set_ylabel(f"{estimate_label} ({unit})")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.25)
    return fig


def bland_altman_plot(estimate: Sequence[float], reference: Sequence[float], unit: str) -> Figure:
    """Difference (estimate - reference) against their mean, with the bias and 95 % limits.

    Limits of agreement are bias +/- 1.96 SD (SD with ddof=1), in ``unit``. Raises
    :class:`TooFewValuesError` below 3 finite pairs.
    """
    est, ref = _finite_pairs(estimate, reference)
    if est.size < MIN_PAIRS:
        raise TooFewValuesError(f"{est.size} finite estimate/reference pairs, {MIN_PAIRS} needed")
    mean, diff = (est + ref) / 2, est - ref
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    fig = Figure(figsize=(5.6, 4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(mean, diff, s=14, alpha=0.7, color="tab:blue", edgecolors="none", zorder=3)
    ax.axhline(0, color="0.6", lw=0.8)
    right_edge = blended_transform_factory(ax.transAxes, ax.transData)
    lines = (
        ("bias", bias, "-", "tab:red"),
        ("+1.96 SD", bias + 1.96 * sd, "--", "tab:gray"),
        ("-1.96 SD", bias - 1.96 * sd, "--", "tab:gray"),
    )
    for name, value, style, colour in lines:
        ax.axhline(value, color=colour, ls=style, lw=1.2)
        ax.text(
            1.01,
            value,
            f"{name}\n{value:+.3f}",
            transform=right_edge,
            fontsize=8,
            va="center",
            ha="left",
            color=colour,
        )
    span = max(abs(diff).max(), abs(bias) + 1.96 * sd) * 1.15 or 1.0
    ax.set_ylim(-span, span)
    ax.set_xlabel(f"mean of estimate and reference ({unit})")
    ax.set_ylabel(f"estimate - reference ({unit})")
    ax.set_title(f"Bland-Altman, n = {est.size}", fontsize=10)
    ax.grid(alpha=0.25)
    return fig


def _hip_groups(table: Sequence[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(hip, finite estimates, finite references) of every hip with >= 2 finite estimates,
    sorted by mean estimate."""
    estimates, references = defaultdict(list), defaultdict(list)
    for row in table:
        hip = str(row.get("hip"))
        if _finite(row.get("estimate")):
            estimates[hip].append(float(row["estimate"]))
        if _finite(row.get("reference")):
            references[hip].append(float(row["reference"]))
    groups = [
        (hip, np.array(values), np.array(references[hip]))
        for hip, values in estimates.items()
        if len(values) >= 2
    ]
    return sorted(groups, key=lambda group: float(group[1].mean()))


def pose_spread_plot(table: Sequence[dict], unit: str) -> Figure:
    """Per-hip spread of the estimate over poses, hips sorted by mean estimate.

    Each hip (table rows grouped by ``"hip"``, hips with >= 2 finite estimates) is a column:
    its estimates as dots joined by a vertical range line, its reference(s) as red diamonds.
    Raises :class:`TooFewValuesError` when no hip has two images.
    """
    groups = _hip_groups(table)
    if not groups:
        raise TooFewValuesError("no hip has two or more images with an estimate")
    width = float(np.clip(2.5 + 0.12 * len(groups), 5.0, 10.0))
    fig = Figure(figsize=(width, 4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for x, (_, est, ref) in enumerate(groups):
        ax.vlines(x, est.min(), est.max(), color="tab:blue", lw=1.2, alpha=0.8)
        ax.scatter(
            np.full(est.size, x),
            est,
            s=12,
            color="tab:blue",
            zorder=3,
            label="estimate (one pose)" if x == 0 else None,
        )
        if ref.size:
            ax.scatter(
                np.full(ref.size, x),
                ref,
                s=30,
                marker="D",
                facecolors="none",
                edgecolors="tab:red",
                zorder=4,
                label="reference" if x == 0 else None,
            )
    if len(groups) <= 25:
        ax.set_xticks(
            range(len(groups)), [g[0] for g in groups], rotation=60, ha="right", fontsize=7
        )
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.8, len(groups) - 0.2)
    ax.set_xlabel(f"hip ({len(groups)}, sorted by mean estimate)")
    ax.set_ylabel(f"BMD ({unit})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.25, axis="y")
    return fig


def _kinds_in_order(rows: Sequence[dict]) -> list[str]:
    present = {str(row.get("kind")) for row in rows}
    return [k for k in ROBUSTNESS_KINDS if k in present] + sorted(present - set(ROBUSTNESS_KINDS))


def robustness_plot(rows: Sequence[dict], jpeg_target: dict | None = None) -> Figure:
    """One panel per perturbation kind: mean and 95th-percentile |change| of the estimate, %.

    ``rows`` are the metrics' robustness rows (``kind``, ``level``, ``mean_abs_change_pct``,
    ``p95_abs_change_pct``). The JPEG panel runs from high to low quality (degradation to the
    right) and shows the target (``jpeg_target``: ``max_mean_abs_change_pct`` dashed horizontal,
    ``min_quality`` dotted vertical). Raises :class:`TooFewValuesError` with no rows.
    """
    if not rows:
        raise TooFewValuesError("no robustness rows")
    kinds = _kinds_in_order(rows)
    fig = Figure(figsize=(min(3.2 * len(kinds) + 0.6, 13.5), 3.7), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        _robustness_panel(ax, kind, [r for r in rows if str(r.get("kind")) == kind], jpeg_target)
    axes[0].set_ylabel("change of the estimate (%)")
    legend = {}
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(
        legend.values(),
        legend.keys(),
        loc="outside lower center",
        ncol=len(legend),
        fontsize=8,
        frameon=False,
    )
    return fig


def _robustness_panel(ax, kind: str, rows: Sequence[dict], jpeg_target: dict | None) -> None:
    points = sorted(
        (
            float(r["level"]),
            *(
                float(r[k]) if _finite(r.get(k)) else np.nan
                for k in ("mean_abs_change_pct", "p95_abs_change_pct")
            ),
        )
        for r in rows
        if _finite(r.get("level"))
    )
    values = np.array(points, dtype=float).reshape(-1, 3)
    ax.plot(values[:, 0], values[:, 1], "o-", color="tab:blue", ms=4, label="mean |change|")
    ax.plot(
        values[:, 0],
        values[:, 2],
        "s--",
        color="tab:orange",
        ms=4,
        label="95th percentile |change|",
    )
    if kind == "jpeg":
        ax.invert_xaxis()
        target = jpeg_target or {}
        if _finite(target.get("max_mean_abs_change_pct")):
            limit = float(target["max_mean_abs_change_pct"])
            ax.axhline(limit, color="tab:red", ls="--", lw=1, label=f"JPEG target {limit:g} %")
        if _finite(target.get("min_quality")):
            quality = float(target["min_quality"])
            ax.axvline(quality, color="tab:red", ls=":", lw=1, label=f"JPEG quality {quality:g}")
    ax.set_xlabel(ROBUSTNESS_KINDS.get(kind, kind))
    ax.set_title(kind, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.25)


def _display_range(image: np.ndarray, lo_pct: float = 1, hi_pct: float = 99) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [lo_pct, hi_pct]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def gallery_figure(item: dict, unit: str = "g/cm2") -> Figure:
    """One gallery row: X-ray | reference DRR | predicted DRR | prediction - reference.

    ``item``: ``label``, ``sample_id``, ``xray`` (M, N) any scale, ``reference`` and
    ``prediction`` (P, Q) in ``unit``, ``region`` (P, Q) bool or None, ``abs_error_pct``.
    The two DRRs share one colour scale; the error map is symmetric about 0.
    """
    xray = np.asarray(item["xray"], dtype=float)
    reference = np.asarray(item["reference"], dtype=float)
    prediction = np.asarray(item["prediction"], dtype=float)
    if reference.shape != prediction.shape:
        raise InputError(
            f"gallery reference {reference.shape} and prediction {prediction.shape} differ"
        )
    fig = Figure(figsize=(13, 3.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 4)
    fig.suptitle(
        f"{item.get('label', '')}: {item.get('sample_id', '')}, "
        f"|BMD error| = {fmt_number(item.get('abs_error_pct'), 1, '%')}",
        fontsize=10,
    )
    lo, hi = _display_range(xray)
    axes[0].imshow(xray, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title("X-ray", fontsize=9)
    top = max(_display_range(reference, 0, 99.5)[1], _display_range(prediction, 0, 99.5)[1])
    for ax, image, title in (
        (axes[1], reference, "reference DRR"),
        (axes[2], prediction, "predicted DRR"),
    ):
        shown = ax.imshow(image, cmap="magma", vmin=0.0, vmax=top)
        ax.set_title(title, fontsize=9)
        if item.get("region") is not None:
            ax.contour(
                np.asarray(item["region"], dtype=float), levels=[0.5], colors="cyan", linewidths=0.8
            )
    fig.colorbar(shown, ax=axes[1:3], label=unit, shrink=0.9)
    error = prediction - reference
    bound = _display_range(np.abs(error), 0, 99)[1]
    shown = axes[3].imshow(error, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes[3].set_title("prediction - reference", fontsize=9)
    fig.colorbar(shown, ax=axes[3], label=unit, shrink=0.9)
    for ax in axes:
        ax.set_axis_off()
    return fig


def _png_bytes(fig: Figure, max_bytes: int | None = None) -> bytes:
    """``fig`` as PNG at :data:`DPI`, redrawn at a lower resolution if larger than ``max_bytes``."""
    dpi = DPI
    while True:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        png = buffer.getvalue()
        if max_bytes is None or len(png) <= max_bytes or dpi <= GALLERY_MIN_DPI:
            return png
        # PNG size goes with the pixel count, i.e. with dpi squared.
        dpi = max(GALLERY_MIN_DPI, int(dpi * math.sqrt(max_bytes / len(png)) * 0.95))


def _embed(
    fig: Figure, figures_dir: Path, name: str, caption: str = "", max_bytes: int | None = None
) -> str:
    """Save ``fig`` as figures_dir/<name>.png and return a <figure> with the same PNG inline."""
    png = _png_bytes(fig, max_bytes)
    fig.clear()
    (figures_dir / f"{name}.png").write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}">{text}</figure>'


def _plot_or_reason(make, figures_dir: Path, name: str, caption: str = "") -> str:
    """The embedded figure ``make()`` draws, or a "not available" line if data are too few."""
    try:
        fig = make()
    except TooFewValuesError as error:
        return _not_available(f"{name}: {error}")
    return _embed(fig, figures_dir, name, caption)


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


def _agreement_section(metrics: dict, table: Sequence[dict], figures_dir: Path) -> str:
    parts = ["<h2>Agreement</h2>"]
    rows = metrics.get("agreement")
    target = metrics.get("target") or {}
    if not rows:
        parts.append(_not_available("no agreement rows"))
    else:
        parts.append(_agreement_table(rows, target))
    unit = target.get("unit", "g/cm2")
    est = [row.get("estimate") for row in table]
    ref = [row.get("reference") for row in table]
    label = target.get("label") or target.get("reference") or "reference"
    parts.append(
        f"<p>Primary pair per image: {_e(target.get('estimate'))} against {_e(label)}.</p>"
    )
    thresholds = bmd_at_t_thresholds(table)
    parts.append(
        _plot_or_reason(
            lambda: scatter_plot(
                est,
                ref,
                unit,
                estimate_label=str(target.get("estimate", "estimate")),
                reference_label=str(label),
                thresholds=thresholds,
            ),
            figures_dir,
            "scatter",
            "estimate against reference"
            + ("; dotted: WHO T-score thresholds" if thresholds else ""),
        )
    )
    parts.append(
        _plot_or_reason(
            lambda: bland_altman_plot(est, ref, unit),
            figures_dir,
            "bland_altman",
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


def _diagnostic_section(diagnostic: dict | None, missing: str) -> str:
    parts = ["<h2>Diagnostic performance</h2>"]
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
                _pct_of_one(task.get("sensitivity")),
                _pct_of_one(task.get("specificity")),
                *(fmt_int(confusion.get(k)) for k in ("tp", "fp", "tn", "fn")),
            ]
        )
    parts.append(_table(header, rows, left=2) if rows else _not_available("no tasks"))
    parts.append(_who_table(diagnostic.get("who")))
    return "".join(parts)


def _pct_of_one(value) -> str:
    """A proportion (0-1) as a percentage."""
    return fmt_number(float(value) * 100, 1, "%") if _finite(value) else "n/a"


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


# --------------------------------------------------------------------------- entry point


def write_report(out_dir: Path, metrics: dict, table: list[dict], gallery: list[dict]) -> Path:
    """Write out_dir/report.html (self-contained: every image embedded as base64 PNG, no external
    CSS/JS/fonts) and the same figures as PNG files under out_dir/figures/. Returns the html path.

    ``metrics``: the dict of ``xbmd evaluate`` (metrics.json); ``table``: one dict per image with
    at least ``hip``, ``estimate``, ``reference`` (primary pair, in ``metrics["target"]["unit"]``);
    ``gallery``: 0-3 dicts for :func:`gallery_figure`.
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
    body = "".join(
        [
            _header(metrics),
            _agreement_section(metrics, table, figures_dir),
            _diagnostic_section(metrics.get("diagnostic"), reasons["diagnostic"]),
            _decomposition_section(metrics.get("decomposition"), reasons["decomposition"]),
            _reproducibility_section(
                metrics.get("reproducibility"), reasons["reproducibility"], table, figures_dir, unit
            ),
            _robustness_section(metrics.get("robustness"), reasons["robustness"], figures_dir),
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
