"""`xbmd drr` and `xbmd --help` from the command line."""

import numpy as np
import pytest
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.calibration import Calibration
from xbmd.io.ct import write_volume
from xbmd.volume import Volume

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 40 mm water cube with a 10 mm bone cube (label 4) inside, in HU, and a calibration."""
    folder = tmp_path_factory.mktemp("drr")
    hu = np.full((24, 24, 24), -1000.0, np.float32)
    hu[2:22, 2:22, 2:22] = 0.0
    hu[9:14, 9:14, 9:14] = 1000.0  # with density = HU: 1000 mg/cm3, 5 voxels of 2 mm = 1 cm
    labels = np.zeros(hu.shape, np.uint8)
    labels[9:14, 9:14, 9:14] = 4
    ct = Volume.from_geometry(hu, (2.0, 2.0, 2.0), (-23, -23, -23), unit="HU", source="ct")
    write_volume(ct, folder / "ct.nii.gz")
    write_volume(ct.with_data(labels, unit="label"), folder / "labels.nii.gz")
    Calibration.given(1.0, 0.0).to_json(folder / "cal.json")
    return folder


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("calibrate", "drr", "demo"):
        assert command in result.output


def test_drr_bone_label_parallel_gives_one_g_cm2(files, tmp_path):
    out = tmp_path / "bone.npy"
    args = [
        "drr", str(files / "ct.nii.gz"), "--out", str(out),
        "--calibration", str(files / "cal.json"),
        "--labels", str(files / "labels.nii.gz"), "--label", "4", "--geometry", "parallel",
        "--size", "32", "32", "--pixel-spacing", "0.5",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    img = np.load(out)
    assert img.dtype == np.float32 and img.shape == (32, 32)
    assert img.max() == pytest.approx(1.0, rel=1e-3)  # 1 g/cm3 x 1 cm
    assert out.with_suffix(".png").exists()


def test_drr_attenuation_perspective_default_fills_detector(files, tmp_path):
    out = tmp_path / "mu.npy"
    result = runner.invoke(
        app, ["drr", str(files / "ct.nii.gz"), "--out", str(out), "--quantity", "attenuation"]
    )
    assert result.exit_code == 0, result.output
    img = np.load(out)
    assert img.shape == (256, 256)
    assert (img > 0).mean() > 0.2  # the object covers a good part of the detector


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs a calibration"),
        (["--calibration", "CAL", "--labels", "LAB", "--label", "9"], "[9] not found"),
        (["--calibration", "CAL", "--label", "4"], "--label needs --labels"),
    ],
)
def test_drr_errors_are_one_line_and_exit_1(files, tmp_path, extra, message):
    extra = [
        str(files / "cal.json") if a == "CAL" else str(files / "labels.nii.gz") if a == "LAB" else a
        for a in extra
    ]
    args = ["drr", str(files / "ct.nii.gz"), "--out", str(tmp_path / "x.npy"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_drr_refuses_a_missing_file(tmp_path):
    result = runner.invoke(
        app, ["drr", str(tmp_path / "nope.nii"), "--out", str(tmp_path / "o.npy")]
    )
    assert result.exit_code == 1
    assert "nope.nii" in result.output
