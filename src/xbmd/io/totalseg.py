"""TotalSegmentator outputs and DICOM SEG as label maps.

`TotalSegmentator <https://github.com/wasserth/TotalSegmentator>`_ (v2, task ``total``) writes
either a folder with one binary NIfTI per structure (``femur_left.nii.gz``, ``hip_right.nii.gz``,
..., its default) or, with ``--ml``, one multilabel NIfTI whose ids are its class ids; with
``--output_type dicom`` a DICOM SEG whose segments are labelled with the structure names.
:func:`read_segmentation` turns the folder and the SEG into one integer label map with
TotalSegmentator's v2 ids (``TOTALSEGMENTATOR_IDS``), on the CT's grid when a reference is given;
the multilabel NIfTI is an ordinary label map (``xbmd.io.ct.read_labels``). ``read_labels``
dispatches here for folders of masks and SEG files, so every command accepts them.

The manifest's and ``--label-map``'s preset ``totalsegmentator`` names the bones
(``TOTALSEGMENTATOR_LABEL_MAP``); the sacrum (25) joins the pelvis body.

Structures of TotalSegmentator's ``tissue_types`` task (``subcutaneous_fat``, ``torso_fat``,
``skeletal_muscle``) in the same folder get xbmd's ids 251-253 (``TISSUE_TYPE_IDS``), outside
every id of the ``total`` task, for phantom-less calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xbmd.errors import InputError
from xbmd.io.ct_dicom import SEG_SOP_CLASS
from xbmd.units import LABEL
from xbmd.volume import Volume

#: TotalSegmentator v2 ``total`` task ids of the structures xbmd uses (its class map).
TOTALSEGMENTATOR_IDS: dict[str, int] = {
    "sacrum": 25,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "heart": 51,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
    "iliac_artery_left": 65,
    "iliac_artery_right": 66,
    "iliac_vena_left": 67,
    "iliac_vena_right": 68,
    "femur_left": 75,
    "femur_right": 76,
    "hip_left": 77,
    "hip_right": 78,
    "gluteus_maximus_left": 80,
    "gluteus_maximus_right": 81,
    "gluteus_medius_left": 82,
    "gluteus_medius_right": 83,
    "gluteus_minimus_left": 84,
    "gluteus_minimus_right": 85,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
}
#: Structures of TotalSegmentator's ``tissue_types`` task, with xbmd's ids (its own ids 1-3
#: would collide with the ``total`` task's).
TISSUE_TYPE_IDS: dict[str, int] = {
    "subcutaneous_fat": 251,
    "torso_fat": 252,
    "skeletal_muscle": 253,
}
#: Every structure read from a folder or a SEG, by name.
STRUCTURE_IDS: dict[str, int] = {**TOTALSEGMENTATOR_IDS, **TISSUE_TYPE_IDS}
#: The bones in xbmd's names (``xbmd.dataset.manifest.BONES``) with TotalSegmentator's ids.
TOTALSEGMENTATOR_LABEL_MAP: dict[str, int] = {
    "pelvis_right": 78,
    "pelvis_left": 77,
    "femur_right": 76,
    "femur_left": 75,
    "sacrum": 25,
}
#: Skeletal muscles of the ``total`` task (ids), for phantom-less calibration.
MUSCLE_IDS = tuple(v for k, v in TOTALSEGMENTATOR_IDS.items() if k.split("_")[0] in
                   ("gluteus", "autochthon", "iliopsoas"))  # fmt: skip
#: Blood-filled vessels and the heart (ids): contrast medium shows here.
BLOOD_POOL_IDS = tuple(
    TOTALSEGMENTATOR_IDS[k]
    for k in ("heart", "aorta", "inferior_vena_cava", "iliac_artery_left", "iliac_artery_right",
              "iliac_vena_left", "iliac_vena_right")
)  # fmt: skip
_NIFTI = (".nii.gz", ".nii")


def _mask_files(folder: Path) -> dict[str, Path]:
    """Structure name -> NIfTI file of a folder of per-structure masks."""
    out = {}
    for f in folder.iterdir():
        for suffix in _NIFTI:
            if f.is_file() and f.name.endswith(suffix):
                out[f.name[: -len(suffix)]] = f
    return out


def _is_seg_file(path: Path) -> bool:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def _seg_in_folder(folder: Path) -> Path | None:
    """The DICOM SEG file of a folder holding one SEG and nothing else readable as DICOM."""
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.endswith(_NIFTI)]
    segs = [f for f in files if _is_seg_file(f)]
    return segs[0] if len(segs) == 1 and len(files) == 1 else None


def is_segmentation_source(path: str | Path) -> bool:
    """True for a folder of per-structure NIfTI masks, a DICOM SEG file, or a folder with one."""
    path = Path(path)
    if path.is_dir():
        return bool(_mask_files(path)) or _seg_in_folder(path) is not None
    if (
        path.is_file()
        and not path.name.endswith(_NIFTI)
        and path.suffix.lower() not in (".nrrd", ".nhdr", ".mha", ".mhd")
    ):
        return _is_seg_file(path)
    return False


def read_segmentation(
    path: str | Path,
    reference: Volume | None = None,
    structures: tuple[str, ...] | None = None,
) -> Volume:
    """A label map with TotalSegmentator's v2 ids from a folder of masks or a DICOM SEG.

    Parameters
    ----------
    path : a TotalSegmentator output folder (one ``<structure>.nii.gz`` per structure; files of
        other names are ignored), a DICOM SEG file (segments named like TotalSegmentator's
        structures, e.g. ``femur_left``; case and spaces do not matter), or a folder holding one.
    reference : the CT: the result lies on its grid (a SEG is resampled onto it, nearest
        neighbour; a folder's masks must already lie on it).
    structures : names to read (default: every structure of ``STRUCTURE_IDS`` present).

    The ids are those of ``STRUCTURE_IDS``; structures that overlap keep the later one in that
    order (so a bone wins over the tissue-type masks).
    """
    path = Path(path)
    wanted = STRUCTURE_IDS if structures is None else {s: STRUCTURE_IDS[s] for s in structures}
    if path.is_dir():
        seg = _seg_in_folder(path)
        if seg is None:
            return _read_folder(path, reference, wanted)
        path = seg
    return _read_seg(path, reference, wanted)


def _read_folder(folder: Path, reference: Volume | None, wanted: dict[str, int]) -> Volume:
    from xbmd.io.ct import read_labels

    files = _mask_files(folder)
    names = sorted((n for n in files if n in wanted), key=_overlap_order)
    if not names:
        raise InputError(
            f"{folder}: no mask of a known structure (e.g. femur_left.nii.gz, hip_right.nii.gz; "
            f"TotalSegmentator's default output) among its {len(files)} NIfTI files"
        )
    out: Volume | None = None
    for name in names:
        mask = read_labels(files[name], reference=reference if out is None else out)
        if out is None:
            out = mask.with_data(np.zeros(mask.shape, np.uint8), unit=LABEL)
            out.source = str(folder)
            out.meta = {"format": "totalsegmentator-folder", "structures": []}
        out.data[mask.data > 0] = wanted[name]
        out.meta["structures"].append(name)
    return out


def _overlap_order(name: str) -> tuple[int, str]:
    return (0 if name in TISSUE_TYPE_IDS else 1, name)


def _normalise(label: str) -> str:
    return "_".join(label.strip().replace("-", " ").split()).lower()


def _read_seg(path: Path, reference: Volume | None, wanted: dict[str, int]) -> Volume:
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises many types for malformed files
        raise InputError(
            f"{path}: not a readable DICOM SEG ({type(exc).__name__}: {exc})"
        ) from None
    lookup = {_normalise(k): v for k, v in wanted.items()}
    numbers, ids, names = [], [], []
    for number in seg.segment_numbers:
        label = str(seg.get_segment_description(number).SegmentLabel)
        ident = lookup.get(_normalise(label))
        if ident is not None:
            numbers.append(number)
            ids.append(ident)
            names.append(label)
    if not numbers:
        found = [str(seg.get_segment_description(n).SegmentLabel) for n in seg.segment_numbers]
        raise InputError(
            f"{path}: none of the SEG's segments {found[:12]} is a structure xbmd knows "
            "(segment labels like femur_left, hip_right, sacrum)"
        )
    try:
        vol = seg.get_volume(
            segment_numbers=numbers,
            combine_segments=True,
            skip_overlap_checks=True,
            dtype=np.uint16,
        )
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: the SEG's frames do not form a regular volume ({exc})") from None
    table = np.zeros(max(numbers) + 1, np.uint8)
    table[numbers] = ids
    data = table[np.asarray(vol.array)]
    affine = np.asarray(vol.affine, float)[:, [2, 1, 0, 3]]  # (k, j, i) -> (i, j, k) columns
    labels = Volume(
        data, affine, LABEL, source=str(path), meta={"format": "dicom-seg", "structures": names}
    )
    if reference is not None and not labels.same_grid(reference):
        labels = _resample_nearest(labels, reference)
    return labels


def _resample_nearest(labels: Volume, reference: Volume) -> Volume:
    """``labels`` on ``reference``'s grid (nearest neighbour; outside: 0), with SimpleITK."""
    import SimpleITK as sitk

    from xbmd.io.ct import volume_to_sitk

    moving = volume_to_sitk(labels)
    fixed = volume_to_sitk(reference.with_data(np.zeros(reference.shape, np.uint8), unit=LABEL))
    out = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    resampled = reference.with_data(sitk.GetArrayFromImage(out).astype(np.uint8), unit=LABEL)
    resampled.source, resampled.meta = labels.source, dict(labels.meta)
    return resampled
