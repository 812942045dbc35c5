"""The estimate's 95 % interval and the quality gate, measured end to end from the results'
fields (``HipResult``: ``bmd_interval_g_cm2``, ``t_score_interval``, ``confident``, ``gate``,
``ood_score``, ``ood_threshold``). Each field may be None (a model without a calibrated interval
or out-of-distribution score): the figures that need it are then "not available".

- **interval**: over hips without an implant, the share whose reference lies inside the estimate's
  95 % interval (coverage; target 93-97 %), the shares below and above it, its median width in
  g/cm2 and in T-score units;
- **gate**: hips with an implant (index ``implant`` column) flagged, i.e. not confident or not
  reported at all (target 100 %); hips without an implant wrongly flagged (target <= 2 %); the
  share above the out-of-distribution threshold; each reason the gate gave, tallied with its
  numbers replaced by ``#`` so that one rule counts once; the same per device manufacturer.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

INTERVAL_COVERAGE_TARGET = (0.93, 0.97)
IMPLANT_FLAGGED_TARGET = 1.0
CLEAN_FLAGGED_MAX = 0.02


def _pair(value) -> tuple[float, float] | None:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _flagged(result: dict) -> bool:
    """Not confident (a missing ``confident`` counts as not confident)."""
    return result.get("confident") is not True


def _ood(result: dict) -> bool | None:
    score, threshold = result.get("ood_score"), result.get("ood_threshold")
    if score is None or threshold is None:
        return None
    return float(score) > float(threshold)


def interval_section(
    records: list[dict], reference: str = "ct_abmd_g_cm2"
) -> tuple[dict | None, str]:
    """Coverage and width of the 95 % interval over the reported hips without an implant.

    ``records``: ``xbmd.evaluation.end_to_end`` records (``implant``, ``references``, ``result``).
    """
    clean = [r for r in records if r["result"] is not None and not r["implant"]]
    if not clean:
        return None, "no hip without an implant was estimated end to end"
    items = [(r, _pair(r["result"].get("bmd_interval_g_cm2"))) for r in clean]
    items = [(r, iv) for r, iv in items if iv is not None]
    if not items:
        return (
            None,
            "the results carry no interval (bmd_interval_g_cm2 is None: no calibrated model)",
        )
    ref = np.array([r["references"].get(reference, math.nan) for r, _ in items], float)
    lo = np.array([iv[0] for _, iv in items])
    hi = np.array([iv[1] for _, iv in items])
    ok = np.isfinite(ref)
    if not ok.any():
        return None, f"no {reference} reference for the hips with an interval"
    inside = (lo <= ref) & (ref <= hi)
    confident = np.array([r["result"].get("confident") is True for r, _ in items])
    t_widths = [
        t[1] - t[0]
        for t in (_pair(r["result"].get("t_score_interval")) for r, _ in items)
        if t is not None
    ]
    coverage = float(inside[ok].mean())
    return {
        "reference": reference,
        "hips": len(clean),
        "with_interval": len(items),
        "compared": int(ok.sum()),
        "coverage": coverage,
        "below": float((ref[ok] < lo[ok]).mean()),
        "above": float((ref[ok] > hi[ok]).mean()),
        "median_width_g_cm2": float(np.median(hi - lo)),
        "mean_width_g_cm2": float(np.mean(hi - lo)),
        "median_width_t": float(np.median(t_widths)) if t_widths else None,
        "confident_compared": int((ok & confident).sum()),
        "confident_coverage": float(inside[ok & confident].mean())
        if (ok & confident).any()
        else None,
        "target_coverage": list(INTERVAL_COVERAGE_TARGET),
        "met": INTERVAL_COVERAGE_TARGET[0] <= coverage <= INTERVAL_COVERAGE_TARGET[1],
    }, ""


def reason_key(reason: str) -> str:
    """A gate reason with its numbers replaced by ``#`` (one rule, one key)."""
    return re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", str(reason)).strip()


def gate_section(records: list[dict]) -> tuple[dict | None, str]:
    """Implant hips flagged, clean hips wrongly flagged, out-of-distribution shares and the gate's
    reasons (module docstring). ``records``: ``xbmd.evaluation.end_to_end`` records."""
    if not records:
        return None, "no hip estimated end to end"
    implant = [r for r in records if r["implant"]]
    clean = [r for r in records if not r["implant"]]
    section = {
        "implant": _implant_block(implant),
        "clean": _clean_block(clean),
        "ood": _ood_block(records),
    }
    reported = [r["result"] for r in records if r["result"] is not None]
    reasons, examples = Counter(), {}
    for result in reported:
        for reason in dict.fromkeys(reason_key(g) for g in (result.get("gate") or [])):
            reasons[reason] += 1
        for g in result.get("gate") or []:
            examples.setdefault(reason_key(g), str(g))
    section["reasons"] = [
        {"reason": key, "hips": n, "example": examples[key]} for key, n in reasons.most_common()
    ]
    section["not_confident_without_reason"] = sum(
        1 for r in reported if _flagged(r) and not (r.get("gate") or [])
    )
    section["by_manufacturer"] = _by_manufacturer(clean)
    return section, ""


def _implant_block(implant: list[dict]) -> dict | None:
    if not implant:
        return None
    reported = [r["result"] for r in implant if r["result"] is not None]
    flagged = sum(_flagged(r) for r in reported)
    refused = len(implant) - len(reported)
    share = _share(flagged + refused, len(implant))
    return {
        "hips": len(implant),
        "reported": len(reported),
        "flagged": flagged,
        "refused": refused,
        "share_flagged_or_refused": share,
        "target": IMPLANT_FLAGGED_TARGET,
        "met": share is not None and share >= IMPLANT_FLAGGED_TARGET,
        "kinds": dict(Counter(r["implant"] for r in implant)),
    }


def _clean_block(clean: list[dict]) -> dict | None:
    if not clean:
        return None
    reported = [r["result"] for r in clean if r["result"] is not None]
    flagged = sum(_flagged(r) for r in reported)
    share = _share(flagged, len(reported))
    return {
        "hips": len(clean),
        "reported": len(reported),
        "refused": len(clean) - len(reported),
        "flagged": flagged,
        "share_flagged": share,
        "target_max": CLEAN_FLAGGED_MAX,
        "met": share is not None and share <= CLEAN_FLAGGED_MAX,
    }


def _ood_block(records: list[dict]) -> dict | None:
    scored = [(r, _ood(r["result"])) for r in records if r["result"] is not None]
    scored = [(r, above) for r, above in scored if above is not None]
    if not scored:
        return None
    out = {"hips_scored": len(scored), "above_threshold": sum(a for _, a in scored)}
    out["share_above"] = _share(out["above_threshold"], len(scored))
    for name, keep in (("clean", False), ("implant", True)):
        group = [a for r, a in scored if bool(r["implant"]) == keep]
        out[name] = {"hips_scored": len(group), "share_above": _share(sum(group), len(group))}
    return out


def _by_manufacturer(clean: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in clean:
        if r["result"] is not None:
            groups[r.get("manufacturer") or "unknown"].append(r["result"])
    out = []
    for name in sorted(groups):
        results = groups[name]
        ood = [a for a in (_ood(r) for r in results) if a is not None]
        out.append(
            {
                "manufacturer": name,
                "hips": len(results),
                "share_flagged": _share(sum(_flagged(r) for r in results), len(results)),
                "share_ood": _share(sum(ood), len(ood)) if ood else None,
            }
        )
    return out
