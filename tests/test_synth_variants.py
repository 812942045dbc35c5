"""`xbmd synth`'s options beyond the default cohort: sessions, implants, device families, random
processing; and the default cohort unchanged by them. Tiny, coarse cohorts (3 mm CT)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.dataset.manifest import read_manifest
from xbmd.errors import InputError
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray
from xbmd.synth import device as dv
from xbmd.synth.cohort import SynthSettings, generate_cohort
from xbmd.synth.implants import IMPLANT_LABEL
from xbmd.synth.processing_graph import randomise_device, sample_graph
from xbmd.synth.radiograph import expose

#: Coarse enough for seconds per case; the same code paths as the 1 mm default.
TINY = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0.0)
#: Seed 11's first three patients get, with --implant-fraction 1: VQ0001 a hip replacement on
#: the left, VQ0002 a nail on the left, VQ0003 screws on the right.
EXPECTED_IMPLANTS = {
    "case_VQ0001": ("left", "hip_replacement"),
    "case_VQ0002": ("left", "nail"),
    "case_VQ0003": ("right", "screws"),
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    generate_cohort(out, cases=3, seed=11, settings=TINY, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def implanted(tmp_path_factory):
    out = tmp_path_factory.mktemp("implanted")
    settings = replace(TINY, implant_fraction=1.0)
    generate_cohort(out, cases=3, seed=11, settings=settings, workers=1, progress=False)
    return out


# ---- the default cohort is what it was --------------------------------------------------------

#: Fingerprints of this cohort (TINY, 3 cases, seed 11) as made by the code before sessions,
#: implants, families and random processing existed (the radiographs since the quantum noise
#: draws from a child generator). Sums rather than hashes, with tolerances measured across CPU
#: code paths (ATEN_CPU_CAPABILITY default vs avx512): CT sums differ by 3e-9 of their size
#: (tolerance 1e-6), radiograph sums by up to 9e-4 (the noise realisation may differ; tolerance
#: 1e-2), label counts and the BMD truth not at all (tolerances 1e-3 and 1e-6). A changed draw
#: (another pose, device or shape) moves them by far more.
DEFAULT_FINGERPRINT = {
    "case_VQ0001": {
        "ct": (-782455050, 800934386958),
        "labels": [1784168, 16576, 16739, 8711, 8678, 2184, 2184, 2184, 2184, 2184],
        "xray_01.png": (30169361, 22015610293),
        "ct_abmd_g_cm2": {"left": 0.739518, "right": 0.73715},
    },
    "case_VQ0002": {
        "ct": (-612187500, 625368624874),
        "labels": [1435638, 11299, 11350, 6225, 6592, 2016, 2016, 2016, 2016, 2016],
        "xray_01.png": (2048302778, 95905443098288),
        "ct_abmd_g_cm2": {"left": 0.834217, "right": 0.908566},
    },
    "case_VQ0003": {
        "ct": (-937336915, 923390313641),
        "labels": [2138285, 13825, 13945, 6634, 6411, 2100, 2100, 2100, 2100, 2100],
        "xray_01.png": (82238242, 167810913876),
        "ct_abmd_g_cm2": {"left": 0.903763, "right": 0.943476},
    },
}


def fingerprint(case_dir: Path) -> dict:
    """Integer sums of a case's CT, label counts, radiograph sums and its BMD truth."""
    ct = np.asarray(nib.load(str(case_dir / "ct.nii.gz")).dataobj).astype(np.int64)
    labels = np.asarray(nib.load(str(case_dir / "labels.nii.gz")).dataobj)
    png = np.asarray(Image.open(case_dir / "xray_01.png")).astype(np.int64)
    truth = json.loads((case_dir / "truth.json").read_text())
    counts = np.bincount(labels.ravel())
    return {
        "ct": (int(ct.sum()), int((ct**2).sum())),
        "labels": [int(c) for c in counts[counts > 0]],
        "xray_01.png": (int(png.sum()), int((png**2).sum())),
        "ct_abmd_g_cm2": {s: truth["sides"][s]["ct_abmd_g_cm2"] for s in ("left", "right")},
    }


def test_the_default_cohort_is_unchanged(plain):
    for case, expected in DEFAULT_FINGERPRINT.items():
        got = fingerprint(plain / "cases" / case)
        assert got["labels"] == pytest.approx(expected["labels"], rel=1e-3), case
        assert got["ct_abmd_g_cm2"] == pytest.approx(expected["ct_abmd_g_cm2"], rel=1e-6), case
        assert got["ct"] == pytest.approx(expected["ct"], rel=1e-6), case
        assert got["xray_01.png"] == pytest.approx(expected["xray_01.png"], rel=1e-2), case
    # nothing new in the files either: no session keys, no implant marks, no new column
    truth = json.loads((plain / "cases/case_VQ0001/truth.json").read_text())
    assert "sessions" not in truth and "implant" not in truth
    assert "session" not in truth["xrays"][0] and "implant" not in truth["sides"]["left"]
    assert "processing_graph" not in truth["xrays"][0]["device"]
    header = (plain / "manifest.csv").read_text().splitlines()[0]
    assert "implants" not in header
    meta = json.loads((plain / "cohort.json").read_text())
    assert set(meta["settings"]) == {
        "ct_spacing_mm", "xray_spacing_mm", "poses", "phantomless_fraction", "dxa_precision"
    }  # fmt: skip


# ---- implants -------------------------------------------------------------------------------


def test_implant_patients_have_metal_labelled_and_marked(implanted):
    cases = {c.case_id: c for c in read_manifest(implanted / "manifest.csv")}
    assert "implants" in (implanted / "manifest.csv").read_text().splitlines()[0]
    dxa_rows = list(csv.DictReader((implanted / "dxa.csv").open()))
    for case_id, (side, kind) in EXPECTED_IMPLANTS.items():
        case_dir = implanted / "cases" / case_id
        truth = json.loads((case_dir / "truth.json").read_text())
        assert truth["implant"]["side"] == side and truth["implant"]["type"] == kind
        other = "right" if side == "left" else "left"
        assert truth["sides"][side]["implant"] == kind and truth["sides"][other]["implant"] is None
        assert truth["ct"]["label_map"]["implant"] == IMPLANT_LABEL
        assert cases[case_id].implants == {side: kind}  # the manifest round-trips
        # DXA is not measured through metal: only the other hip is in dxa.csv and the manifest
        assert [r["side"] for r in dxa_rows if r["case_id"] == case_id] == [other]
        assert not any(f"_{side}_" in k for k in cases[case_id].dxa_g_cm2)
        ct = read_ct(case_dir / "ct.nii.gz")
        metal = read_labels(case_dir / "labels.nii.gz", ct).data == IMPLANT_LABEL
        assert metal.sum() >= 5, case_id
        # metal at the top of the scanner's range (3071); measured: median 3071 for all three
        assert np.median(ct.data[metal]) >= 3000, case_id
        # on the implant's side: LPS x > 0 is the patient's left (the pelvis centre is x = 0)
        i = np.nonzero(metal)[2]
        x_mm = ct.affine[0, 0] * i.mean() + ct.affine[0, 3]
        assert (x_mm > 0) == (side == "left"), case_id


def test_implant_is_bright_metal_in_the_radiograph_and_nothing_else_changes(plain, implanted):
    """The same patient with and without the implant: same device, poses and geometry (the
    implant's draws have their own stream); the radiograph differs where the metal projects,
    near the implanted hip, and there it is brighter than bone."""
    for case_id, (side, _) in EXPECTED_IMPLANTS.items():
        truths = [
            json.loads((c / "cases" / case_id / "truth.json").read_text())
            for c in (plain, implanted)
        ]
        a, b = (t["xrays"][0] for t in truths)
        assert a["device"] == b["device"] and a["motions"] == b["motions"]
        assert a["geometry"] == b["geometry"]
        other = "right" if side == "left" else "left"
        # the other hip's truth: the metal's streaks may reach it; measured 0.01-0.08 % here
        assert truths[1]["sides"][other]["ct_abmd_g_cm2"] == pytest.approx(
            truths[0]["sides"][other]["ct_abmd_g_cm2"], rel=0.005
        )
        with_metal = read_xray(implanted / "cases" / case_id / "xray_01.dcm").pixels
        without = read_xray(plain / "cases" / case_id / "xray_01.dcm").pixels
        full = 2 ** a["device"]["bits_stored"] - 1
        brighter = (with_metal - without) > 0.15 * full
        assert brighter.sum() >= 10, case_id
        rows, cols = np.nonzero(brighter)
        head = np.asarray(a["projected_landmarks"][side]["head_center_px"])
        other_head = np.asarray(a["projected_landmarks"][other]["head_center_px"])
        dist = np.hypot(rows - head[0], cols - head[1])
        dist_other = np.hypot(rows - other_head[0], cols - other_head[1])
        assert np.median(dist) < np.median(dist_other), case_id
        # brighter than bone (the sound hip's femoral head), but for partial-volume edges of
        # these 1.6 mm pixels: measured, the upper quartile is 1.06-1.53 x the head's value
        r, c = np.rint(other_head).astype(int)
        bone = np.median(with_metal[r - 1 : r + 2, c - 1 : c + 2])
        assert np.percentile(with_metal[brighter], 75) > bone, case_id


# ---- sessions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    out = tmp_path_factory.mktemp("sessions")
    settings = replace(
        TINY, poses=2, sessions=2, device_families=("soft-dr", "phosphor-cr"), processing="mixed"
    )
    generate_cohort(out, cases=1, seed=5, settings=settings, workers=1, progress=False)
    return out


def test_sessions_share_device_and_study_and_differ_across(sessions):
    case_dir = next((sessions / "cases").iterdir())
    truth = json.loads((case_dir / "truth.json").read_text())
    records = truth["xrays"]
    assert [(r["session"], r["pose_in_session"]) for r in records] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    ds = [pydicom.dcmread(case_dir / r["dicom"]) for r in records]
    by_session = {1: [0, 1], 2: [2, 3]}
    for idx in by_session.values():
        a, b = (ds[i] for i in idx)
        assert a.StudyInstanceUID == b.StudyInstanceUID and a.StudyDate == b.StudyDate
        assert a.AccessionNumber == b.AccessionNumber and a.StudyID == b.StudyID
        assert float(a.KVP) == float(b.KVP) == records[idx[0]]["device"]["kvp"]
        # ... which a reader gets from the file
        meta = read_xray(case_dir / records[idx[0]]["dicom"]).meta
        assert meta["kvp"] == records[idx[0]]["device"]["kvp"]
        assert meta["manufacturer_model"] == records[idx[0]]["device"]["model"]
        assert meta["study_instance_uid"] == a.StudyInstanceUID
        assert a.ManufacturerModelName == b.ManufacturerModelName
        # the whole device, every setting (processing included), is the session's
        assert records[idx[0]]["device"] == records[idx[1]]["device"]
        # ... and only the pose differs (first a standard AP, then another)
        assert records[idx[0]]["motions"] != records[idx[1]]["motions"]
        assert [a.SeriesNumber, b.SeriesNumber] == [1, 2]
    assert ds[0].StudyInstanceUID != ds[2].StudyInstanceUID
    assert ds[0].StudyDate < ds[2].StudyDate
    assert records[0]["device"] != records[2]["device"]
    assert len({d.SeriesInstanceUID for d in ds}) == 4 and len({d.SOPInstanceUID for d in ds}) == 4
    assert [s["xrays"] for s in truth["sessions"]] == [
        ["xray_01", "xray_02"],
        ["xray_03", "xray_04"],
    ]
    assert {r["device"]["family"] for r in records} <= {"soft-dr", "phosphor-cr"}
    assert read_manifest(sessions / "manifest.csv")[0].xrays == [
        case_dir / r["dicom"] for r in records
    ]


def test_more_sessions_keep_the_first_ones(sessions, tmp_path):
    """Each session and radiograph draws from its own stream: a cohort with one session of one
    pose holds the first radiograph of the two-session cohort, pixel for pixel."""
    settings = replace(
        TINY, poses=1, sessions=1, device_families=("soft-dr", "phosphor-cr"), processing="mixed"
    )
    generate_cohort(tmp_path, cases=1, seed=5, settings=settings, workers=1, progress=False)
    small = json.loads((tmp_path / "cases/case_VQ0001/truth.json").read_text())["xrays"][0]
    big = json.loads((sessions / "cases/case_VQ0001/truth.json").read_text())["xrays"][0]
    assert small["device"] == big["device"] and small["motions"] == big["motions"]
    np.testing.assert_array_equal(
        read_xray(tmp_path / "cases/case_VQ0001/xray_01.dcm").pixels,
        read_xray(sessions / "cases/case_VQ0001/xray_01.dcm").pixels,
    )


def test_device_families_are_honoured():
    rng = np.random.default_rng(0)
    allowed = ("crisp-dr", "mobile-nogrid")
    families = {dv.sample_device(rng, families=allowed).family for _ in range(40)}
    assert families == set(allowed)
    assert {dv.sample_device(rng, families=["soft-dr"]).family for _ in range(5)} == {"soft-dr"}
    with pytest.raises(InputError, match="device family must be one of"):
        dv.sample_device(rng, families=["film"])
    with pytest.raises(InputError, match="device family"):
        SynthSettings(device_families=("balanced-dr", "nope"))


def test_bad_options_are_refused_in_one_line(tmp_path):
    for args, message in (
        (["--device-families", "balanced-dr,film"], "device family must be one of"),
        (["--processing", "wild"], "processing must be one of"),
    ):
        result = CliRunner().invoke(
            app, ["synth", "--out", str(tmp_path / "c"), "--cases", "1", *args]
        )
        assert result.exit_code == 1, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1


# ---- randomised processing ------------------------------------------------------------------


def _pelvis_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """22 cm of water-like tissue thinning to the flanks, air beyond 160 mm, two femoral heads;
    1.2 mm pixels (as tests/test_synth_radiograph.py)."""
    rows, cols, spacing = 240, 320, 1.2
    y = (np.arange(rows) - rows / 2)[:, None] * spacing
    x = (np.arange(cols) - cols / 2)[None, :] * spacing
    thick_cm = 22.0 * np.sqrt(np.clip(1 - (x / 160.0) ** 2, 0, None)) * (1 + 0.1 * (y < 0))
    li = 0.21 * np.broadcast_to(thick_cm, (rows, cols))
    for cx in (-85.0, 85.0):
        r = np.hypot(x - cx, y - 10.0)
        li = li + 0.5 * np.sqrt(np.clip(1 - (r / 24.0) ** 2, 0, None))
    return li.astype(np.float32), x, y


def test_random_processing_graphs_make_valid_images_unlike_the_families():
    li, x, y = _pelvis_scene()
    r = np.hypot(x + 85.0, y - 10.0)
    head, beside = r < 12, (r > 32) & (r < 42)
    contrasts, kinds = [], set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        device = randomise_device(dv.sample_device(rng), np.random.default_rng([seed, 1]))
        graph = device.processing_graph
        assert json.loads(json.dumps(device.to_dict()))["processing_graph"] == graph
        pixels, info = expose(li, pixel_spacing_mm=1.2, device=device, rng=rng)
        assert pixels.dtype == np.uint16 and pixels.max() <= 2**device.bits_stored - 1
        value = pixels / (2**device.bits_stored - 1)
        assert np.ptp(value) > 0.3  # an image, not a flat field
        assert value[head].mean() > value[beside].mean()  # bone brighter than beside it
        contrasts.append(value[head].mean() - value[beside].mean())
        kinds.add((graph["response"]["kind"], graph["lut"]["shape"]))
        assert info["processing"]["graph"] is True
    # varied: several responses and tone curves, contrasts spread widely
    assert len(kinds) >= 5 and max(contrasts) > 3 * min(contrasts)
    # the same rng gives the same graph
    assert sample_graph(np.random.default_rng(3)) == sample_graph(np.random.default_rng(3))
