"""Deterministic UIDs for xbmd's DICOM outputs.

The SR and the Secondary Capture of a radiograph get SOP Instance UIDs derived from the source
SOP Instance UID and the model's identity (``model_identity``), and their series UIDs from the
source study and the model. Estimating the same radiograph with the same model again (a job redone
after a crash, a second ``xbmd estimate --dicom-out``) therefore makes the same UIDs: a PACS keeps
one copy, never two. A new model makes new UIDs (a new series next to the old one).

UIDs are ``2.25.<integer>`` from a SHA-512 of the inputs (pydicom's ``generate_uid`` with entropy
sources under the prefix ``2.25.``, PS3.5 B.2), so no organisation root is needed.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

KINDS = ("sr", "sc")


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``."""
    return str(generate_uid(prefix="2.25.", entropy_srcs=[str(p) for p in parts]))


def model_identity(model: dict) -> str:
    """A short stable identity of a model from ``HipResult.model`` (file name and creation)."""
    name = Path(str(model.get("path") or "model")).name
    return f"{name}@{model.get('created') or 'unknown'}"


def output_uids(study_uid: str, sop_uid: str, model_id: str, kind: str) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of the ``kind`` ('sr' or 'sc') output of one source."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    series = derived_uid("xbmd-series", kind, study_uid, model_id)
    instance = derived_uid("xbmd-instance", kind, sop_uid, model_id)
    return series, instance
