"""A new user's first hour (issue 13): what the README promises works as written."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from xbmd import __version__
from xbmd.cli import app
from xbmd.ct.calibration import Calibration
from xbmd.ct.phantoms import LABELS, hip_test_ct
from xbmd.io.ct import write_volume

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_ct(tmp_path_factory):
    """What `xbmd demo-ct` leaves (a CT, its labels, its calibration), at a quarter of its voxels:
    the same physical size, so the femurs sit where the demo's do."""
    root = tmp_path_factory.mktemp("first_hour")
    folder = root / "demo_ct"
    folder.mkdir()
    test = hip_test_ct(shape=(70, 160, 160), spacing_mm=(2.5, 2.5, 4.0), seed=1)
    write_volume(test.ct, folder / "ct.nii.gz")
    write_volume(test.labels, folder / "labels.nii.gz")
    line = Calibration.given(1 / test.hu_per_mg_cm3, -test.water_hu / test.hu_per_mg_cm3)
    line.to_json(folder / "calibration.json")
    return root


def test_version_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"xbmd {__version__}"


def _readme_drr_command() -> list[str]:
    block = re.search(r"Example, after `xbmd demo-ct`.*?```\n(.*?)```", README, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == [".venv/bin/xbmd", "drr"], words
    return words[1:]


def test_readme_drr_example_renders_the_whole_left_femur(demo_ct, monkeypatch):
    monkeypatch.chdir(demo_ct)
    args = _readme_drr_command()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    image = np.load(demo_ct / args[args.index("--out") + 1])
    assert (image > 0.05).mean() > 0.05  # bone over a good part of the field (measured 0.18)
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert np.abs(edges).max() == 0, "the femur is cut by the field's edge"
    assert "warning" not in result.output


def test_the_old_readme_drr_example_is_refused_not_an_empty_image(demo_ct, monkeypatch):
    """The example before issue 13: the left femur outside a field centred on the volume."""
    monkeypatch.chdir(demo_ct)
    result = runner.invoke(app, [
        "drr", "demo_ct/ct.nii.gz", "--calibration", "demo_ct/calibration.json",
        "--labels", "demo_ct/labels.nii.gz", "--label", "4", "--geometry", "parallel",
        "--pixel-spacing", "0.5", "--out", "old.npy",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "the DRR is empty" in result.output and "--center-label" in result.output
    assert not (demo_ct / "old.npy").exists()


def test_readme_library_example_centres_the_femur(demo_ct, monkeypatch):
    block = re.search(r"## Library use\s*```python\n(.*?)```", README, re.S).group(1)
    folder = demo_ct / "demo_ct"
    monkeypatch.chdir(folder)
    (folder / "cal.json").write_text((folder / "calibration.json").read_text())
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # the README's own code, as written
    image = namespace["drr_g_cm2"][0].numpy()
    assert namespace["femur"] is not None and LABELS["femur_left"] == 4
    # measured: 23 % of the pixels hold bone (the pre-issue example: 3 %, an edge of the head)
    assert (image > 0.05).mean() > 0.15
    assert image.max() > 1.0  # g/cm2 through the femur (measured 2.0; pre-issue 0.7)


def test_demo_ct_and_make_demo_write_to_different_folders():
    help_text = runner.invoke(app, ["demo-ct", "--help"]).output
    assert "demo_ct/" in help_text and "make demo" in help_text
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    demo_target = re.search(r"^demo: .*?(?=^\S)", make, re.S | re.M).group(0)
    assert "xbmd estimate" in demo_target and "--out demo_out" in demo_target
    assert "demo-ct" in README and "xbmd demo " not in README and "xbmd demo\n" not in README


def test_docs_never_point_into_the_team_folder():
    texts = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    texts += sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "src").rglob("*.json"))
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for needle in ("../shared", "shared/docs", "method-notes", "method notes"):
            assert needle not in text, f"{path.relative_to(ROOT)} mentions {needle!r}"
    assert (ROOT / "docs" / "method.md").is_file()


def test_landmarks_are_optional_in_every_manifest_table():
    table = (ROOT / "docs" / "data-format.md").read_text(encoding="utf-8")
    row = next(line for line in table.splitlines() if line.startswith("| `landmarks`"))
    assert "`landmarks`*" not in row and "found from the femur labels" in row
    from xbmd.dataset.manifest import REQUIRED

    assert "landmarks" not in REQUIRED


def test_report_shows_no_absolute_path_of_the_machine(tmp_path, monkeypatch):
    """Predictions outside the working folder: the report names the file, not its path."""
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    predictions = elsewhere / "predictions.csv"
    rng = np.random.default_rng(0)
    with predictions.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "side", "est_ct_abmd_g_cm2", "ref_ct_abmd_g_cm2"])
        for p in range(8):
            ref = float(rng.uniform(0.6, 1.0))
            writer.writerow([f"P{p}", "left", round(ref + rng.normal(0, 0.03), 4), round(ref, 4)])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["evaluate", "--predictions", str(predictions), "--out", "r"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((work / "r" / "metrics.json").read_text())
    assert metrics["source"]["predictions_csv"] == "predictions.csv"
    for name in ("report.html", "metrics.json"):
        assert str(tmp_path) not in (work / "r" / name).read_text(encoding="utf-8")


def test_training_shows_no_lightning_advertising_and_warns_of_one_patient(tiny_dataset, tmp_path):
    """A real `xbmd train` process (Lightning's tips and warnings go to its own stderr) on a
    dataset of one patient: no tips, no deprecation warnings, a warning that there is no
    validation set."""
    dataset = tmp_path / "one_patient"
    rows = list(csv.DictReader((tiny_dataset / "index.csv").open(encoding="utf-8")))
    first = rows[0]["patient_id"]
    (dataset).mkdir()
    for name in ("samples", "radiographs"):
        os.symlink(tiny_dataset / name, dataset / name)
    with (dataset / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["patient_id"] == first)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "image_size": 64, "batch_size": 2, "generator": {"channels": [8, 16, 32]},
        "discriminator": {"scales": 2, "layers": 2, "channels": 8},
    }))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "xbmd.cli", "train", str(dataset), "--out", str(tmp_path / "run"),
         "--config", str(config), "--stages", "1", "--max-steps", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for noise in ("Tip:", "litlogger", "litmodels", "LeafSpec", "Warning", "exists and is not"):
        assert noise not in output, output
    assert f"one patient ({first}): no validation set" in output
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["split"]["validation_samples"] == 0
