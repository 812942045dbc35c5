"""Both DICOM outputs of one radiograph (the SR and the Secondary Capture), in memory and on disk.

Used by ``xbmd estimate --dicom-out`` and by the service. UIDs are deterministic
(``xbmd.pacs.uids``): writing the outputs of the same radiograph and model twice gives the same
instances.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from xbmd import __version__
from xbmd.errors import InputError
from xbmd.pacs import uids


@dataclass
class DicomOutputs:
    """The SR and the SC of one radiograph, their UIDs and the overlay's pixels."""

    sr: Dataset
    sc: Dataset
    overlay_rgb: np.ndarray
    model_id: str

    @property
    def sr_uid(self) -> str:
        return str(self.sr.SOPInstanceUID)

    @property
    def sc_uid(self) -> str:
        return str(self.sc.SOPInstanceUID)


def read_header(path_or_bytes: str | Path | bytes) -> Dataset:
    """The source radiograph's DICOM header (no pixel data); InputError when not DICOM."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    try:
        return pydicom.dcmread(source, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as exc:
        name = "<bytes>" if isinstance(path_or_bytes, bytes) else path_or_bytes
        raise InputError(f"{name}: not a readable DICOM file ({exc})") from exc


def dicom_outputs(source: Dataset, results: list) -> DicomOutputs:
    """The SR and SC of a radiograph's ``HipResult`` (with their ``xray``) in the source study."""
    from xbmd.pacs.capture import build_sc
    from xbmd.pacs.render import render_overlay
    from xbmd.pacs.sr import build_sr

    if not results:
        raise InputError("no results: no DICOM outputs")
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise InputError(f"{results[0].image}: the source has no {keyword}")
    model_id = uids.model_identity(results[0].model)
    study, sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    sr_series, sr_uid = uids.output_uids(study, sop, model_id, "sr")
    sc_series, sc_uid = uids.output_uids(study, sop, model_id, "sc")
    sr = build_sr(source, [r.to_dict() for r in results], model_id, sr_series, sr_uid)
    footer = f"xbmd {__version__}, model {model_id}: estimate from a plain radiograph, not DXA"
    rgb = render_overlay(results, footer=footer)
    sc = build_sc(source, rgb, sc_series, sc_uid)
    return DicomOutputs(sr, sc, rgb, model_id)


def to_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_outputs(outputs: DicomOutputs, folder: str | Path, name: str) -> dict[str, str]:
    """Write ``<name>_sr.dcm`` and ``<name>_sc.dcm`` into ``folder``; their paths and UIDs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sr_path, sc_path = folder / f"{name}_sr.dcm", folder / f"{name}_sc.dcm"
    sr_path.write_bytes(to_bytes(outputs.sr))
    sc_path.write_bytes(to_bytes(outputs.sc))
    return {
        "dicom_sr": str(sr_path),
        "dicom_sc": str(sc_path),
        "sr_sop_instance_uid": outputs.sr_uid,
        "sc_sop_instance_uid": outputs.sc_uid,
    }


def dicom_writer(folder: Path):
    """A ``dicom_writer`` for ``xbmd.estimation.batch.estimate_batch``: the SR and SC of each
    DICOM radiograph into ``folder``, their paths and UIDs into its results."""

    def write(found: list, path: Path, name: str) -> None:
        if found[0].xray.meta.get("format") != "dicom":
            for r in found:
                r.warnings.append("not DICOM: no SR or SC written (no study to put them in)")
            return
        written = write_outputs(dicom_outputs(read_header(path), found), folder, name)
        for r in found:
            r.files.update(written)

    return write
