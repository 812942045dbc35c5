"""The figures of ``xbmd evaluate``'s report: scatter, Bland-Altman, per-hip pose spread,
robustness curves and the gallery rows. Plain :class:`matplotlib.figure.Figure` objects rendered
by Agg, never registered with pyplot, so nothing accumulates across calls."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from xbmd.errors import InputError
from xbmd.evaluation.numbers import DPI, ROBUSTNESS_KINDS, TooFewValuesError, _finite, fmt_number

#: Fewest finite (estimate, reference) pairs worth a scatter or Bland-Altman plot.
MIN_PAIRS = 3


#: WHO T-score thresholds drawn on the scatter plot when they can be converted to BMD.
WHO_T_THRESHOLDS = {"T = -1": -1.0, "T = -2.5": -2.5}


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
    """One panel per perturbation kind: mean and 95th-percentile |change| of the estimate, %,
    and the signed mean change when the rows have it (``mean_change_pct``).

    ``rows`` are the metrics' robustness rows (``kind``, ``level``, ``mean_abs_change_pct``,
    ``p95_abs_change_pct``). The JPEG panels (``jpeg``, ``dicom_jpeg``) run from high to low
    quality (degradation to the right) and show the target (``jpeg_target``:
    ``max_mean_abs_change_pct`` dashed and, if given, ``max_p95_abs_change_pct`` dash-dotted
    horizontal, ``min_quality`` dotted vertical). Raises :class:`TooFewValuesError` with no rows.
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
        ncol=min(len(legend), 2 * len(kinds)),  # a narrow figure takes two rows of entries
        fontsize=8,
        frameon=False,
    )
    return fig


def _robustness_panel(ax, kind: str, rows: Sequence[dict], jpeg_target: dict | None) -> None:
    keys = ("mean_abs_change_pct", "p95_abs_change_pct", "mean_change_pct")
    points = sorted(
        (float(r["level"]), *(float(r[k]) if _finite(r.get(k)) else np.nan for k in keys))
        for r in rows
        if _finite(r.get("level"))
    )
    values = np.array(points, dtype=float).reshape(-1, 4)
    ax.plot(values[:, 0], values[:, 1], "o-", color="tab:blue", ms=4, label="mean |change|")
    ax.plot(
        values[:, 0],
        values[:, 2],
        "s--",
        color="tab:orange",
        ms=4,
        label="95th percentile |change|",
    )
    if np.isfinite(values[:, 3]).any():
        ax.plot(
            values[:, 0], values[:, 3], "^:", color="tab:green", ms=4, label="mean change (signed)"
        )
        ax.axhline(0, color="0.6", lw=0.6)
    if kind in ("jpeg", "dicom_jpeg"):
        ax.invert_xaxis()
        target = jpeg_target or {}
        if _finite(target.get("max_mean_abs_change_pct")):
            limit = float(target["max_mean_abs_change_pct"])
            ax.axhline(limit, color="tab:red", ls="--", lw=1, label=f"JPEG target {limit:g} %")
        if _finite(target.get("max_p95_abs_change_pct")):
            limit = float(target["max_p95_abs_change_pct"])
            ax.axhline(limit, color="tab:red", ls="-.", lw=1, label=f"JPEG p95 target {limit:g} %")
        if _finite(target.get("min_quality")):
            quality = float(target["min_quality"])
            ax.axvline(quality, color="tab:red", ls=":", lw=1, label=f"JPEG quality {quality:g}")
    ax.set_xlabel(ROBUSTNESS_KINDS.get(kind, kind))
    ax.set_title(kind, fontsize=10)
    low = np.nanmin(values[:, 3]) if np.isfinite(values[:, 3]).any() else 0.0
    ax.set_ylim(bottom=min(0.0, 1.15 * float(low)))
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
