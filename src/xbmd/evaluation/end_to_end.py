"""End-to-end evaluation: the estimator on the dataset's whole radiographs, as a user runs it.

``xbmd prepare`` records the case manifest it read (``prepare.json``'s ``manifest``); the index's
``xray`` column is the radiograph's path relative to the manifest's folder (or absolute). Every
radiograph of the index is read (``xbmd.io.xray.read_xray``) and estimated with
``Estimator.estimate_xray`` (the localiser, the crop, the model, the checks): exactly what
``xbmd estimate`` does with the file. Each reported hip is matched to its index row by radiograph
and side, which gives its references:

- a row whose hip the estimator did not report (the file missing or unreadable, the radiograph
  refused, e.g. no femoral head found, or that side's head not found) is a **failure**, listed
  with the reason, never silently dropped;
- a reported hip with no row (``xbmd prepare`` refused that side) is **unmatched**: listed, not
  compared (it has no reference);
- hips with an implant (index ``implant`` column) are matched but kept out of the agreement: their
  CT labels mean nothing; the quality gate is measured on them (``xbmd.evaluation.gate``).

The localiser's error per hip is the distance at the detector between the head it found and the
head centre of the sample's sidecar (true or registered pose), in mm.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbmd.errors import XbmdError
from xbmd.evaluation.samples import REFERENCE_UNITS, Samples, sample_row

#: Fields of a HipResult kept per hip; a field the result lacks is None.
RESULT_FIELDS = (
    "side",
    "bmd_g_cm2",
    "bmd_drr_g_cm2",
    "targets",
    "t_score",
    "who_category",
    "confident",
    "gate",
    "warnings",
    "ood_score",
    "ood_threshold",
    "bmd_interval_g_cm2",
    "t_score_interval",
    "localiser_confidence",
    "head_px",
    "pixel_spacing_mm",
    "spacing_source",
)
#: A head found further than this from the sidecar's head centre is counted as mislocated
#: (about half the radius of a femoral head).
HEAD_ERROR_FLAG_MM = 10.0


@dataclass
class Originals:
    """Where the dataset's original radiographs are: ``root`` (None: unknown), the path of each
    index ``xray`` that exists, those that do not, and why end to end is impossible (or "")."""

    root: Path | None
    paths: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def all_found(self) -> bool:
        return self.root is not None and bool(self.paths) and not self.missing


def find_originals(
    dataset: str | Path, rows: list[dict], root: str | Path | None = None
) -> Originals:
    """Locate the original radiograph of every index row (``root``: the folder the ``xray``
    column is relative to; default: the folder of prepare.json's manifest)."""
    from xbmd.dataset.format import read_summary

    dataset = Path(dataset)
    if root is None:
        try:
            manifest = read_summary(dataset).get("manifest")
        except XbmdError as exc:
            return Originals(None, reason=str(exc))
        if not manifest:
            return Originals(None, reason=f"{dataset / 'prepare.json'} names no manifest")
        root = Path(manifest).parent
    root = Path(root)
    if not root.is_dir():
        return Originals(root, reason=f"{root}: the radiographs' folder does not exist")
    names = list(dict.fromkeys(r.get("xray", "") for r in rows))
    if not all(names):
        return Originals(root, reason=f"{dataset / 'index.csv'}: rows without an xray path")
    out = Originals(root)
    for name in names:
        path = Path(name) if Path(name).is_absolute() else root / name
        if path.is_file():
            out.paths[name] = path
        else:
            out.missing.append(name)
    if out.missing:
        out.reason = (
            f"{len(out.missing)} of {len(names)} original radiographs not found under {root} "
            f"(first: {out.missing[0]})"
        )
    return out


def result_fields(result) -> dict:
    """The fields of a ``HipResult`` that evaluation uses (:data:`RESULT_FIELDS`), as plain
    Python; a missing field is None."""
    out = {}
    for name in RESULT_FIELDS:
        value = getattr(result, name, None)
        if isinstance(value, tuple | np.ndarray):
            value = [float(v) for v in value]
        elif isinstance(value, dict):
            value = dict(value)
        elif isinstance(value, list):
            value = list(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out


def _identity(row: dict) -> dict:
    from xbmd.dataset.format import has_implant, number

    return {
        **sample_row(row),
        "implant": (row.get("implant") or "").strip() if has_implant(row) else "",
        "manufacturer": row.get("manufacturer", "") or "",
        "references": {c: number(row.get(c)) for c in REFERENCE_UNITS if c in row},
    }


def match_hips(rows: list[dict], results: list[dict] | str, stage: str = "estimate"):
    """Match one radiograph's reported hips to its index rows by side.

    ``rows``: the index rows of the radiograph; ``results``: its results (dicts with at least
    ``side``, see :func:`result_fields`), or the reason none came (an error message, failing
    every row at ``stage``). Returns (records, failures, unmatched): one record per row (its
    identity, ``references``, ``result`` or None and ``error``), the rows not reported with the
    reason, and the results of no row.
    """
    records, failures = [], []
    by_side: dict[str, dict] = {}
    if not isinstance(results, str):
        for r in results:
            by_side.setdefault(r["side"], r)
    found = ", ".join(by_side) or "none"
    for row in rows:
        record = {**_identity(row), "result": None, "error": None}
        row_stage = stage
        if isinstance(results, str):
            record["error"] = results
        elif row["side"] in by_side:
            record["result"] = by_side.pop(row["side"])
        else:
            row_stage = "estimate"
            record["error"] = f"the estimator reported no {row['side']} hip (hips found: {found})"
        if record["error"] is not None:
            failures.append(
                {
                    "sample_id": row.get("sample_id", ""),
                    "xray": row.get("xray", ""),
                    "side": row["side"],
                    "implant": record["implant"],
                    "stage": row_stage,
                    "error": record["error"],
                }
            )
        records.append(record)
    xray = rows[0].get("xray", "") if rows else ""
    unmatched = [
        {
            "xray": xray,
            "side": side,
            "bmd_g_cm2": r.get("bmd_g_cm2"),
            "reason": "no index row for this hip (xbmd prepare made no sample of it)",
        }
        for side, r in by_side.items()
    ]
    return records, failures, unmatched


def head_error_mm(record: dict, sidecar: Path) -> float:
    """Distance at the detector (mm) from the head the localiser found to the sidecar's head
    centre; NaN when either is unknown."""
    result = record.get("result") or {}
    head, spacing = result.get("head_px"), result.get("pixel_spacing_mm")
    if head is None or spacing is None:
        return math.nan
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        true = meta["landmarks_image_px"]["head_center_px"]
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan
    return float(math.hypot((head[0] - true[0]) * spacing[0], (head[1] - true[1]) * spacing[1]))


@dataclass
class EndToEndRun:
    """What running the estimator on the whole radiographs produced."""

    samples: Samples  # hips without an implant that the estimator reported, with references
    records: list[dict]  # one per index row (implant hips and failures included)
    failures: list[dict]  # rows whose hip was not reported, with the reason
    unmatched: list[dict]  # hips reported with no index row
    radiographs: list[dict]  # per radiograph: xray, path, format, input_failed
    root: Path | None
    units: dict[str, str] = field(default_factory=dict)

    @property
    def input_failures(self) -> int:
        """Rows whose radiograph was missing or unreadable (a data problem, not a measurement)."""
        return sum(1 for f in self.failures if f["stage"] == "read")


def run_end_to_end(
    estimator,
    dataset: str | Path,
    rows: list[dict],
    originals: Originals,
    progress: Callable | None = None,
) -> EndToEndRun:
    """Estimate every radiograph of the index with ``estimator`` (an ``Estimator``) and match
    the hips to the rows (module docstring)."""
    from xbmd.io.xray import read_xray

    dataset = Path(dataset)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("xray", ""), []).append(row)
    records, failures, unmatched, radiographs = [], [], [], []
    items = list(groups.items())
    for name, group in progress(items) if progress else items:
        path = originals.paths.get(name)
        info = {"xray": name, "path": str(path) if path else None, "format": None}
        if path is None:
            results, stage = f"original radiograph not found: {name}", "read"
        else:
            try:
                xray = read_xray(path)
                info["format"] = xray.meta.get("format")
            except XbmdError as exc:
                results, stage = str(exc), "read"
            else:
                try:
                    hips = estimator.estimate_xray(xray)
                    results, stage = [result_fields(h) for h in hips], "estimate"
                except XbmdError as exc:
                    results, stage = f"{path}: {exc}", "estimate"
                del xray
        info["input_failed"] = stage == "read"
        radiographs.append(info)
        got, failed, extra = match_hips(group, results, stage)
        for record, row in zip(got, group, strict=True):
            record["head_error_mm"] = head_error_mm(
                record, (dataset / row.get("file", "")).with_suffix(".json")
            )
        records += got
        failures += failed
        unmatched += extra
    samples, units = samples_of(records, estimator.bundle.targets)
    return EndToEndRun(samples, records, failures, unmatched, radiographs, originals.root, units)


def samples_of(records: list[dict], targets=("ct_abmd_g_cm2",)) -> tuple[Samples, dict]:
    """The Samples of the reported hips without an implant: estimates named like the model's
    heads (``ct_abmd_g_cm2`` is the result's ``bmd_g_cm2``), ``bmd_drr_g_cm2``, references from
    the index."""
    from xbmd.estimation.estimator import BMD_TARGET

    kept = [r for r in records if r["result"] is not None and not r["implant"]]
    units = {**REFERENCE_UNITS, "bmd_drr_g_cm2": "g/cm2"}
    for name in targets:
        units.setdefault(name, "mg/cm3" if name.endswith("mg_cm3") else "g/cm2")
    estimates: dict[str, list[float]] = {name: [] for name in (*targets, "bmd_drr_g_cm2")}
    for r in kept:
        res = r["result"]
        values = dict(res.get("targets") or {})
        values[BMD_TARGET] = res.get("bmd_g_cm2")
        values["bmd_drr_g_cm2"] = res.get("bmd_drr_g_cm2")
        for name in estimates:
            estimates[name].append(_float(values.get(name)))
    est = {k: np.asarray(v, float) for k, v in estimates.items()}
    est = {k: v for k, v in est.items() if np.isfinite(v).any()}
    refs = {
        c: np.asarray([r["references"].get(c, math.nan) for r in kept], float)
        for c in REFERENCE_UNITS
    }
    refs = {c: v for c, v in refs.items() if np.isfinite(v).any()}
    rows = [{k: r[k] for k in ("sample_id", "patient_id", "side", "hip", "sex", "age_years",
                                "xray", "study_uid")} for r in kept]  # fmt: skip
    return Samples(rows, est, refs, units), units


def _float(value) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def localisation_summary(records: list[dict]) -> dict | None:
    """The localiser's error at the detector over the reported hips (module docstring)."""
    errors = np.array([r.get("head_error_mm", math.nan) for r in records if r["result"]], float)
    errors = errors[np.isfinite(errors)]
    if errors.size == 0:
        return None
    return {
        "n": int(errors.size),
        "median_mm": float(np.median(errors)),
        "p95_mm": float(np.percentile(errors, 95)),
        "max_mm": float(errors.max()),
        "flag_mm": HEAD_ERROR_FLAG_MM,
        "beyond_flag": int((errors > HEAD_ERROR_FLAG_MM).sum()),
    }


def write_end_to_end_csv(records: list[dict], path: Path) -> Path:
    """``predictions_end_to_end.csv``: one row per index row, failures and implant hips included
    (readable with ``--predictions``, which leaves implant rows out): identity, ``est_*`` and
    ``ref_*`` columns, and the result's confidence, interval, T-score, OOD score, gate and the
    error of a failure."""
    import csv

    from xbmd.estimation.estimator import BMD_TARGET

    names = sorted(
        {BMD_TARGET, "bmd_drr_g_cm2"}
        | {t for r in records if r["result"] for t in (r["result"].get("targets") or {})}
    )
    refs = sorted({c for r in records for c, v in r["references"].items() if math.isfinite(v)})
    keys = ["sample_id", "patient_id", "side", "sex", "age_years", "xray", "study_uid", "implant",
            "manufacturer"]  # fmt: skip
    keys += [f"est_{n}" for n in names] + [f"ref_{c}" for c in refs]
    keys += ["confident", "bmd_interval_low_g_cm2", "bmd_interval_high_g_cm2", "t_score",
             "who_category", "ood_score", "ood_threshold", "gate", "head_error_mm",
             "error"]  # fmt: skip
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            res = r["result"] or {}
            values = {**(res.get("targets") or {}), "bmd_drr_g_cm2": res.get("bmd_drr_g_cm2")}
            values[BMD_TARGET] = res.get("bmd_g_cm2")
            interval = res.get("bmd_interval_g_cm2") or [None, None]
            row = {k: r.get(k, "") for k in keys[:9]}
            row.update({f"est_{n}": _cell(values.get(n)) for n in names})
            row.update({f"ref_{c}": _cell(r["references"].get(c)) for c in refs})
            row.update(
                {
                    "confident": "" if not res else res.get("confident"),
                    "bmd_interval_low_g_cm2": _cell(interval[0]),
                    "bmd_interval_high_g_cm2": _cell(interval[1]),
                    "t_score": _cell(res.get("t_score")),
                    "who_category": res.get("who_category") or "",
                    "ood_score": _cell(res.get("ood_score")),
                    "ood_threshold": _cell(res.get("ood_threshold")),
                    "gate": "; ".join(res.get("gate") or []),
                    "head_error_mm": _cell(r.get("head_error_mm")),
                    "error": r.get("error") or "",
                }
            )
            writer.writerow(row)
    return path


def _cell(value) -> str | float:
    value = _float(value)
    return value if math.isfinite(value) else ""
