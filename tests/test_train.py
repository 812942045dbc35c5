"""Hierarchical learning: config, data, augmentation, losses, the stages, DDP, the bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from train_helpers import SMALL
from xbmd.cli import app
from xbmd.dataset.format import load_sample, read_index
from xbmd.errors import InputError
from xbmd.learn import config as cfg
from xbmd.learn.data import augment, patient_split
from xbmd.learn.losses import (
    MultiScaleDiscriminator,
    feature_matching_loss,
    gradient_correlation_loss,
)
from xbmd.model.bundle import load_bundle
from xbmd.model.inputs import model_input, region_bmd
from xbmd.model.networks import Generator, build_generator
from xbmd.synth.cohort import SynthSettings

TINY = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0.0)


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset


@pytest.fixture(scope="module")
def small_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


# ------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_overrides():
    c = cfg.resolve({"stages": {"2": {"epochs": 3}}})
    assert c["stages"]["2"]["epochs"] == 3
    assert c["stages"]["1"]["epochs"] == cfg.DEFAULTS["stages"]["1"]["epochs"]
    assert c["losses"] == {
        "gan": 1.0,
        "feature_matching": 10.0,
        "l1": 100.0,
        "gc": 1.0,
        "mask": 10.0,
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning_rate": 1}, "unknown config key 'learning_rate'"),
        ({"generator": {"backbone": "vgg"}}, "backbone"),
        ({"image_size": 100}, "image_size"),
        ({"ablation": "everything"}, "ablation"),
        ({"stages": {"3": {"targets": ["height"]}}}, "targets"),
    ],
)
def test_config_errors_are_clear(override, message):
    with pytest.raises(InputError, match=message):
        cfg.resolve(override)


def test_config_files_in_the_repository_are_valid():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/*.yaml missing"
    for path in configs:
        cfg.load_config(path)


def test_parse_stages():
    assert cfg.parse_stages("3, 1,loc") == ["1", "3", "loc"]
    with pytest.raises(InputError, match="--stages"):
        cfg.parse_stages("1,4")


# ------------------------------------------------------------------------------------------------
# Data


def test_patient_split_keeps_patients_apart_and_is_deterministic():
    patients = [f"P{i // 4}" for i in range(40)]  # 10 patients, 4 samples each
    train, val = patient_split(patients, 0.2, seed=3)
    assert sorted(train + val) == list(range(40))
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in val})
    assert len({patients[i] for i in val}) == 2
    assert patient_split(patients, 0.2, seed=3) == (train, val)
    assert patient_split(patients, 0.2, seed=4) != (train, val)


def test_model_input_is_normalised_masked_and_area_averaged():
    rng = np.random.default_rng(0)
    xray = rng.uniform(1000, 3000, (256, 256)).astype(np.float32)
    valid = np.ones((256, 256), bool)
    valid[:, :64] = False
    x = model_input(xray, valid, 128)
    assert x.shape == (2, 128, 128) and x.dtype == np.float32
    assert np.all(x[1, :, :32] == 0) and np.all(x[1, :, 32:] == 1)
    assert np.all(x[0, :, :32] == 0)
    inside = x[0, :, 32:]
    assert np.percentile(inside, 1) == pytest.approx(0, abs=1e-6)
    assert np.percentile(inside, 99) == pytest.approx(1, abs=1e-6)
    # exposure and offset do not change the input
    np.testing.assert_allclose(model_input(3 * xray + 50, valid, 128), x, atol=1e-5)
    with pytest.raises(InputError, match="256 x 256"):
        model_input(xray[:100], valid[:100], 128)


def test_augmentation_moves_input_and_targets_together():
    torch.manual_seed(0)
    img = torch.zeros(2, 64, 64)
    img[:, 20:30, 36:50] = 1.0  # an off-centre bar
    inputs = torch.stack([img, torch.ones(2, 64, 64)], dim=1)
    settings = dict(cfg.DEFAULTS["augment"])
    settings.update(exposure=0, gamma=0, noise=0, blur_sigma=0, jpeg_probability=0)
    settings.update(rotate_deg=20, scale=0.1, translate_px=5)
    out, (moved,) = augment(inputs, [img.clone()], settings, torch.Generator().manual_seed(1))
    assert not torch.allclose(moved, img)  # something happened
    # the target moved exactly as the input image did (normalisation aside)
    inside = out[:, 1] > 0
    np.testing.assert_allclose(
        (out[:, 0] > 0.5)[inside].numpy(), (moved > 0.5)[inside].numpy(), atol=0
    )
    # no geometric change: the target is untouched
    settings.update(rotate_deg=0, scale=0, translate_px=0)
    _, (same,) = augment(inputs, [img.clone()], settings)
    torch.testing.assert_close(same, img, atol=1e-5, rtol=0)


def test_augmentation_changes_intensity_but_keeps_the_normalisation():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.uniform(0, 1, (4, 64, 64)).astype(np.float32))
    inputs = torch.stack([img, torch.ones_like(img)], dim=1)
    settings = dict(cfg.DEFAULTS["augment"])
    settings.update(rotate_deg=0, scale=0, translate_px=0, jpeg_probability=1.0)
    out, _ = augment(inputs, [], settings, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[:, 0], inputs[:, 0], atol=1e-3)
    q = torch.quantile(out[0, 0].flatten(), torch.tensor([0.01, 0.99]))
    torch.testing.assert_close(q, torch.tensor([0.0, 1.0]), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------------
# Networks and losses


def test_generator_shapes_and_the_pluggable_backbone():
    x = torch.randn(2, 2, 64, 64)
    for g in (Generator("unet", (8, 16, 32), n_targets=2), Generator("resnet10", n_targets=2)):
        maps, targets = g(x)
        assert maps.shape == (2, 2, 64, 64) and targets.shape == (2, 2)
    with pytest.raises(InputError, match="unknown backbone"):
        Generator("vgg")


def test_discriminator_is_multiscale_with_features():
    d = MultiScaleDiscriminator(3, scales=3, layers=2, channels=8)
    out = d(torch.randn(1, 3, 64, 64))
    assert len(out) == 3
    assert out[0][-1].shape[-1] > out[1][-1].shape[-1] > out[2][-1].shape[-1]
    assert feature_matching_loss(out, out).item() == 0.0
    other = d(torch.randn(1, 3, 64, 64))
    assert feature_matching_loss(other, out).item() > 0


def test_gradient_correlation_loss():
    a = torch.rand(3, 32, 32)
    assert gradient_correlation_loss(a, 2 * a + 1).item() == pytest.approx(0, abs=1e-5)
    assert gradient_correlation_loss(a, -a).item() == pytest.approx(2, abs=1e-5)
    assert gradient_correlation_loss(a, torch.rand(3, 32, 32)).item() == pytest.approx(1, abs=0.2)


def test_region_bmd():
    drr = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    region = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    out = region_bmd(drr, region)
    assert out[0].item() == pytest.approx(1.5) and torch.isnan(out[1])


# ------------------------------------------------------------------------------------------------
# Training: the stages, resuming, the bundle


def test_train_stages_write_checkpoints_and_a_bundle(dataset, small_config_file, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(dataset), "--out", str(run), "--config", str(small_config_file)]
    result = CliRunner().invoke(
        app, [*args, "--stages", "1,2,3", "--max-steps", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    for stage in ("stage1", "stage2", "stage3"):
        assert (run / stage / "final.pt").is_file()
        ckpt = torch.load(run / stage / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["hyper_parameters"]["config"]["image_size"] == 64
        assert ckpt["hyper_parameters"]["xbmd_version"]
        assert (run / stage / "logs" / "metrics.csv").is_file()
    split = json.loads((run / "split.json").read_text())
    assert set(split["train_patients"]).isdisjoint(split["validation_patients"])
    # stage 2 started from stage 1: its weights differ from a fresh init but load into one
    bundle = load_bundle(run / "model.pt")
    assert bundle.targets == ["ct_abmd_g_cm2", "qct_vbmd_mg_cm3"]
    rows = read_index(dataset)
    arrays = load_sample(dataset / rows[0]["file"]).arrays
    pred = bundle.predict(arrays["xray"], arrays["valid"])
    assert pred.pf_drr_g_cm2.shape == (1, 64, 64) and pred.pf_drr_g_cm2.min() >= 0
    assert set(pred.targets) == {"ct_abmd_g_cm2", "qct_vbmd_mg_cm3"}
    assert np.isfinite(pred.targets["ct_abmd_g_cm2"]).all()
    # re-running skips finished stages; a different config is refused
    again = CliRunner().invoke(app, [*args, "--stages", "1,2,3", "--no-progress"])
    assert again.exit_code == 0 and again.output.count("skipped") == 3
    other = small_config_file.with_name("other.yaml")
    other.write_text(yaml.safe_dump({**SMALL, "seed": 5}))
    refused = CliRunner().invoke(
        app, ["train", str(dataset), "--out", str(run), "--config", str(other)]
    )
    assert refused.exit_code == 1 and "different config" in refused.output


def test_a_stage_starts_from_its_predecessor(dataset, tmp_path):
    from xbmd.learn.train import train

    c = cfg.resolve(SMALL)
    train(dataset, tmp_path / "hl", c, stages=["1", "2"], progress=False, max_steps=1)
    s1 = torch.load(tmp_path / "hl" / "stage1" / "final.pt", weights_only=False)
    s2 = torch.load(tmp_path / "hl" / "stage2" / "final.pt", weights_only=False)
    fresh = build_generator(c).state_dict()
    key = next(k for k in s1["generator"] if k.endswith("weight") and "down.0" in k)
    # one step moves stage 2 a little away from stage 1, far less than from a fresh init
    near = (s2["generator"][key] - s1["generator"][key]).abs().mean()
    far = (s2["generator"][key] - fresh[key]).abs().mean()
    assert near < far
    with pytest.raises(InputError, match="starts from stage 2"):
        train(dataset, tmp_path / "other", c, stages=["3"], progress=False, max_steps=1)


def test_ablations_skip_stages(dataset, tmp_path):
    from xbmd.learn.train import train

    direct = cfg.resolve({**SMALL, "ablation": "direct"})
    summary = train(
        dataset, tmp_path / "direct", direct, stages=["1", "2", "3"], progress=False, max_steps=1
    )
    assert list(summary["stages"]) == ["3"]
    assert (tmp_path / "direct" / "model.pt").is_file()
    no1 = cfg.resolve({**SMALL, "ablation": "no_stage1"})
    summary = train(dataset, tmp_path / "no1", no1, stages=["1", "2"], progress=False, max_steps=1)
    assert list(summary["stages"]) == ["2"]


def test_ddp_with_two_cpu_processes(dataset, small_config_file, tmp_path):
    exe = shutil.which("xbmd") or str(Path(sys.executable).with_name("xbmd"))
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            exe,
            "train",
            str(dataset),
            "--out",
            str(run),
            "--config",
            str(small_config_file),
            "--stages",
            "1,2",
            "--devices",
            "2",
            "--accelerator",
            "cpu",
            "--max-steps",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "train.json").read_text())
    assert summary["stages"]["1"]["devices"] == 2
    assert (run / "stage2" / "final.pt").is_file()


def test_bad_inputs_give_clear_errors(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "index.csv" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: [1, 2")
    result = CliRunner().invoke(
        app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--config", str(bad)]
    )
    assert result.exit_code == 1 and "not valid YAML" in result.output
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable model file"):
        load_bundle(tmp_path / "model.pt")


def test_end_to_end_prepare_train_estimate(dataset, small_config_file, tmp_path, monkeypatch):
    """prepare (fixture) -> train every stage a few steps, localiser included -> estimate."""
    import xbmd.estimation.estimator as estimate_module
    from xbmd.model.localiser import HeadDetection

    run = tmp_path / "e2e"
    args = ["train", str(dataset), "--out", str(run), "--config", str(small_config_file)]
    result = CliRunner().invoke(app, [*args, "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(run / "model.pt")
    assert bundle.localiser is not None
    # two steps do not teach the localiser: give it the true heads of the radiograph
    prep = json.loads((dataset / "prepare.json").read_text())
    rows = [r for r in read_index(dataset) if r["case_id"] == read_index(dataset)[0]["case_id"]]
    xray = Path(prep["manifest"]).parent / rows[0]["xray"]
    heads = []
    for r in rows:
        if r["xray"] == rows[0]["xray"]:
            meta = json.loads((dataset / r["file"]).with_suffix(".json").read_text())
            row, col = meta["landmarks_image_px"]["head_center_px"]
            heads.append(HeadDetection(r["side"], row, col, 0.9))
    monkeypatch.setattr(estimate_module, "locate_heads", lambda model, pixels: list(heads))
    out = tmp_path / "estimate"
    res = CliRunner().invoke(
        app, ["estimate", str(xray), "--model", str(run / "model.pt"), "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/result.json"))]
    assert {r["side"] for r in results} == {h.side for h in heads}
    for r in results:
        assert isinstance(r["bmd_g_cm2"], float) and isinstance(r["bmd_drr_g_cm2"], float | None)
        assert np.load(r["virtual_xray_npy"]).shape == (64, 64)
