"""Bad input for every command that reads files (issue 13): one clear line, no traceback.

Each command (calibrate, drr, register, prepare, train, evaluate, estimate, landmarks, synth,
demo-ct, serve) is fed empty, truncated, wrongly formatted files, the wrong modality, absurd
header values, NaN/inf, mismatched label grids, folders where files belong, outputs it cannot
write and, for those that work through many items, batches of good and bad items. Every case
asserts: the documented exit code, no exception escaped the command (CliRunner catches them, so
"Traceback" can never be in its output: the escaped exception is the real check), and that the
message names the file. Some cases also require a word saying what is wrong (``must``).

``xbmd estimate`` is tested as a black box, like the others.

Outputs that cannot be written: CI runs as root, which writes wherever a mode bit would stop a
user. Two kinds are used: a path under a regular file (no one can create it), and a folder made
immutable with ``chattr +i`` (root is bound by it too). Where the file system or the container
refuses ``chattr``, a non-root run uses a read-only mode, and a root run a path under ``/proc``,
where nothing can be created: the case stays a non-writable folder everywhere, never skipped.

The NEMA chest and leg CR radiographs come from the ``pydicom-data`` package (dev extra), read
from the installed package, never downloaded.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

# Lightning adds a log handler on the stream that is sys.stderr when it is first imported:
# imported here, that is pytest's, not the stream of one CliRunner call, closed after it
import lightning  # noqa: F401  (xbmd train imports it inside the command)
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from train_helpers import SMALL
from xbmd.cli import app
from xbmd.io.ct import read_ct, write_volume
from xbmd.volume import Volume

runner = CliRunner()


def invoke(args: list[str]):
    """Run the CLI in-process; fail the test if any exception escaped a command."""
    result = runner.invoke(app, [str(a) for a in args])
    escaped = result.exception
    if escaped is not None and not isinstance(escaped, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(escaped))
        pytest.fail(f"exception escaped `xbmd {' '.join(map(str, args))}`:\n{tb}")
    assert "Traceback" not in result.output
    return result


# ------------------------------------------------------------------------------------------------
# The bad files


def _nema(name: str) -> Path:
    """A file of the pydicom-data package, from its installed folder (no download)."""
    spec = importlib.util.find_spec("data_store")
    assert spec is not None, "pydicom-data (dev extra) is needed: pip install -e '.[dev]'"
    path = Path(spec.origin).parent / "data" / name
    assert path.is_file(), path
    return path


def _ct_series(folder: Path, mutate=None, n: int = 6, size: int = 16) -> Path:
    """A small CT series (DICOM, one file per slice); ``mutate(ds, k)`` spoils slice k."""
    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "P1", k + 1
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.KVP = 1, -1024, 120
        ds.PixelData = rng.integers(0, 2000, (size, size)).astype(np.int16).tobytes()
        if mutate is not None:
            mutate(ds, k)
        path = folder / f"s{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        # values pydicom will not write: put them in place of same-length placeholders
        path.write_bytes(path.read_bytes().replace(b"7.77", b"abc ").replace(b"5.55", b"x.yz"))
    return folder


def _spoil_xray(src: Path, dst: Path, **values) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(dst)
    dst.write_bytes(dst.read_bytes().replace(b"7.77", b"abc "))
    return dst


def _save_like(array: np.ndarray, like: Path, path: Path, **changes) -> Path:
    """A NIfTI of ``array`` with the geometry of ``like`` (optionally changed)."""
    ref = sitk.ReadImage(str(like))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(ref.GetSpacing())
    image.SetOrigin(ref.GetOrigin())
    image.SetDirection(ref.GetDirection())
    if "spacing" in changes:
        image.SetSpacing(changes["spacing"])
    if "shift_mm" in changes:
        image.SetOrigin([o + changes["shift_mm"] for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A folder nobody can write into, root included (module docstring)."""
    folder = tmp_path_factory.mktemp("readonly")
    chattr = shutil.which("chattr")
    immutable = False
    if chattr:
        immutable = subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
    if immutable:
        try:
            yield folder
        finally:
            subprocess.run([chattr, "-i", str(folder)], check=True)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    else:
        yield Path("/proc/xbmd-readonly")


@pytest.fixture(scope="module")
def files(tiny_cohort, tmp_path_factory, readonly) -> dict[str, Path]:
    """Every bad (and good) file the cases use, by name."""
    root = tmp_path_factory.mktemp("bad_inputs")
    case = tiny_cohort / "cases" / "case_VQ0001"
    f: dict[str, Path] = {
        "ct": case / "ct.nii.gz",
        "labels": case / "labels.nii.gz",
        "phantom": case / "phantom.json",
        "xray": case / "xray_01.dcm",
        "xray_png": case / "xray_01.png",
        "landmarks": case / "landmarks.json",
        "readonly": readonly,
    }
    ct_array = sitk.GetArrayFromImage(sitk.ReadImage(str(f["ct"]))).astype(np.float32)
    lab_array = sitk.GetArrayFromImage(sitk.ReadImage(str(f["labels"])))

    def put(name: str, data: bytes | str) -> Path:
        path = root / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        f[name] = path
        return path

    # empty, truncated, wrong format
    for name in ("empty.nii.gz", "empty.dcm", "empty.csv", "empty.json", "empty.yaml"):
        put(name, b"")
    put("trunc.nii.gz", f["ct"].read_bytes()[:3000])
    put("trunc.dcm", f["xray"].read_bytes()[:3000])
    put("text.nii.gz", "this is not an image\n")
    put("text.dcm", "this is not DICOM either\n")
    put("random.dcm", np.random.default_rng(1).bytes(5000))
    put("png_as.nii.gz", f["xray_png"].read_bytes())
    put("afile", "a regular file in the way of a folder\n")
    f["folder"] = root / "folder"
    f["folder"].mkdir()
    f["folder.npy"] = root / "folder.npy"  # a folder with a file's name
    f["folder.npy"].mkdir()
    f["under_file"] = f["afile"] / "sub"
    # wrong modality: real CR radiographs (chest, leg) and a CT slice
    for key, name in (("nema_chest", "RG1_UNCR.dcm"), ("nema_leg", "RG3_UNCR.dcm")):
        (root / key).mkdir()
        f[key] = Path(shutil.copy(_nema(name), root / key / name))
    (root / "ct_slice").mkdir()
    f["ct_slice"] = Path(shutil.copy(_nema("693_UNCR.dcm"), root / "ct_slice" / "ct.dcm"))
    # NaN / inf, absurd headers, units 1000x off
    nan = ct_array.copy()
    nan[5, 10:20, 10:20] = np.nan
    f["nan_ct"] = _save_like(nan, f["ct"], root / "nan_ct.nii.gz")
    inf = ct_array.copy()
    inf[5, 10:20, 10:20] = np.inf
    f["inf_ct"] = _save_like(inf, f["ct"], root / "inf_ct.nii.gz")
    f["absurd_spacing"] = _save_like(ct_array, f["ct"], root / "spacing.nii.gz", spacing=[1e3] * 3)
    ct = read_ct(f["ct"])
    density = ct.data * np.float32(0.8)
    inf_density = density.copy()
    inf_density[3, 3, 3] = np.inf
    write_volume(Volume(inf_density, ct.affine, "mg/cm3"), root / "inf_density.nrrd")
    f["inf_density"] = root / "inf_density.nrrd"
    write_volume(Volume(density * 1000, ct.affine, "mg/cm3"), root / "ug_density.nii.gz")
    f["ug_density"] = root / "ug_density.nii.gz"
    nan_labels = lab_array.astype(np.float32)
    nan_labels[0, 0, 0] = np.nan
    f["nan_labels"] = _save_like(nan_labels, f["labels"], root / "nan_labels.nii.gz")
    # mismatched label grids
    f["labels_shape"] = _save_like(lab_array[:, :, :-2], f["labels"], root / "lab_shape.nii.gz")
    f["labels_shift"] = _save_like(lab_array, f["labels"], root / "lab_shift.nii.gz", shift_mm=5)
    # calibrations and phantoms in the wrong unit
    cal = {"format": "xbmd-calibration", "method": "given", "intercept_mg_cm3": 0.0}
    put("cal.json", json.dumps({**cal, "slope_mg_cm3_per_hu": 0.8, "xbmd_version": "0.1.0"}))
    put("cal_g.json", json.dumps({**cal, "slope_mg_cm3_per_hu": 0.0008, "xbmd_version": "0.1.0"}))
    phantom = json.loads(f["phantom"].read_text())
    for rod in phantom["rods"]:
        rod["density_mg_cm3"] /= 1000
    put("phantom_g.json", json.dumps(phantom))
    # DICOM CT series with oddities pydicom can write
    oddities = {
        "dcm_slope_text": lambda ds, k: setattr(ds, "RescaleSlope", "7.77"),
        "dcm_slope_zero": lambda ds, k: setattr(ds, "RescaleSlope", 0),
        "dcm_short_pixels": lambda ds, k: (
            setattr(ds, "PixelData", ds.PixelData[:100]) if k == 2 else None
        ),
        "dcm_position_text": lambda ds, k: (
            setattr(ds, "ImagePositionPatient", [5.55] * 3) if k == 1 else None
        ),
        "dcm_orientation_zero": lambda ds, k: setattr(ds, "ImageOrientationPatient", [0] * 6),
        "dcm_missing_slice": lambda ds, k: setattr(
            ds, "ImagePositionPatient", [0.0, 0.0, 2.0 * k + (2.0 if k > 3 else 0.0)]
        ),
        "dcm_mr": lambda ds, k: setattr(ds, "Modality", "MR"),
    }
    for name, mutate in oddities.items():
        f[name] = _ct_series(root / name, mutate)
    f["dcm_truncated"] = _ct_series(root / "dcm_truncated")
    cut = f["dcm_truncated"] / "s003.dcm"
    cut.write_bytes(cut.read_bytes()[:1200])
    # radiographs with absurd headers
    f["xray_ww0"] = _spoil_xray(f["xray"], root / "ww0.dcm", WindowWidth=0, WindowCenter=100)
    f["xray_slope_text"] = _spoil_xray(f["xray"], root / "slope.dcm", RescaleSlope="7.77")
    f["xray_spacing50"] = _spoil_xray(f["xray"], root / "sp50.dcm", ImagerPixelSpacing=[50, 50])
    f["xray_spacing_neg"] = _spoil_xray(f["xray"], root / "spneg.dcm", ImagerPixelSpacing=[-1, -1])
    # manifests
    manifest = (tiny_cohort / "manifest.csv").read_text()
    manifest = manifest.replace("cases/", f"{tiny_cohort}/cases/")
    put("manifest_utf16.csv", manifest.encode("utf-16"))
    put("manifest_ragged.csv", manifest + "x,y,z,too,many,cells,here,and,here," * 3 + "\n")
    (root / "manifest_dir").mkdir()
    f["manifest_dir"] = root / "manifest_dir"
    # serve configurations
    put("token", "t" * 20)
    base = {"orthanc": {"url": "http://127.0.0.1:1"}, "worklist": {"token_file": "token"}}
    put("serve_state_under_file.yaml", yaml.safe_dump({**base, "state_dir": "afile/state"}))
    put("serve_worklist_list.yaml", yaml.safe_dump({**base, "worklist": ["port", 1]}))
    put("serve_port.yaml", yaml.safe_dump({**base, "worklist": {"token": "t" * 20, "port": 0}}))
    put("serve_latin1.yaml", "orthanc:\n  url: http://h\xe9\n".encode("latin-1"))
    put("serve_model.yaml", yaml.safe_dump({**base, "model": "folder"}))
    return f


# ------------------------------------------------------------------------------------------------
# The cases: (arguments, exit code, text the message must hold, optional regex of the problem)


def case(id_, args, code, names, must=None, marks=()):
    return pytest.param(args, code, names, must, id=id_, marks=marks)


CALIBRATE = [*"calibrate {ct} --phantom {phantom} --labels {labels}".split()]
CAL_OUT = ["--out", "{out}/cal.json"]
DRR = [*"drr {ct} --calibration {cal.json} --labels {labels} --label 4".split()]
DRR_OUT = ["--out", "{out}/d.npy"]
REGISTER = [*"register {ct} {xray} --labels {labels}".split()]
REG_OUT = ["--out", "{out}/poses.json"]
ESTIMATE_CMD = ["estimate", "--no-figures"]
QUICK = ["--stages", "1", "--max-steps", "1", "--no-progress"]
TRAIN_QUICK = ["--config", "{small.yaml}", *QUICK]
EVAL_QUICK = ["--robustness", "none", "--no-progress"]
RUN = ["--out", "{out}/run"]
REPORT = ["--out", "{out}/r", *EVAL_QUICK]
EVAL_PRED = ["evaluate", "--predictions"]
#: what the messages must say beyond the file's name (which may hold the same words)
EMPTY = r"is empty|\(0 bytes\)"
FOLDER = "is a folder"
NOT_AN_IMAGE = r"not (valid |an? )?(DICOM|image|NIfTI)|cannot be read|not a NIfTI"

CASES = [
    # ---- calibrate: the CT, its labels, the phantom, the output
    case("calibrate-empty-ct", ["calibrate", "{empty.nii.gz}", "--phantomless", *CAL_OUT], 1,
         "empty.nii.gz", EMPTY),
    case("calibrate-truncated-ct", ["calibrate", "{trunc.nii.gz}", "--phantomless", *CAL_OUT], 1,
         "trunc.nii.gz", "truncated"),
    case("calibrate-text-as-nifti", ["calibrate", "{text.nii.gz}", "--phantomless", *CAL_OUT], 1,
         "text.nii.gz", NOT_AN_IMAGE),
    case("calibrate-png-as-nifti", ["calibrate", "{png_as.nii.gz}", "--phantomless", *CAL_OUT], 1,
         "png_as.nii.gz", NOT_AN_IMAGE),
    case("calibrate-chest-cr-as-ct", ["calibrate", "{nema_chest}", "--phantomless", *CAL_OUT], 1,
         "RG1_UNCR", "CR series, not CT"),
    case("calibrate-mr-series", ["calibrate", "{dcm_mr}", "--phantomless", *CAL_OUT], 1,
         "dcm_mr", "MR series, not CT"),
    case("calibrate-absurd-spacing", ["calibrate", "{absurd_spacing}", "--phantomless", *CAL_OUT],
         1, "spacing.nii.gz", "voxel spacing"),
    case("calibrate-nan-ct", ["calibrate", "{nan_ct}", "--phantom", "{phantom}", "--labels",
                              "{labels}", *CAL_OUT], 1, "nan_ct", "NaN"),
    case("calibrate-inf-ct", ["calibrate", "{inf_ct}", "--phantomless", *CAL_OUT], 1, "inf_ct",
         "infinite"),
    case("calibrate-labels-shape", ["calibrate", "{ct}", "--phantom", "{phantom}", "--labels",
                                    "{labels_shape}", *CAL_OUT], 1, "lab_shape", "grid shape"),
    case("calibrate-labels-shifted", ["calibrate", "{ct}", "--phantom", "{phantom}", "--labels",
                                      "{labels_shift}", *CAL_OUT], 1, "lab_shift", "affine"),
    case("calibrate-labels-nan", ["calibrate", "{ct}", "--phantom", "{phantom}", "--labels",
                                  "{nan_labels}", *CAL_OUT], 1, "nan_labels", "NaN"),
    case("calibrate-ct-folder-without-dicom", ["calibrate", "{folder}", "--phantomless",
                                               *CAL_OUT], 1, "folder", "no DICOM"),
    case("calibrate-phantom-g-cm3", ["calibrate", "{ct}", "--phantom", "{phantom_g.json}",
                                     "--labels", "{labels}", *CAL_OUT], 1, "phantom_g.json",
         "g/cm3"),
    case("calibrate-phantom-empty", ["calibrate", "{ct}", "--phantom", "{empty.json}",
                                     "--labels", "{labels}", *CAL_OUT], 1, "empty.json"),
    case("calibrate-dicom-slope-text", ["calibrate", "{dcm_slope_text}", "--phantomless",
                                        *CAL_OUT], 1, "s000.dcm", "RescaleSlope 'abc'"),
    case("calibrate-dicom-slope-zero", ["calibrate", "{dcm_slope_zero}", "--phantomless",
                                        *CAL_OUT], 1, "s000.dcm", "RescaleSlope is 0"),
    case("calibrate-dicom-short-pixels", ["calibrate", "{dcm_short_pixels}", "--phantomless",
                                          *CAL_OUT], 1, "s002.dcm", "pixel data"),
    case("calibrate-dicom-truncated-slice", ["calibrate", "{dcm_truncated}", "--phantomless",
                                             *CAL_OUT], 1, "s003.dcm", "pixel data holds"),
    case("calibrate-dicom-position-text", ["calibrate", "{dcm_position_text}", "--phantomless",
                                           *CAL_OUT], 1, "s001.dcm", "ImagePositionPatient"),
    case("calibrate-dicom-orientation-zero", ["calibrate", "{dcm_orientation_zero}",
                                              "--phantomless", *CAL_OUT], 1, "s000.dcm",
         "ImageOrientationPatient"),
    case("calibrate-dicom-missing-slice", ["calibrate", "{dcm_missing_slice}", "--phantomless",
                                           *CAL_OUT], 1, "dcm_missing_slice", "missing slice"),
    case("calibrate-out-under-file", [*CALIBRATE, "--out", "{under_file}/cal.json"], 1, "afile"),
    case("calibrate-out-readonly", [*CALIBRATE, "--out", "{readonly}/x/cal.json"], 1,
         "readonly"),
    case("calibrate-out-is-folder", [*CALIBRATE, "--out", "{folder}"], 1, "folder", FOLDER),
    # ---- drr: the volume, labels, calibration, output
    case("drr-empty-volume", ["drr", "{empty.nii.gz}", "--calibration", "{cal.json}", *DRR_OUT],
         1, "empty.nii.gz", EMPTY),
    case("drr-truncated-volume", ["drr", "{trunc.nii.gz}", "--calibration", "{cal.json}",
                                  *DRR_OUT], 1, "trunc.nii.gz", "truncated"),
    case("drr-text-as-volume", ["drr", "{text.nii.gz}", "--calibration", "{cal.json}", *DRR_OUT],
         1, "text.nii.gz", NOT_AN_IMAGE),
    case("drr-leg-cr-as-ct", ["drr", "{nema_leg}", "--calibration", "{cal.json}", *DRR_OUT], 1,
         "RG3_UNCR", "CR series, not CT"),
    case("drr-absurd-spacing", ["drr", "{absurd_spacing}", "--calibration", "{cal.json}",
                                *DRR_OUT], 1, "spacing.nii.gz", "voxel spacing"),
    case("drr-nan-ct", ["drr", "{nan_ct}", "--calibration", "{cal.json}", *DRR_OUT], 1, "nan_ct",
         "NaN"),
    case("drr-inf-density-nrrd", ["drr", "{inf_density}", "--input-unit", "mg_cm3", *DRR_OUT], 1,
         "inf_density", "infinite"),
    case("drr-density-1000x", ["drr", "{ug_density}", "--input-unit", "mg_cm3", *DRR_OUT], 1,
         "ug_density", "another unit"),
    case("drr-calibration-g-cm3", ["drr", "{ct}", "--calibration", "{cal_g.json}", *DRR_OUT], 1,
         "cal_g.json", "g/cm3"),
    case("drr-calibration-folder", ["drr", "{ct}", "--calibration", "{folder}", *DRR_OUT], 1,
         "folder", FOLDER),
    case("drr-calibration-empty", ["drr", "{ct}", "--calibration", "{empty.json}", *DRR_OUT], 1,
         "empty.json"),
    case("drr-labels-shape", ["drr", "{ct}", "--calibration", "{cal.json}", "--labels",
                              "{labels_shape}", "--label", "4", *DRR_OUT], 1, "lab_shape",
         "grid shape"),
    case("drr-labels-shifted", ["drr", "{ct}", "--calibration", "{cal.json}", "--labels",
                                "{labels_shift}", "--label", "4", *DRR_OUT], 1, "lab_shift",
         "affine"),
    case("drr-volume-folder", ["drr", "{folder}", "--calibration", "{cal.json}", *DRR_OUT], 1,
         "folder", "no DICOM"),
    case("drr-dicom-slope-text", ["drr", "{dcm_slope_text}", "--calibration", "{cal.json}",
                                  *DRR_OUT], 1, "s000.dcm", "RescaleSlope"),
    case("drr-out-under-file", [*DRR, "--out", "{under_file}/d.npy"], 1, "afile"),
    case("drr-out-readonly", [*DRR, "--out", "{readonly}/x/d.npy"], 1, "readonly"),
    case("drr-out-is-folder", [*DRR, "--out", "{folder.npy}"], 1, "folder.npy", FOLDER),
    # ---- register: everything fails before the registration itself runs
    case("register-empty-xray", ["register", "{ct}", "{empty.dcm}", "--labels", "{labels}",
                                 *REG_OUT], 1, "empty.dcm", EMPTY),
    case("register-text-as-dicom", ["register", "{ct}", "{text.dcm}", "--labels", "{labels}",
                                    *REG_OUT], 1, "text.dcm", NOT_AN_IMAGE),
    case("register-truncated-xray", ["register", "{ct}", "{trunc.dcm}", "--labels", "{labels}",
                                     *REG_OUT], 1, "trunc.dcm", "pixel data"),
    case("register-chest-cr", ["register", "{ct}", "{nema_chest}", "--labels", "{labels}",
                               *REG_OUT], 1, "RG1_UNCR"),
    case("register-ct-slice-as-xray", ["register", "{ct}", "{ct_slice}", "--labels", "{labels}",
                                       *REG_OUT], 1, "ct.dcm", "CT"),
    case("register-xray-folder", ["register", "{ct}", "{folder}", "--labels", "{labels}",
                                  *REG_OUT], 1, "folder", FOLDER),
    case("register-xray-window-width-0", ["register", "{ct}", "{xray_ww0}", "--labels",
                                          "{labels}", *REG_OUT], 1, "ww0.dcm"),
    case("register-xray-slope-text", ["register", "{ct}", "{xray_slope_text}", "--labels",
                                      "{labels}", *REG_OUT], 1, "slope.dcm"),
    case("register-xray-negative-spacing", ["register", "{ct}", "{xray_spacing_neg}",
                                            "--labels", "{labels}", *REG_OUT], 1, "spneg.dcm",
         "spacing"),
    case("register-nan-ct", ["register", "{nan_ct}", "{xray}", "--labels", "{labels}", *REG_OUT],
         1, "nan_ct", "NaN"),
    case("register-labels-shape", ["register", "{ct}", "{xray}", "--labels", "{labels_shape}",
                                   *REG_OUT], 1, "lab_shape", "grid shape"),
    case("register-calibration-g-cm3", [*REGISTER, "--calibration", "{cal_g.json}", *REG_OUT], 1,
         "cal_g.json", "g/cm3"),
    case("register-landmarks-folder", [*REGISTER, "--landmarks", "{folder}", *REG_OUT], 1,
         "folder"),
    case("register-landmarks-text", [*REGISTER, "--landmarks", "{text.nii.gz}", *REG_OUT], 1,
         "text.nii.gz"),
    case("register-init-empty", [*REGISTER, "--init", "{empty.json}", *REG_OUT], 1,
         "empty.json"),
    case("register-out-under-file", [*REGISTER, "--out", "{under_file}/p.json"], 1, "afile"),
    case("register-out-readonly", [*REGISTER, "--out", "{readonly}/x/p.json"], 1, "readonly"),
    # ---- prepare: the manifest and the output folder (the cases inside: the batch test)
    case("prepare-manifest-empty", ["prepare", "{empty.csv}", "--out", "{out}/ds"], 1,
         "empty.csv"),
    case("prepare-manifest-folder", ["prepare", "{manifest_dir}", "--out", "{out}/ds"], 1,
         "manifest_dir", FOLDER),
    case("prepare-manifest-utf16", ["prepare", "{manifest_utf16.csv}", "--out", "{out}/ds"], 1,
         "manifest_utf16.csv", "UTF-8"),
    case("prepare-manifest-ragged", ["prepare", "{manifest_ragged.csv}", "--out", "{out}/ds"], 1,
         "manifest_ragged.csv", "cells"),
    case("prepare-manifest-binary", ["prepare", "{random.dcm}", "--out", "{out}/ds"], 1,
         "random.dcm"),
    case("prepare-out-under-file", ["prepare", "{manifest}", "--out", "{under_file}/ds"], 1,
         "afile"),
    case("prepare-out-readonly", ["prepare", "{manifest}", "--out", "{readonly}/ds"], 1,
         "readonly"),
    # ---- train: the dataset and the run folder (a batch of good and bad samples: below); every
    # case with the small config and one step, so that one that failed to fail stays short
    case("train-dataset-is-a-file", ["train", "{afile}", *RUN, *TRAIN_QUICK], 1, "afile"),
    case("train-dataset-without-index", ["train", "{folder}", *RUN, *TRAIN_QUICK], 1,
         "index.csv"),
    case("train-all-samples-corrupt", ["train", "{dataset_all_bad}", *RUN, *TRAIN_QUICK], 1,
         "dataset_all_bad", "none of the"),
    case("train-index-not-utf8", ["train", "{dataset_latin1}", *RUN, *TRAIN_QUICK], 1,
         "index.csv"),
    case("train-index-ragged", ["train", "{dataset_ragged}", *RUN, *TRAIN_QUICK], 1,
         "index.csv", "number of cells"),
    case("train-config-empty", ["train", "{dataset}", *RUN, *QUICK, "--config", "{empty.yaml}"],
         1, "empty.yaml", EMPTY),
    case("train-config-folder", ["train", "{dataset}", *RUN, *QUICK, "--config", "{folder}"], 1,
         "folder", FOLDER),
    case("train-config-binary", ["train", "{dataset}", *RUN, *QUICK, "--config", "{random.dcm}"],
         1, "random.dcm", "UTF-8"),
    case("train-out-under-file", ["train", "{dataset}", "--out", "{under_file}/run",
                                  *TRAIN_QUICK], 1, "afile"),
    case("train-out-readonly", ["train", "{dataset}", "--out", "{readonly}/run", *TRAIN_QUICK],
         1, "readonly"),
    # ---- evaluate with a model: the dataset and the report folder (batch: below)
    case("evaluate-dataset-is-a-file", ["evaluate", "--dataset", "{afile}", *REPORT], 1,
         "afile"),
    case("evaluate-dataset-without-index", ["evaluate", "--dataset", "{folder}", *REPORT], 1,
         "index.csv"),
    case("evaluate-all-samples-corrupt", ["evaluate", "--dataset", "{dataset_all_bad}",
                                          *REPORT], 1, "dataset_all_bad", "none of the"),
    case("evaluate-model-empty", ["evaluate", "--dataset", "{dataset}", "--model",
                                  "{empty.dcm}", *REPORT], 1, "empty.dcm"),
    case("evaluate-out-under-file", ["evaluate", "--dataset", "{dataset}", "--out",
                                     "{under_file}/r", *EVAL_QUICK], 1, "afile"),
    case("evaluate-out-readonly", ["evaluate", "--dataset", "{dataset}", "--out",
                                   "{readonly}/r", *EVAL_QUICK], 1, "readonly"),
    # ---- evaluate with a predictions CSV
    case("predictions-empty", [*EVAL_PRED, "{empty.csv}", "--out", "{out}/r"], 1, "empty.csv",
         EMPTY),
    case("predictions-folder", [*EVAL_PRED, "{folder}", "--out", "{out}/r"], 1, "folder",
         FOLDER),
    case("predictions-latin1", [*EVAL_PRED, "{pred_latin1.csv}", "--out", "{out}/r"], 1,
         "pred_latin1.csv", "UTF-8"),
    case("predictions-utf16", [*EVAL_PRED, "{pred_utf16.csv}", "--out", "{out}/r"], 1,
         "pred_utf16.csv", "UTF-16"),
    case("predictions-ragged", [*EVAL_PRED, "{pred_ragged.csv}", "--out", "{out}/r"], 1,
         "pred_ragged.csv", "line 10"),
    case("predictions-all-text", [*EVAL_PRED, "{pred_text.csv}", "--out", "{out}/r"], 1,
         "pred_text.csv", "not numbers"),
    case("predictions-all-nan", [*EVAL_PRED, "{pred_nan.csv}", "--out", "{out}/r"], 1,
         "pred_nan.csv", "at least 3"),
    case("predictions-empty-patient-ids", [*EVAL_PRED, "{pred_no_ids.csv}", "--out", "{out}/r"],
         1, "pred_no_ids.csv", "patient_id is empty"),
    case("predictions-one-row", [*EVAL_PRED, "{pred_one.csv}", "--out", "{out}/r"], 1,
         "pred_one.csv", "at least 3"),
    case("predictions-mixed-decimals", [*EVAL_PRED, "{pred_mixed.csv}", "--out", "{out}/r"], 1,
         "pred_mixed.csv", "mixes decimal commas"),
    case("predictions-no-columns", [*EVAL_PRED, "{cal.json}", "--out", "{out}/r"], 1, "cal.json",
         "patient_id"),
    case("predictions-out-under-file", [*EVAL_PRED, "{pred_good.csv}", "--out",
                                        "{under_file}/r"], 1, "afile"),
    # ---- landmarks, synth, demo-ct, serve
    case("landmarks-empty-labels", ["landmarks", "{empty.nii.gz}", "--out", "{out}/lm.json"], 1,
         "empty.nii.gz", EMPTY),
    case("landmarks-nan-labels", ["landmarks", "{nan_labels}", "--out", "{out}/lm.json"], 1,
         "nan_labels", "NaN"),
    case("landmarks-text-labels", ["landmarks", "{text.nii.gz}", "--out", "{out}/lm.json"], 1,
         "text.nii.gz"),
    case("landmarks-out-under-file", ["landmarks", "{labels}", "--out", "{under_file}/lm.json"],
         1, "afile"),
    case("landmarks-out-is-folder", ["landmarks", "{labels}", "--out", "{folder}"], 1, "folder"),
    case("landmarks-qc-under-file", ["landmarks", "{labels}", "--out", "{out}/lm.json", "--qc",
                                     "{under_file}"], 1, "afile"),
    case("landmarks-out-readonly", ["landmarks", "{labels}", "--out", "{readonly}/lm.json"], 1,
         "readonly"),
    case("synth-out-under-file", ["synth", "--out", "{under_file}/c", "--cases", "1"], 1,
         "afile"),
    case("synth-out-readonly", ["synth", "--out", "{readonly}/c", "--cases", "1"], 1,
         "readonly"),
    case("demo-ct-out-under-file", ["demo-ct", "--out", "{under_file}/d"], 1, "afile"),
    case("demo-ct-out-readonly", ["demo-ct", "--out", "{readonly}/d"], 1, "readonly"),
    case("serve-config-folder", ["serve", "--config", "{folder}"], 1, "folder", FOLDER),
    case("serve-config-empty", ["serve", "--config", "{empty.yaml}"], 1, "empty.yaml"),
    case("serve-config-not-utf8", ["serve", "--config", "{serve_latin1.yaml}"], 1,
         "serve_latin1.yaml", "UTF-8"),
    case("serve-config-binary", ["serve", "--config", "{random.dcm}"], 1, "random.dcm"),
    case("serve-state-dir-under-file", ["serve", "--config", "{serve_state_under_file.yaml}"], 1,
         "afile", "state_dir"),
    case("serve-worklist-not-a-mapping", ["serve", "--config", "{serve_worklist_list.yaml}"], 1,
         "serve_worklist_list.yaml", "must be a mapping"),
    case("serve-port-0", ["serve", "--config", "{serve_port.yaml}"], 1, "serve_port.yaml",
         "not 1-65535"),
    case("serve-model-folder", ["serve", "--config", "{serve_model.yaml}"], 1, "folder",
         "model .* is not a file"),
    # ---- estimate, as a black box
    case("estimate-empty", [*ESTIMATE_CMD, "{empty.dcm}", "--out", "{out}/e"], 1, "empty.dcm",
         EMPTY),
    case("estimate-text-as-dicom", [*ESTIMATE_CMD, "{text.dcm}", "--out", "{out}/e"], 1,
         "text.dcm", NOT_AN_IMAGE),
    case("estimate-random-bytes", [*ESTIMATE_CMD, "{random.dcm}", "--out", "{out}/e"], 1,
         "random.dcm", NOT_AN_IMAGE),
    case("estimate-truncated", [*ESTIMATE_CMD, "{trunc.dcm}", "--out", "{out}/e"], 1,
         "trunc.dcm", "pixel data"),
    case("estimate-chest-cr", [*ESTIMATE_CMD, "{nema_chest}", "--out", "{out}/e"], 1,
         "RG1_UNCR"),
    case("estimate-leg-cr", [*ESTIMATE_CMD, "{nema_leg}", "--out", "{out}/e"], 1, "RG3_UNCR"),
    case("estimate-ct-slice", [*ESTIMATE_CMD, "{ct_slice}", "--out", "{out}/e"], 1, "ct.dcm",
         "CT"),
    case("estimate-folder-without-radiographs", [*ESTIMATE_CMD, "{folder}", "--out", "{out}/e"],
         1, "folder", None),
    case("estimate-window-width-0", [*ESTIMATE_CMD, "{xray_ww0}", "--out", "{out}/e"], 1,
         "ww0.dcm", None),
    case("estimate-rescale-slope-text", [*ESTIMATE_CMD, "{xray_slope_text}", "--out", "{out}/e"],
         1, "slope.dcm", None),
    case("estimate-spacing-50-mm", [*ESTIMATE_CMD, "{xray_spacing50}", "--out", "{out}/e"], 1,
         "sp50.dcm", "spacing"),
    case("estimate-png-spacing-50-mm", [*ESTIMATE_CMD, "{xray_png}", "--pixel-spacing", "50",
                                        "--out", "{out}/e"], 1, "xray_01.png", "spacing"),
    case("estimate-negative-spacing", [*ESTIMATE_CMD, "{xray_spacing_neg}", "--out", "{out}/e"],
         1, "spneg.dcm", "spacing"),
    case("estimate-model-folder", [*ESTIMATE_CMD, "{xray}", "--model", "{folder}", "--out",
                                   "{out}/e"], 1, "folder", FOLDER),
    case("estimate-out-under-file", [*ESTIMATE_CMD, "{xray}", "--out", "{under_file}/e"], 1,
         "afile"),
    case("estimate-out-readonly", [*ESTIMATE_CMD, "{xray}", "--out", "{readonly}/e"], 1,
         "readonly"),
]  # fmt: skip


@pytest.fixture(scope="module")
def more(files, tiny_cohort, tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """Datasets, predictions and a manifest made from the shared fixtures (copied, never
    changed)."""
    root = tmp_path_factory.mktemp("bad_datasets")
    f = dict(files)
    f["dataset"] = tiny_dataset
    f["manifest"] = tiny_cohort / "manifest.csv"
    (root / "small.yaml").write_text(yaml.safe_dump(SMALL))
    f["small.yaml"] = root / "small.yaml"
    rows = list(csv.DictReader((tiny_dataset / "index.csv").open(encoding="utf-8")))

    def dataset(name: str) -> Path:
        out = root / name
        shutil.copytree(tiny_dataset, out)
        f[name] = out
        return out

    bad = dataset("dataset_all_bad")
    for r in rows:
        (bad / r["file"]).write_bytes(b"")
    latin = dataset("dataset_latin1")
    index = latin / "index.csv"
    index.write_bytes(index.read_bytes().replace(b"VQ0001", b"VQ\xe9001"))
    ragged = dataset("dataset_ragged")
    with (ragged / "index.csv").open("a", encoding="utf-8") as fh:
        fh.write("only,three,cells\n")
    # predictions CSVs
    rng = np.random.default_rng(3)
    good = []
    for p in range(6):
        for side in ("left", "right"):
            ref = round(float(rng.uniform(0.55, 1.05)), 4)
            est = round(ref + float(rng.normal(0, 0.04)), 4)
            good.append([f"P{p}/{side}", f"P{p}", side, est, ref])
    header = ["sample_id", "patient_id", "side", "est_ct_abmd_g_cm2", "ref_ct_abmd_g_cm2"]

    def predictions(name, body, encoding="utf-8", delimiter=","):
        path = root / name
        with path.open("w", newline="", encoding=encoding) as fh:
            writer = csv.writer(fh, delimiter=delimiter)
            writer.writerow(header)
            writer.writerows(body)
        f[name] = path

    predictions("pred_good.csv", good)
    predictions("pred_latin1.csv", [[f"Pé{r[0]}", *r[1:]] for r in good], encoding="latin-1")
    predictions("pred_utf16.csv", good, encoding="utf-16")
    predictions("pred_ragged.csv", [*good[:8], good[8][:3], *good[9:]])
    predictions("pred_text.csv", [[*r[:3], "n/a", r[4]] for r in good])
    predictions("pred_nan.csv", [[*r[:3], "nan", "inf"] for r in good])
    predictions("pred_no_ids.csv", [[r[0], "", *r[2:]] for r in good])
    predictions("pred_one.csv", good[:1])
    predictions("pred_mixed.csv", [[*r[:3], str(r[3]).replace(".", ","), r[4]] for r in good])
    return f


@pytest.mark.parametrize(("args", "code", "names", "must"), CASES)
def test_bad_input_gives_one_clear_line(more, tmp_path, args, code, names, must):
    paths = {**{k: str(v) for k, v in more.items()}, "out": str(tmp_path)}
    argv = [re.sub(r"\{([^}]+)\}", lambda m: paths[m.group(1)], a) for a in args]
    result = invoke(argv)
    output = result.output
    assert result.exit_code == code, output
    assert names in output, output
    if must is not None:
        assert re.search(must, output), output
    if code == 1:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output  # one line that says what is wrong


# ------------------------------------------------------------------------------------------------
# Batches: the good items finish, the bad ones are listed


def test_prepare_batch_good_and_bad_cases(more, tiny_cohort, tmp_path):
    """One good case and five bad ones (NaN CT, labels on another grid, a PNG without pixel
    spacing, a truncated CT, a CT path that is an empty folder): exit 2, the good case's two
    samples written, each bad case in failures.csv naming its file."""
    rows = list(csv.DictReader((tiny_cohort / "manifest.csv").open(encoding="utf-8")))
    for r in rows:
        for col in ("ct", "labels", "phantom", "xrays", "landmarks", "known_poses"):
            if r[col]:
                r[col] = str(tiny_cohort / r[col])
    case2 = tiny_cohort / "cases" / "case_VQ0002"
    nan_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(case2 / "ct.nii.gz"))).astype(np.float32)
    nan_ct[4, 4:8, 4:8] = np.nan
    nan_path = _save_like(nan_ct, case2 / "ct.nii.gz", tmp_path / "nan_ct2.nii.gz")
    xrays = {}  # each case its own radiograph: a radiograph listed twice is refused
    for name, r in (("bad_trunc", rows[1]), ("bad_folder", rows[2])):
        xrays[name] = str(shutil.copy(r["xrays"], tmp_path / f"{name}.dcm"))
    bad = {
        "case_VQ0002": {"ct": str(nan_path)},
        "case_VQ0003": {"labels": str(more["labels_shape"])},
        "bad_png": {**rows[0], "case_id": "bad_png", "xrays": str(more["xray_png"])},
        "bad_trunc": {**rows[1], "case_id": "bad_trunc", "ct": str(more["trunc.nii.gz"]),
                      "xrays": xrays["bad_trunc"]},
        "bad_folder": {**rows[2], "case_id": "bad_folder", "ct": str(more["folder"]),
                       "xrays": xrays["bad_folder"]},
    }  # fmt: skip
    out_rows = [rows[0]]
    for r in rows[1:]:
        out_rows.append({**r, **bad[r["case_id"]]})
    out_rows += [bad["bad_png"], bad["bad_trunc"], bad["bad_folder"]]
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    result = invoke(["prepare", manifest, "--out", tmp_path / "ds", "--known-poses",
                     "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    index = list(csv.DictReader((tmp_path / "ds" / "index.csv").open(encoding="utf-8")))
    assert {r["case_id"] for r in index} == {"case_VQ0001"} and len(index) == 2
    failures = list(csv.DictReader((tmp_path / "ds" / "failures.csv").open(encoding="utf-8")))
    by_case = {f["case_id"]: f["error"] for f in failures}
    assert set(by_case) == {"case_VQ0002", "case_VQ0003", "bad_png", "bad_trunc", "bad_folder"}
    assert "nan_ct2.nii.gz" in by_case["case_VQ0002"] and "NaN" in by_case["case_VQ0002"]
    assert "lab_shape" in by_case["case_VQ0003"]
    assert "xray_01.png" in by_case["bad_png"] and "pixel spacing" in by_case["bad_png"]
    assert "trunc.nii.gz" in by_case["bad_trunc"]
    assert "folder" in by_case["bad_folder"]
    assert "--pixel-spacing" not in result.output + "".join(by_case.values())


def _spoil_samples(dataset: Path, rows: list[dict]) -> dict[str, str]:
    """Spoil three samples of ``dataset`` (a copy) three ways; {sample_id: how}."""
    spoiled = {}
    truncated, empty, nan = rows[0], rows[2], rows[4]
    path = dataset / truncated["file"]
    path.write_bytes(path.read_bytes()[:4000])
    spoiled[truncated["sample_id"]] = "unreadable sample"
    (dataset / empty["file"]).write_bytes(b"")
    spoiled[empty["sample_id"]] = "unreadable sample"
    path = dataset / nan["file"]
    arrays = dict(np.load(path))
    arrays["xray"] = np.full_like(arrays["xray"], np.nan)
    np.savez_compressed(path, **arrays)
    spoiled[nan["sample_id"]] = "NaN"
    return spoiled


def test_evaluate_dataset_batch_good_and_bad_samples(tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    rows = list(csv.DictReader((dataset / "index.csv").open(encoding="utf-8")))
    spoiled = _spoil_samples(dataset, rows)
    result = invoke(["evaluate", "--dataset", dataset, "--out", tmp_path / "report",
                     "--robustness", "none", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    for sample_id, what in spoiled.items():
        line = next(ln for ln in result.output.splitlines() if ln.startswith(f"FAILED {sample_id}"))
        assert what in line and Path(rows[0]["file"]).suffix in line
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["counts"]["images"] == len(rows) - len(spoiled)
    assert len(metrics["failures"]) == len(spoiled)


def test_train_batch_good_and_bad_samples(tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    rows = list(csv.DictReader((dataset / "index.csv").open(encoding="utf-8")))
    spoiled = _spoil_samples(dataset, rows)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    result = invoke(["train", dataset, "--out", tmp_path / "run", "--config", config,
                     "--stages", "1", "--max-steps", "1", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    for sample_id in spoiled:
        assert f"SKIPPED {sample_id}" in result.output
    assert (tmp_path / "run" / "stage1" / "final.pt").is_file()
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert {s["sample_id"] for s in summary["skipped_samples"]} == set(spoiled)
    assert summary["split"]["train_samples"] + summary["split"]["validation_samples"] == 3


def test_evaluate_predictions_batch_lists_the_unusable_cells(more, tmp_path):
    rows = list(csv.reader(more["pred_good.csv"].open(encoding="utf-8")))
    rows[3][3], rows[5][4], rows[7][3] = "abc", "NaN", ""  # text, NaN, missing
    path = tmp_path / "pred.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    result = invoke(["evaluate", "--predictions", path, "--out", tmp_path / "r"])
    assert result.exit_code == 2, result.output
    assert "line 4: est_ct_abmd_g_cm2 'abc' is not a number" in result.output
    assert "line 6: ref_ct_abmd_g_cm2 'NaN' is not a finite number" in result.output
    assert "line 8" not in result.output  # an empty cell is missing, not a problem
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    image = next(a for a in metrics["agreement"] if a["level"] == "image")
    assert image["n"] == len(rows) - 1 - 3


def test_decimal_commas_are_read_as_decimal_points(more, tmp_path):
    """A European export (';' separators, decimal commas) gives the same figures as the file
    with points, and says how it was read."""
    rows = list(csv.reader(more["pred_good.csv"].open(encoding="utf-8")))
    path = tmp_path / "pred_comma.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=";").writerows(
            [rows[0], *([*r[:3], *(v.replace(".", ",") for v in r[3:])] for r in rows[1:])]
        )
    comma = invoke(["evaluate", "--predictions", path, "--out", tmp_path / "c"])
    point = invoke(["evaluate", "--predictions", more["pred_good.csv"], "--out", tmp_path / "p"])
    assert comma.exit_code == 0 and point.exit_code == 0, comma.output
    assert "decimal commas read as decimal points" in comma.output
    a = json.loads((tmp_path / "c" / "metrics.json").read_text())["agreement"]
    b = json.loads((tmp_path / "p" / "metrics.json").read_text())["agreement"]
    assert a == b


def test_landmarks_batch_one_femur_missing(more, tmp_path):
    labels = sitk.ReadImage(str(more["labels"]))
    array = sitk.GetArrayFromImage(labels)
    array[array == 4] = 0  # no left femur
    path = _save_like(array, more["labels"], tmp_path / "no_left.nii.gz")
    result = invoke(["landmarks", path, "--out", tmp_path / "lm.json"])
    assert result.exit_code == 2, result.output
    assert "FAILED left femur" in result.output and "no_left.nii.gz" in result.output
    assert "right" in json.loads((tmp_path / "lm.json").read_text())["femur"]


def test_estimate_batch_good_and_bad_files(more, tmp_path):
    """Black box: explicit files, one good and two bad: the good one estimated, the bad ones in
    failures.csv, exit 2."""
    out = tmp_path / "e"
    result = invoke(["estimate", more["xray"], more["trunc.dcm"], more["ct_slice"], "--out", out,
                     "--no-figures"])  # fmt: skip
    assert result.exit_code == 2, result.output
    results = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert {Path(r["image"]).name for r in results} == {"xray_01.dcm"}
    failures = (out / "failures.csv").read_text(encoding="utf-8")
    assert "trunc.dcm" in failures and "ct.dcm" in failures
