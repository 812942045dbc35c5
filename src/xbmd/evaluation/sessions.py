"""Reproducibility by session: pose within a session, device across sessions.

A session is a DICOM study (the index's ``study_uid``): in the virtual cohort, and in the published
multi-pose protocol, the radiographs of one session share the device and its settings and differ
in the patient's pose; sessions differ in device. Per hip (patient and side):

- **same-session pose** precision: SD and CV of the estimates within each (hip, session) with two
  or more images; RMS over those groups (``xbmd.evaluation.stats.reproducibility``);
- **cross-device** precision: each session reduced to its mean estimate; SD and CV of a hip's
  session means across its sessions; RMS over hips with two or more sessions. A session mean
  still carries its pose scatter divided by the number of images averaged;
- **all images**: every image of the hip, pose and device mixed (the older pose figure).

Each with its least significant change LSC = 2.77 x RMS-SD. Images without a study UID are left
out of the first two and counted.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from xbmd.evaluation.samples import DXA_TOTAL_HIP_PRECISION_PCT, PUBLISHED_RMS_CV_PCT, Samples
from xbmd.evaluation.stats import reproducibility

#: The project's precision targets (issue 16): same-session pose and cross-device RMS-CV, %.
SESSION_TARGETS_PCT = {"same_session": 2.0, "cross_device": 4.0}


def session_reproducibility(values, rows: list[dict]) -> dict | None:
    """Same-session, cross-device and all-image precision of ``values`` (one per row; rows with
    ``hip`` and ``study_uid``). None when no row has a study UID."""
    values = np.asarray(values, float)
    hips = [str(r["hip"]) for r in rows]
    studies = [str(r.get("study_uid") or "") for r in rows]
    with_study = np.array([bool(s) for s in studies])
    if not with_study.any():
        return None
    sessions: dict[tuple[str, str], list[float]] = defaultdict(list)
    for value, hip, study, ok in zip(values, hips, studies, with_study, strict=True):
        if ok and np.isfinite(value):
            sessions[(hip, study)].append(float(value))
    keys = sorted(sessions)
    same = reproducibility(
        [v for k in keys for v in sessions[k]],
        [f"{k[0]}|{k[1]}" for k in keys for _ in sessions[k]],
    )
    sizes = [len(sessions[k]) for k in keys if len(sessions[k]) >= 2]
    means = [float(np.mean(sessions[k])) for k in keys]
    cross = reproducibility(means, [k[0] for k in keys])
    per_hip = defaultdict(int)
    for hip, _ in keys:
        per_hip[hip] += 1
    multi = [n for n in per_hip.values() if n >= 2]
    return {
        "images": int(with_study.sum()),
        "images_without_study": int((~with_study).sum()),
        "hips": len(per_hip),
        "sessions": len(keys),
        "same_session": {**same, "images_per_session_median": _median(sizes)},
        "cross_device": {**cross, "sessions_per_hip_median": _median(multi)},
        "all_images": reproducibility(values, hips),
    }


def _median(values: list[int]) -> float | None:
    return float(np.median(values)) if values else None


def sessions_section(modes: dict[str, Samples | None], estimate: str) -> tuple[dict | None, str]:
    """Session reproducibility of ``estimate`` for each mode ('end_to_end', 'true_crops', ...)
    that has it; (None, reason) when no mode has study UIDs."""
    out, unit = {}, ""
    for mode, samples in modes.items():
        if samples is None or estimate not in samples.estimates:
            continue
        block = session_reproducibility(samples.estimates[estimate], samples.rows)
        if block is None:
            continue
        for kind, target in SESSION_TARGETS_PCT.items():
            cv = block[kind]["rms_cv_pct"]
            block[kind]["target_rms_cv_pct"] = target
            block[kind]["met"] = bool(cv <= target) if np.isfinite(cv) else None
        out[mode] = block
        unit = samples.units.get(estimate, unit)
    if not out:
        return (
            None,
            "no study UID (session) in the data: same-session and cross-device figures need it",
        )
    return {
        "estimate": estimate,
        "unit": unit,
        "modes": out,
        "published_rms_cv_pct": PUBLISHED_RMS_CV_PCT,
        "dxa_total_hip_precision_pct": DXA_TOTAL_HIP_PRECISION_PCT,
    }, ""
