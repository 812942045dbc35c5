"""The report's sections on what users get (``xbmd.evaluation.report`` lays the page out): the
headline (end to end beside true crops), reproducibility by session, robustness of the delivered
file, the 95 % interval and the quality gate. Each takes its ``metrics`` entry and says "not
available: <reason>" when that is None."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from xbmd.evaluation.html_parts import esc, html_table, not_available, pct_of_one, plot_or_reason
from xbmd.evaluation.numbers import fmt_int, fmt_number, fmt_range
from xbmd.evaluation.plots import robustness_plot

MODE_LABELS = {
    "end_to_end": "end to end (whole radiograph: localiser, crop, model)",
    "true_crops": "true crops (the model alone, crop at the true head)",
    "predictions_csv": "predictions CSV",
}
PRECISION_LABELS = {
    "same_session": "same session (pose)",
    "cross_device": "across sessions (device)",
    "all_images": "all images of the hip",
}
#: Whole-file kinds drawn (those with several levels); the others are in the table only.
PLOTTED_FILE_KINDS = ("jpeg", "dicom_jpeg", "spacing")


def _met(value) -> str:
    return {True: "met", False: "<b>missed</b>"}.get(value, "not assessed")


def headline_section(headline: dict | None, unit: str) -> str:
    title = "<h2>Headline: end to end and on true crops</h2>"
    rows = (headline or {}).get("rows") or []
    if not rows:
        return title + not_available("no estimate with its reference")
    cells = [
        [
            esc(MODE_LABELS.get(r.get("mode"), r.get("mode"))),
            esc(r.get("level")),
            fmt_int(r.get("n")),
            fmt_int(r.get("expected")) if r.get("level") == "image" else "",
            fmt_int(r.get("failures")) if r.get("level") == "image" else "",
            f"{fmt_number(r.get('pearson_r'))} [{fmt_range(r.get('pearson_ci95'))}]",
            fmt_number(r.get("icc_a1")),
            esc(fmt_number(r.get("mae"), 3, unit)),
            fmt_number(r.get("mae_pct"), 1, "%"),
            esc(fmt_number(r.get("bias"), 3, unit)),
        ]
        for r in rows
    ]
    header = [
        "evaluation",
        "level",
        "n",
        "expected",
        "failures",
        "Pearson r [95 % CI]",
        "ICC(A,1)",
        "MAE",
        "MAE %",
        "bias",
    ]
    classes = ["primary" if r.get("mode") == "end_to_end" else "" for r in rows]
    return (
        title + f"<p>{esc(headline.get('estimate'))} against {esc(headline.get('reference'))}. "
        "End to end is what a user gets from <code>xbmd estimate</code> on the whole radiograph; "
        "true crops leave the localiser out. Failures are hips the estimator did not report "
        "(listed below); they are not in n. Hips with an implant are left out.</p>"
        + html_table(header, cells, left=2, classes=classes)
    )


def sessions_section(sessions: dict | None, missing: str) -> str:
    title = "<h2>Reproducibility by session</h2>"
    if not sessions:
        return title + not_available(missing)
    unit = sessions.get("unit", "")
    rows, notes = [], []
    for mode, block in (sessions.get("modes") or {}).items():
        notes.append(
            f"{esc(MODE_LABELS.get(mode, mode))}: {fmt_int(block.get('hips'))} hips, "
            f"{fmt_int(block.get('sessions'))} sessions, {fmt_int(block.get('images'))} images "
            f"({fmt_int(block.get('images_without_study'))} without a study UID)"
        )
        for kind, name in PRECISION_LABELS.items():
            v = block.get(kind) or {}
            target = v.get("target_rms_cv_pct")
            rows.append(
                [
                    esc(MODE_LABELS.get(mode, mode)),
                    name,
                    fmt_int(v.get("groups")),
                    fmt_number(v.get("rms_cv_pct"), 2, "%"),
                    esc(fmt_number(v.get("rms_sd"), 4, unit)),
                    esc(fmt_number(v.get("lsc"), 3, unit)),
                    f"&le; {fmt_number(target, 1, '%')}: {_met(v.get('met'))}" if target else "",
                ]
            )
    for name, key in (
        ("published X-ray BMD, 4 poses", "published_rms_cv_pct"),
        ("DXA total hip precision", "dxa_total_hip_precision_pct"),
    ):
        rows.append(["literature", name, "", fmt_range(sessions.get(key), 2, "%"), "", "", ""])
    header = ["evaluation", "precision", "groups", "RMS-CV", "RMS-SD", "LSC (95 %)", "target"]
    return (
        title + f"<p>Estimate: {esc(sessions.get('estimate'))}. A session is a DICOM study: one "
        "device, several poses. Same session: RMS over each hip's sessions of the CV of its "
        "images; across sessions: RMS over hips of the CV of their session means; "
        "LSC = 2.77 x RMS-SD.</p>"
        + html_table(header, rows, left=2)
        + "".join(f'<p class="note">{n}</p>' for n in notes)
    )


def whole_file_section(robust: dict | None, missing: str, figures_dir: Path) -> str:
    title = "<h2>Robustness of the delivered file</h2>"
    if not robust:
        return title + not_available(missing)
    rows = robust.get("rows") or []
    cells = []
    for r in rows:
        met = r.get("target_met")
        cells.append(
            [
                esc(r.get("label")),
                esc(r.get("reference")),
                fmt_int(r.get("n")),
                fmt_int(r.get("not_reported")),
                fmt_number(r.get("mean_abs_change_pct"), 2, "%"),
                fmt_number(r.get("p95_abs_change_pct"), 2, "%"),
                fmt_number(r.get("max_abs_change_pct"), 2, "%"),
                fmt_number(r.get("mean_change_pct"), 2, "%"),
                pct_of_one(r.get("share_not_confident")),
                f"{fmt_int(r.get('turned_not_confident'))} of "
                f"{fmt_int(r.get('reference_confident'))}",
                fmt_int(r.get("category_changed")),
                ""
                if met is None
                else _met(met) + (" (flagged)" if r.get("target_met_by") == "flag" else ""),
            ]
        )
    header = [
        "file",
        "against",
        "hips",
        "not reported",
        "mean |change|",
        "95th pct |change|",
        "max |change|",
        "mean change (signed)",
        "not confident",
        "turned not confident",
        "WHO category changed",
        "JPEG target",
    ]
    target = robust.get("jpeg_target") or {}
    plotted = [r for r in rows if r.get("kind") in PLOTTED_FILE_KINDS]
    return (
        title + f"<p>{fmt_int(robust.get('radiographs'))} of "
        f"{fmt_int(robust.get('radiographs_available'))} DICOM radiographs, "
        f"{fmt_int(robust.get('hips'))} hips: each file re-encoded, then estimated again end to "
        f"end; change of {esc(robust.get('estimate'))} against the same hip in the file named "
        "under 'against' (JPEG: the lossless 8-bit export of the same format).</p>"
        + (html_table(header, cells, left=2) if cells else not_available("no rows"))
        + f"<p><b>Whole-file JPEG target</b> (quality &ge; {fmt_int(target.get('min_quality'))}: "
        f"mean |change| &le; {fmt_number(target.get('max_mean_abs_change_pct'), 1, '%')} and "
        f"95th percentile &le; {fmt_number(target.get('max_p95_abs_change_pct'), 1, '%')}, or "
        f"every result not confident): <b>{_met(target.get('met'))}</b>.</p>"
        + (
            plot_or_reason(
                lambda: robustness_plot(plotted, target),
                figures_dir,
                "file_robustness",
                "change of the estimate against the reference file",
            )
            if plotted
            else ""
        )
    )


def interval_section(interval: dict | None, missing: str) -> str:
    title = "<h2>Interval</h2>"
    if not interval:
        return title + not_available(missing)
    target = interval.get("target_coverage") or [None, None]
    rows = [
        [
            "hips with an interval",
            f"{fmt_int(interval.get('with_interval'))} of {fmt_int(interval.get('hips'))}",
        ],
        [
            "coverage of the 95 % interval",
            f"{pct_of_one(interval.get('coverage'))} (target {pct_of_one(target[0])} to "
            f"{pct_of_one(target[1])}: {_met(interval.get('met'))}), "
            f"n = {fmt_int(interval.get('compared'))}",
        ],
        [
            "reference below / above the interval",
            f"{pct_of_one(interval.get('below'))} / {pct_of_one(interval.get('above'))}",
        ],
        [
            "coverage, confident hips only",
            f"{pct_of_one(interval.get('confident_coverage'))}, "
            f"n = {fmt_int(interval.get('confident_compared'))}",
        ],
        ["median width", esc(fmt_number(interval.get("median_width_g_cm2"), 3, "g/cm2"))],
        ["median width, T-score units", fmt_number(interval.get("median_width_t"), 2)],
    ]
    return (
        title + f"<p>95 % interval of bmd_g_cm2 against {esc(interval.get('reference'))}, end to "
        "end, hips without an implant.</p>" + html_table(["", "value"], rows)
    )


def _gate_rows(gate: dict) -> list[list[str]]:
    rows = []
    implant, clean, ood = gate.get("implant"), gate.get("clean"), gate.get("ood")
    if implant:
        share = pct_of_one(implant.get("share_flagged_or_refused"))
        rows.append(
            [
                "hips with an implant flagged (not confident) or refused",
                f"{fmt_int(implant.get('flagged'))} + {fmt_int(implant.get('refused'))} of "
                f"{fmt_int(implant.get('hips'))} = {share}",
                f"100 %: {_met(implant.get('met'))}",
            ]
        )
    else:
        rows.append(["hips with an implant", "none in the data", "n/a"])
    if clean:
        rows.append(
            [
                "hips without an implant wrongly flagged",
                f"{fmt_int(clean.get('flagged'))} of {fmt_int(clean.get('reported'))} = "
                f"{pct_of_one(clean.get('share_flagged'))}",
                f"&le; {pct_of_one(clean.get('target_max'))}: {_met(clean.get('met'))}",
            ]
        )
    if ood:
        for name, block in (
            ("all", ood),
            ("without an implant", ood.get("clean") or {}),
            ("with an implant", ood.get("implant") or {}),
        ):
            rows.append(
                [
                    f"out of distribution (score above threshold), {name}",
                    f"{pct_of_one(block.get('share_above'))} of "
                    f"{fmt_int(block.get('hips_scored'))}",
                    "report",
                ]
            )
    else:
        rows.append(["out-of-distribution score", "not available: no score in the results", ""])
    rows.append(
        [
            "not confident without a gate reason",
            fmt_int(gate.get("not_confident_without_reason")),
            "",
        ]
    )
    return rows


def gate_section(gate: dict | None, missing: str) -> str:
    title = "<h2>Quality gate</h2>"
    if not gate:
        return title + not_available(missing)
    parts = [
        title,
        "<p>End to end. Flagged = <code>confident: false</code>.</p>",
        html_table(["", "value", "target"], _gate_rows(gate)),
    ]
    reasons = gate.get("reasons") or []
    parts.append("<h3>Reasons given (numbers as #)</h3>")
    parts.append(
        html_table(
            ["reason", "hips", "example"],
            [
                [esc(r.get("reason")), fmt_int(r.get("hips")), esc(r.get("example"))]
                for r in reasons
            ],
            left=1,
        )
        if reasons
        else not_available("the results give no gate reason")
    )
    makers = gate.get("by_manufacturer") or []
    if makers:
        parts.append("<h3>By device manufacturer (hips without an implant)</h3>")
        parts.append(
            html_table(
                ["manufacturer", "hips", "flagged", "out of distribution"],
                [
                    [
                        esc(m.get("manufacturer")),
                        fmt_int(m.get("hips")),
                        pct_of_one(m.get("share_flagged")),
                        pct_of_one(m.get("share_ood")),
                    ]
                    for m in makers
                ],
            )
        )
    return "".join(parts)


def failures_table(failures: Sequence[dict], limit: int = 60) -> str:
    """The hips the estimator did not report: radiograph, side, stage, reason."""
    if not failures:
        return "<p>Every hip of the index was reported.</p>"
    rows = [
        [
            esc(f.get("xray")),
            esc(f.get("side")),
            esc(f.get("implant") or ""),
            esc(f.get("stage")),
            esc(f.get("error")),
        ]
        for f in failures[:limit]
    ]
    more = len(failures) - limit
    return (
        f"<h3>Failures: hips not reported ({len(failures)})</h3>"
        + html_table(["radiograph", "side", "implant", "stage", "reason"], rows, left=5)
        + (f'<p class="note">... and {more} more (metrics.json).</p>' if more > 0 else "")
    )


def localisation_line(loc: dict | None) -> str:
    if not loc:
        return ""
    return (
        f"<p>Localiser: distance of the head found to the sample's head centre over "
        f"{fmt_int(loc.get('n'))} hips: median {fmt_number(loc.get('median_mm'), 2, 'mm')}, "
        f"95th percentile {fmt_number(loc.get('p95_mm'), 2, 'mm')}, maximum "
        f"{fmt_number(loc.get('max_mm'), 2, 'mm')}; {fmt_int(loc.get('beyond_flag'))} beyond "
        f"{fmt_number(loc.get('flag_mm'), 0, 'mm')}.</p>"
    )
