"""The training-set format: what ``xbmd prepare`` writes and every reader reads.

The one owner of the dataset's files (docs/data-format.md, "Training dataset"):

::

    DATASET/
      prepare.json                      the run's summary; its ``identity`` says how it was made
      index.csv                         one row per sample (``INDEX_COLUMNS``)
      samples/<case>/<xray>_<side>.npz  the arrays of a sample (``SAMPLE_ARRAYS``)
      samples/<case>/<xray>_<side>.json its sidecar: labels, geometry, poses, provenance
      radiographs/<case>/<xray>.npz     the whole radiograph, reduced, for the localiser
      registrations/, logs/, failures.csv

A dataset is self-contained: training (stages and the localiser) and evaluation read only it.
Hips with an implant (the manifest's ``implants``) have samples, marked in the index's
``implant`` column: their CT labels mean nothing, so BMD training leaves them out, but the
quality gate is tested on them. A session is a DICOM study (``study_uid``): radiographs of one
visit share one.
Format 2 added ``radiographs/`` and the index's ``radiograph`` column; format 1 datasets must be
prepared again.

Readers: :func:`read_index` (validated rows), :func:`load_sample` (a :class:`Sample`),
:func:`load_radiograph` (a :class:`Radiograph`), :func:`label_values`.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.geometry import SIDES

DATASET_FORMAT = "xbmd-training-set"
DATASET_FORMAT_VERSION = 2
SAMPLE_FORMAT = "xbmd-training-sample"
SAMPLE_FORMAT_VERSION = 2
#: What a dataset folder may hold besides prepare.json (inputs made beforehand are welcome).
DATASET_ENTRIES = (
    "samples", "registrations", "radiographs", "landmarks", "qc", "logs", "index.csv",
    "failures.csv",
)  # fmt: skip
#: The labels of a sample, in its sidecar's ``labels`` and in the index.
LABEL_COLUMNS = (
    "qct_vbmd_mg_cm3",
    "ct_abmd_g_cm2",
    "neck_abmd_g_cm2",
    "bmd_drr_g_cm2",
    "dxa_total_hip_g_cm2",
    "dxa_neck_g_cm2",
)
INDEX_COLUMNS = (
    "sample_id",
    "case_id",
    "patient_id",
    "xray",
    "side",
    "mirrored",
    "file",
    "radiograph",
    *LABEL_COLUMNS,
    "pose_source",
    "registration_quality",
    "similarity",
    "age_years",
    "sex",
    "head_row",
    "head_col",
    "pf_valid_fraction",
    "study_uid",
    "kvp",
    "manufacturer",
    "implant",
)
REQUIRED_COLUMNS = ("sample_id", "patient_id", "case_id", "side", "file", *LABEL_COLUMNS)
FAILURE_COLUMNS = ("case_id", "xray", "side", "stage", "error")
#: The arrays of a sample (all CROP_SIZE_PX square, canonical right-hip orientation).
SAMPLE_ARRAYS = {
    "xray": "float32, the radiograph's values as read (bone bright), 0 where not valid",
    "valid": "bool, crop pixel inside the radiograph and its collimated field",
    "bone_drr_g_cm2": "float32, hemipelvis + femur, g/cm2",
    "pf_drr_g_cm2": "float32, proximal femur, g/cm2, 0 outside pf_mask",
    "pf_mask": "bool, proximal-femur region",
}
#: The reduced radiograph stored for the localiser: longest side, pixels (a localiser of input
#: size up to half of it sees it sharp).
RADIOGRAPH_MAX_PX = 512


@dataclass
class Sample:
    """One hip of one radiograph: the crop and its DRRs (CROP_SIZE_PX square, canonical
    orientation) and the sidecar (``meta``: labels, crop, geometry, poses, provenance)."""

    xray: np.ndarray
    valid: np.ndarray
    bone_drr_g_cm2: np.ndarray | None
    pf_drr_g_cm2: np.ndarray | None
    pf_mask: np.ndarray | None
    meta: dict

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by their file names (``SAMPLE_ARRAYS``)."""
        return {k: getattr(self, k) for k in SAMPLE_ARRAYS if getattr(self, k) is not None}

    @property
    def head_image_px(self) -> tuple[float, float]:
        """The femoral head centre in the radiograph's pixels (row, col)."""
        return _head_center(self.meta, "sidecar")


def load_sample(path: str | Path) -> Sample:
    """A sample's arrays (``.npz``) and its sidecar (``.json``, same name); InputError naming the
    file when either is missing or unreadable, or the crop lacks ``xray``/``valid``."""
    path = Path(path).with_suffix(".npz")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{exc.filename}: no such sample file") from None
    # zip, zlib or JSON damage: np.load raises any of these for a truncated or altered file
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path}: unreadable sample ({type(exc).__name__}: {exc})") from None
    missing = {"xray", "valid"} - set(arrays)
    if missing:
        raise InputError(f"{path}: no array {', '.join(sorted(missing))}")
    if arrays["xray"].ndim != 2 or arrays["xray"].shape != arrays["valid"].shape:
        raise InputError(f"{path}: xray {arrays['xray'].shape} and valid must be equal 2D grids")
    for name in ("xray", "bone_drr_g_cm2", "pf_drr_g_cm2"):
        value = arrays.get(name)
        if value is not None and not (
            np.issubdtype(value.dtype, np.number) and np.isfinite(value).all()
        ):
            raise InputError(f"{path}: {name} holds NaN, infinite or non-numeric values")
    return Sample(
        arrays["xray"].astype(np.float32),
        arrays["valid"].astype(bool),
        arrays.get("bone_drr_g_cm2"),
        arrays.get("pf_drr_g_cm2"),
        arrays["pf_mask"].astype(bool) if "pf_mask" in arrays else None,
        meta,
    )


def read_index(dataset: str | Path) -> list[dict]:
    """The rows of ``DATASET/index.csv`` (strings, as in the file), checked: the file exists, is
    UTF-8, has the required columns and at least one row, sides are 'right' or 'left'."""
    dataset = Path(dataset)
    index = dataset / "index.csv"
    if not dataset.is_dir():
        raise InputError(f"{dataset}: no such dataset folder")
    if not index.is_file():
        raise InputError(f"{index}: no such file; is {dataset} a dataset written by xbmd prepare?")
    try:
        with index.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{index}: not a readable CSV ({exc})") from None
    if not rows:
        raise InputError(f"{index}: no samples")
    missing = set(REQUIRED_COLUMNS) - set(rows[0])
    if missing:
        raise InputError(f"{index}: missing columns {', '.join(sorted(missing))}")
    for n, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{index}: line {n} has a different number of cells than the header")
        if row["side"] not in SIDES:
            raise InputError(
                f"{index}: line {n}: side must be 'right' or 'left', not {row['side']!r}"
            )
    return rows


def number(value) -> float:
    """A cell as a float; NaN when empty or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def label_values(rows: list[dict], column: str) -> np.ndarray:
    """(N,) float64 values of an index column, NaN where empty."""
    return np.array([number(r.get(column)) for r in rows], dtype=np.float64)


def read_summary(dataset: str | Path) -> dict:
    """``DATASET/prepare.json``."""
    path = Path(dataset) / "prepare.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; not an `xbmd prepare` dataset") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None


def index_row(doc: dict) -> dict:
    """One row of index.csv from a sample's sidecar JSON."""
    labels, reg = doc["labels"], doc["registration"]
    head = doc["landmarks_px"]["head_center_px"]
    return {
        "sample_id": doc["sample_id"],
        "case_id": doc["case_id"],
        "patient_id": doc["patient_id"],
        "xray": doc["xray"],
        "side": doc["side"],
        "mirrored": doc["mirrored"],
        "file": doc["file"],
        "radiograph": doc.get("radiograph"),
        **{k: labels[k] for k in LABEL_COLUMNS},
        "pose_source": reg["pose_source"],
        "registration_quality": doc["quality"],
        "similarity": reg["similarity"],
        "age_years": doc["patient"]["age_years"],
        "sex": doc["patient"]["sex"],
        "head_row": round(head[0], 3),
        "head_col": round(head[1], 3),
        "pf_valid_fraction": doc["pf_valid_fraction"],
        "study_uid": doc.get("acquisition", {}).get("study_uid"),
        "kvp": doc.get("acquisition", {}).get("kvp"),
        "manufacturer": doc.get("acquisition", {}).get("manufacturer"),
        "implant": doc.get("implant"),
    }


def has_implant(row: dict) -> bool:
    """Whether an index row's hip holds an implant (its CT labels then mean nothing)."""
    return bool((row.get("implant") or "").strip())


def index_rows(dataset: Path) -> list[dict]:
    """The index rows of every finished sample (sidecar and arrays both written), sorted."""
    rows = []
    for path in sorted((Path(dataset) / "samples").glob("*/*.json")):
        if path.with_suffix(".npz").exists():
            rows.append(index_row(json.loads(path.read_text(encoding="utf-8"))))
    return sorted(rows, key=lambda r: r["sample_id"])


# ------------------------------------------------------------------------------------------------
# The whole radiograph, reduced, for the localiser


@dataclass
class Radiograph:
    """A radiograph reduced to at most ``RADIOGRAPH_MAX_PX`` on its longest side, in ``path``
    (its ``pixels``: (rows, cols) float32, bone bright).

    ``scale_rc`` = reduced / original size per axis, pixel centres mapped as
    ``(x + 0.5) * scale - 0.5``; ``heads`` {side: (row, col) in the reduced pixels, or None where
    unknown}.
    """

    path: Path
    scale_rc: tuple[float, float]
    heads: dict[str, tuple[float, float] | None]

    def to_reduced(self, rc) -> tuple[float, float]:
        r, c = ((np.asarray(rc, dtype=float) + 0.5) * self.scale_rc - 0.5).tolist()
        return (r, c)


def reduce_radiograph(pixels: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``pixels`` resized (anti-aliased bilinear) so that the longest side is at most
    ``RADIOGRAPH_MAX_PX``; returns the reduced image and its scale per axis."""
    import torch
    from torch.nn import functional as F

    rows, cols = pixels.shape
    factor = min(1.0, RADIOGRAPH_MAX_PX / max(rows, cols))
    shape = (max(1, round(rows * factor)), max(1, round(cols * factor)))
    if shape == (rows, cols):
        return np.asarray(pixels, dtype=np.float32), (1.0, 1.0)
    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy(), (shape[0] / rows, shape[1] / cols)


def radiograph_arrays(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of ``radiographs/<case>/<xray>.npz`` for a radiograph."""
    reduced, scale = reduce_radiograph(pixels)
    return {
        "pixels": reduced,
        "scale_rc": np.asarray(scale, dtype=np.float64),
        "shape_px": np.asarray(pixels.shape, dtype=np.int64),
    }


def dataset_radiographs(dataset: str | Path) -> list[Radiograph]:
    """Every radiograph of a dataset with its femoral heads (from the samples' sidecars), in
    index order. A side with no sample is unknown (None). A radiograph file that cannot be read
    is left out with a warning."""
    import warnings

    dataset = Path(dataset)
    rows = read_index(dataset)
    if "radiograph" not in rows[0] or not all(r["radiograph"] for r in rows):
        raise InputError(
            f"{dataset}: this dataset holds no reduced radiographs (format 1): prepare it again "
            "with this xbmd"
        )
    heads: dict[str, dict] = {}
    for row in rows:
        sidecar = (dataset / row["file"]).with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{sidecar}: unreadable sidecar ({exc})") from None
        heads.setdefault(row["radiograph"], dict.fromkeys(SIDES))[row["side"]] = _head_center(
            meta, sidecar
        )
    out = []
    for name, by_side in heads.items():
        path = dataset / name
        try:
            with np.load(path) as data:
                scale = tuple(float(v) for v in data["scale_rc"])
        except (OSError, ValueError, KeyError, EOFError) as exc:
            warnings.warn(f"{path}: cannot be read, skipped ({exc})", stacklevel=2)
            continue
        image = Radiograph(path, scale, {})
        image.heads = {s: image.to_reduced(h) if h else None for s, h in by_side.items()}
        out.append(image)
    return out


def _head_center(meta: dict, where) -> tuple[float, float]:
    try:
        row, col = meta["landmarks_image_px"]["head_center_px"]
        head = (float(row), float(col))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: no femoral head centre ({exc!r})") from None
    if not all(math.isfinite(v) for v in head):
        raise InputError(f"{where}: femoral head centre is not finite: {head}")
    return head
