"""Which files of a batch are hip radiographs: folders (recursive), DICOMDIR, filters.

``gather_inputs`` turns the paths a user gives into the list of radiographs to estimate and the
list of files skipped, each with a reason. Skipping is not failing: a study export holds chest
films, reports and lateral views next to the AP pelvis, and those are not errors.

- A file named on the command line is estimated as given (a bad one becomes a failure with its
  reason, as before); a DICOMDIR named on the command line stands for the files it references.
- A folder is walked recursively, in sorted order. Its DICOM files pass through ``InputFilter``
  (SOP Class, Modality, Body Part Examined, View Position, read from the header only); PNG, JPEG
  and TIFF files are taken (they carry no such facts); anything else is skipped ("not an
  image"). A DICOMDIR inside a folder is skipped: the files it indexes are walked anyway.
- A DICOM file whose header cannot be read is kept, so that it is reported as a failure with the
  reader's message rather than silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xbmd.io.formats import sniff_format
from xbmd.io.xray import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Body Part Examined values accepted by default (DICOM CID 4031 terms, spaces removed)
HIP_BODY_PARTS = ("PELVIS", "HIP", "HIPS", "FEMUR", "LOWERLIMB", "LEG", "THIGH", "HIPJOINT")
#: View Position values accepted by default: frontal views ("" = not stated)
FRONTAL_VIEWS = ("AP", "PA", "")


@dataclass(frozen=True)
class InputFilter:
    """What a DICOM file must be to be estimated; every field is a set of accepted values.

    ``body_parts`` and ``view_positions`` are compared upper case without spaces; an absent or
    empty Body Part Examined passes when ``allow_missing_body_part``.
    """

    sop_classes: tuple[str, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)
    modalities: tuple[str, ...] = ("DX", "CR")
    body_parts: tuple[str, ...] = HIP_BODY_PARTS
    allow_missing_body_part: bool = True
    view_positions: tuple[str, ...] = FRONTAL_VIEWS

    @classmethod
    def from_dict(cls, values: dict | None) -> InputFilter:
        """From a config mapping with any of the field names; unknown names are refused."""
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown filter settings: {', '.join(sorted(unknown))}")
        clean = {
            k: (bool(v) if k == "allow_missing_body_part" else tuple(str(x) for x in v))
            for k, v in values.items()
        }
        return cls(**clean)

    def reason(self, tags: dict) -> str | None:
        """Why a DICOM instance is skipped, or None when it is a radiograph to estimate.

        ``tags`` maps DICOM keywords to values (a pydicom Dataset works too).
        """
        sop_class = str(tags.get("SOPClassUID") or "")
        modality = str(tags.get("Modality") or "").upper()
        if sop_class not in self.sop_classes:
            return (
                f"SOP Class {sop_class or 'missing'} ({_uid_name(sop_class)}) is not a radiograph"
            )
        if modality not in self.modalities:
            return f"Modality {modality or 'missing'} is not one of {', '.join(self.modalities)}"
        part = _norm(tags.get("BodyPartExamined"))
        if part == "" and not self.allow_missing_body_part:
            return "no Body Part Examined"
        if part and part not in {_norm(p) for p in self.body_parts}:
            return f"Body Part Examined {part} is not a hip"
        view = _norm(tags.get("ViewPosition"))
        if view not in {_norm(v) for v in self.view_positions}:
            return f"View Position {view} is not a frontal view"
        return None


@dataclass
class Gathered:
    """``images``: the radiographs to estimate, in order; ``skipped``: (path, reason) pairs."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def gather_inputs(paths: list[Path], filters: InputFilter | None = None) -> Gathered:
    """The radiographs named by ``paths`` (files, folders, DICOMDIRs); see the module docstring."""
    filters = filters or InputFilter()
    out = Gathered()
    seen: set[Path] = set()

    def take(path: Path) -> None:
        key = path.resolve()
        if key in seen:
            out.skipped.append((str(path), "the same file again (given twice): estimated once"))
        else:
            seen.add(key)
            out.images.append(path)

    for path in map(Path, paths):
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                _consider(child, filters, take, out.skipped)
        elif path.is_file() and _is_dicomdir(path):
            for child in _dicomdir_files(path, out.skipped):
                _consider(child, filters, take, out.skipped)
        else:
            take(path)  # as given: a missing or bad file becomes a failure with its reason
    return out


def _consider(path: Path, filters: InputFilter, take, skipped: list) -> None:
    kind = _sniff(path)
    if kind is None:
        skipped.append((str(path), "not an image (DICOM, PNG, JPEG or TIFF)"))
    elif kind != "dicom":
        take(path)
    elif _is_dicomdir(path):
        skipped.append((str(path), "DICOMDIR (the files it indexes are in the folder)"))
    else:
        header = _header(path)
        why = None if header is None else filters.reason(header)
        if why is None:
            take(path)
        else:
            skipped.append((str(path), why))


def _sniff(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return "dicom"  # unreadable: let the reader report it
    return sniff_format(head)


def _header(path: Path):
    """The DICOM header, or None when it cannot be read (the file is then estimated and fails
    with the reader's message)."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError):
        return None


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    if _sniff(path) != "dicom":
        return False
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS


def _dicomdir_files(path: Path, skipped: list) -> list[Path]:
    """The files a DICOMDIR references (pydicom's FileSet), in its order."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(pydicom.dcmread(path))
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        skipped.append((str(path), f"unreadable DICOMDIR ({exc})"))
        return []
    files = []
    for instance in fileset:
        file = Path(instance.path)
        if file.is_file():
            files.append(file)
        else:
            skipped.append((str(file), "listed in the DICOMDIR but missing"))
    return files


def _norm(value) -> str:
    return str(value or "").upper().replace(" ", "").replace("_", "")


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else "unknown"


def write_skipped(skipped: list[tuple[str, str]], path: str | Path) -> Path:
    """``skipped.csv``: file, reason."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    return path
