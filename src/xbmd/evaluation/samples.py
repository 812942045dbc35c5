"""Estimates and references of hip images (:class:`Samples`) and the statistics every source of
estimates shares: agreement per image and per hip, diagnostic performance at the WHO thresholds,
reproducibility over each hip's images, the per-image table and ``predictions.csv``.

Sources of Samples: the model on the true crops of a prepared dataset
(``xbmd.evaluation.crops``), the estimator on the dataset's whole radiographs
(``xbmd.evaluation.end_to_end``) and a predictions CSV (:func:`read_predictions`).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd import tscore
from xbmd.errors import InputError
from xbmd.evaluation.stats import agreement, confusion_matrix, diagnostic, reproducibility

#: --target choices: the reference column, the unit and a label.
TARGETS = {
    "ct_abmd_g_cm2": ("ct_abmd_g_cm2", "g/cm2", "DXA-like CT aBMD (total hip)"),
    "qct_vbmd_mg_cm3": ("qct_vbmd_mg_cm3", "mg/cm3", "QCT vBMD (proximal femur)"),
    "dxa": ("dxa_total_hip_g_cm2", "g/cm2", "DXA total hip aBMD"),
}
#: Reference columns read from a dataset's index.csv, with their units.
REFERENCE_UNITS = {
    "ct_abmd_g_cm2": "g/cm2",
    "qct_vbmd_mg_cm3": "mg/cm3",
    "bmd_drr_g_cm2": "g/cm2",
    "dxa_total_hip_g_cm2": "g/cm2",
}
#: Which estimate a reference is compared with, in order of preference (model head names, and
#: ``bmd_drr_g_cm2`` for the virtual X-ray's mean). DXA is estimated by a DXA head when the model
#: has one, else by the DXA-like CT aBMD head.
ESTIMATES_FOR = {
    "ct_abmd_g_cm2": ("ct_abmd_g_cm2",),
    "qct_vbmd_mg_cm3": ("qct_vbmd_mg_cm3",),
    "bmd_drr_g_cm2": ("bmd_drr_g_cm2",),
    "dxa_total_hip_g_cm2": ("dxa_total_hip_g_cm2", "ct_abmd_g_cm2"),
}
#: References that are areal BMD of the total hip: they get T-scores and WHO categories.
AREAL_TOTAL_HIP = ("dxa_total_hip_g_cm2", "ct_abmd_g_cm2")
PUBLISHED_RMS_CV_PCT = [3.27, 3.79]  # Gu et al. 2023, multi-pose reproducibility
DXA_TOTAL_HIP_PRECISION_PCT = [1.0, 2.0]  # a good DXA centre (docs/method.md)
#: Fewest (estimate, reference) pairs for agreement statistics (r, ICC, limits of agreement).
MIN_PAIRS = 3
#: Identifying columns of a sample row (``Samples.rows``) written to predictions.csv.
ID_COLUMNS = ("sample_id", "patient_id", "side", "sex", "age_years", "xray", "study_uid")


@dataclass
class Samples:
    """Estimates and references, one entry per hip image.

    rows: the identifying columns (``sample_row``: sample_id, patient_id, side, hip, sex,
    age_years, xray, study_uid); estimates, references: {name: (N,) float, NaN where missing};
    units: {name: 'g/cm2' or 'mg/cm3'}.
    """

    rows: list[dict]
    estimates: dict[str, np.ndarray]
    references: dict[str, np.ndarray]
    units: dict[str, str] = field(default_factory=dict)
    #: cells of a predictions CSV that are not numbers: {sample_id, error}, counted as missing
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sample_row(row: dict) -> dict:
    """The identifying columns of a sample (``Samples.rows``) from an index or CSV row."""
    side = row.get("side", "") or ""
    return {
        "sample_id": row.get("sample_id", ""),
        "patient_id": row["patient_id"],
        "side": side,
        "hip": f"{row['patient_id']}/{side}",
        "sex": row.get("sex", "") or "",
        "age_years": row.get("age_years", "") or "",
        "xray": row.get("xray", "") or "",
        "study_uid": row.get("study_uid", "") or "",
    }


# ------------------------------------------------------------------------------------------------
# Estimates from a CSV


def read_predictions(path: str | Path) -> Samples:
    """A predictions CSV: ``patient_id``, ``est_<name>`` and ``ref_<name>`` columns per hip image
    (optional ``sample_id``, ``side``, ``sex``, ``age_years``, ``xray``, ``study_uid``; rows with
    a non-empty ``implant`` are left out), read by
    :func:`xbmd.evaluation.predictions_csv.read_table`: cells that are not numbers count as
    missing and are listed in ``problems``; encoding, ragged rows, empty patient ids and mixed
    decimal separators are refused."""
    from xbmd.evaluation.predictions_csv import read_table

    table = read_table(path)
    # hips with an implant: their references mean nothing (predictions_end_to_end.csv marks them)
    keep = [i for i, r in enumerate(table.rows) if not (r.get("implant") or "").strip()]
    if not keep:
        raise InputError(f"{table.path}: no rows (without an implant)")
    ids = [
        sample_row(
            {
                **table.rows[i],
                "sample_id": table.rows[i].get("sample_id") or f"line{table.lines[i]}",
            }
        )
        for i in keep
    ]
    estimates = {n: np.array(table.numbers[f"est_{n}"])[keep] for n in table.estimates}
    references = {n: np.array(table.numbers[f"ref_{n}"])[keep] for n in table.references}
    units = {
        n: ("mg/cm3" if n.endswith("mg_cm3") else "g/cm2")
        for n in [*table.estimates, *table.references]
    }
    kept_lines = {table.lines[i] for i in keep}
    problems = [
        {"sample_id": p["sample_id"], "error": f"line {p['line']}: {p['column']} {p['error']}"}
        for p in table.problems
        if p["line"] in kept_lines
    ]
    return Samples(ids, estimates, references, units, problems, table.notes)


def check_enough(samples: Samples, primary: tuple[str, str], source: str) -> None:
    """InputError when fewer than ``MIN_PAIRS`` rows have both numbers of the primary pair: no
    statistic (correlation, ICC, limits of agreement) can be computed."""
    est, ref = primary
    usable = np.isfinite(samples.estimates[est]) & np.isfinite(samples.references[ref])
    n = int(usable.sum())
    if n >= MIN_PAIRS:
        return
    why = f"; {len(samples.problems)} cell(s) were not numbers" if samples.problems else ""
    raise InputError(
        f"{source}: {n} of {len(samples.rows)} row(s) have both an estimate {est} and a "
        f"reference {ref}{why}: agreement statistics need at least {MIN_PAIRS}"
    )


# ------------------------------------------------------------------------------------------------
# Metrics


def pairs(samples: Samples) -> list[tuple[str, str]]:
    """(estimate, reference) pairs to compare: each reference with its preferred estimate."""
    out = []
    order = list(REFERENCE_UNITS)
    refs = sorted(samples.references, key=lambda r: (order.index(r) if r in order else 99, r))
    for ref in refs:
        for est in ESTIMATES_FOR.get(ref, (ref,)):
            if est in samples.estimates:
                out.append((est, ref))
                break
    return out


def primary_pair(samples: Samples, target: str) -> tuple[str, str]:
    """The (estimate, reference) pair of ``--target``; a clear error if the data lack it."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    ref = TARGETS[target][0]
    if ref not in samples.references:
        raise InputError(
            f"target {target}: the data have no reference values {ref!r} "
            f"(references: {', '.join(samples.references) or 'none'})"
        )
    for est in ESTIMATES_FOR.get(ref, (ref,)):
        if est in samples.estimates:
            return est, ref
    raise InputError(
        f"target {target}: no estimate of {ref} (estimates: {', '.join(samples.estimates)})"
    )


def hip_means(values: np.ndarray, hips: list[str]) -> tuple[np.ndarray, list[str]]:
    """The mean of ``values`` per hip (NaN for a hip without a finite value), hips sorted."""
    groups = defaultdict(list)
    for v, h in zip(values, hips, strict=True):
        groups[h].append(v)
    keys = sorted(groups)
    return np.array(
        [np.nanmean(groups[k]) if np.isfinite(groups[k]).any() else np.nan for k in keys]
    ), keys


def agreement_rows(samples: Samples) -> list[dict]:
    hips = [r["hip"] for r in samples.rows]
    out = []
    for est, ref in pairs(samples):
        e, r = samples.estimates[est], samples.references[ref]
        for level in ("image", "hip"):
            if level == "hip":
                e, _ = hip_means(samples.estimates[est], hips)
                r, _ = hip_means(samples.references[ref], hips)
            if (np.isfinite(e) & np.isfinite(r)).sum() < MIN_PAIRS:
                continue
            out.append(
                {
                    "estimate": est,
                    "reference": ref,
                    "unit": samples.units.get(ref, ""),
                    "level": level,
                    **agreement(e, r),
                }
            )
    return out


def t_scores(values: np.ndarray) -> np.ndarray:
    """Total-hip T-scores of aBMD values (g/cm2) against the default young-adult reference."""
    info = tscore.reference_info("total_hip", "F", tscore.DEFAULT_REFERENCE)
    return (np.asarray(values, float) - info["mean_g_cm2"]) / info["sd_g_cm2"]


def _category(t: float) -> str:
    return tscore.who_category(t) if np.isfinite(t) else ""


def diagnostic_section(samples: Samples, primary: tuple[str, str]) -> tuple[dict | None, str]:
    """WHO-threshold detection from the aBMD estimate; (section or None, reason when None)."""
    candidates = [primary] if primary[1] in AREAL_TOTAL_HIP else []
    candidates += [p for p in pairs(samples) if p[1] in AREAL_TOTAL_HIP and p != primary]
    if not candidates:
        return None, "no total-hip areal BMD reference (T-scores need g/cm2 of the total hip)"
    est, ref = candidates[0]
    e_t = t_scores(samples.estimates[est])
    r_t = t_scores(samples.references[ref])
    info = tscore.reference_info("total_hip", "F", tscore.DEFAULT_REFERENCE)
    labels = list(tscore.CATEGORIES)
    return {
        "estimate": est,
        "reference": ref,
        "t_score_reference": (
            f"{info['population']}, total hip {info['mean_g_cm2']} +/- {info['sd_g_cm2']} g/cm2 "
            f"({info['source']})"
        ),
        "tasks": [
            {
                "name": "osteoporosis",
                "definition": "T <= -2.5",
                **diagnostic(e_t, r_t, tscore.OSTEOPOROSIS_T, inclusive=True),
            },
            {
                "name": "low bone mass",
                "definition": "T < -1",
                **diagnostic(e_t, r_t, tscore.OSTEOPENIA_T, inclusive=False),
            },
        ],
        "who": {
            "labels": labels,
            "matrix": confusion_matrix(
                [_category(t) for t in r_t], [_category(t) for t in e_t], labels
            ),
        },
    }, ""


def reproducibility_section(samples: Samples) -> tuple[dict | None, str]:
    hips = [r["hip"] for r in samples.rows]
    if max(np.unique(hips, return_counts=True)[1]) < 2:
        return None, "no hip has more than one image"

    def block(values: dict) -> dict:
        return {
            n: {**reproducibility(v, hips), "unit": samples.units.get(n, "")}
            for n, v in values.items()
        }

    return {
        "estimates": block(samples.estimates),
        "reference_itself": block(samples.references),
        "published_rms_cv_pct": PUBLISHED_RMS_CV_PCT,
        "dxa_total_hip_precision_pct": DXA_TOTAL_HIP_PRECISION_PCT,
    }, ""


def table(samples: Samples, primary: tuple[str, str]) -> list[dict]:
    """One row per image: identity, primary pair (and T-scores for aBMD), all estimates/refs."""
    est, ref = primary
    areal = ref in AREAL_TOTAL_HIP
    e_t = t_scores(samples.estimates[est]) if areal else None
    r_t = t_scores(samples.references[ref]) if areal else None
    out = []
    for i, row in enumerate(samples.rows):
        item = {
            **row,
            "estimate": _num(samples.estimates[est][i]),
            "reference": _num(samples.references[ref][i]),
            "estimate_t": _num(e_t[i]) if areal else None,
            "reference_t": _num(r_t[i]) if areal else None,
        }
        item.update({f"est_{n}": _num(v[i]) for n, v in samples.estimates.items()})
        item.update({f"ref_{n}": _num(v[i]) for n, v in samples.references.items()})
        out.append(item)
    return out


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_predictions(rows: list[dict], path: Path) -> Path:
    """``predictions.csv``: the table (readable again with ``--predictions``)."""
    keys = list(ID_COLUMNS)
    keys += sorted(k for k in rows[0] if k.startswith(("est_", "ref_")))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return path


def plain(value):
    """``value`` with NaN/inf as None and numpy scalars and arrays as Python (strict JSON)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
