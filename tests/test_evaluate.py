"""`xbmd evaluate`: sections from a model on a dataset and from a CSV, perturbations, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.errors import InputError
from xbmd.evaluation.evaluate import evaluate
from xbmd.evaluation.robustness import PERTURBATIONS, perturb
from xbmd.evaluation.samples import primary_pair, read_predictions, t_scores
from xbmd.evaluation.stats import agreement, reproducibility
from xbmd.learn import config
from xbmd.model.bundle import write_bundle
from xbmd.model.networks import build_generator
from xbmd.tscore import t_score

runner = CliRunner()
SIZE = 64
INDEX_COLUMNS = [
    "sample_id", "case_id", "patient_id", "side", "file", "sex", "age_years", "ct_abmd_g_cm2",
    "qct_vbmd_mg_cm3", "neck_abmd_g_cm2", "bmd_drr_g_cm2", "dxa_total_hip_g_cm2",
    "dxa_neck_g_cm2",
]  # fmt: skip


def _crop(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hip-like crop: soft tissue, a bright head and shaft, noise; its PF DRR and field."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:256, 0:256].astype(np.float32)
    bone = (np.hypot(r - 102, c - 128) < 30) | ((np.abs(c - 150) < 18) & (r > 110))
    xray = 1000 + 400 * np.exp(-(((c - 128) / 90) ** 2)) + 900 * bone
    xray += rng.normal(0, 15, xray.shape)
    valid = np.ones((256, 256), bool)
    valid[:, :12] = False
    drr = np.where(bone, 1.2 + 0.1 * rng.standard_normal(), 0.0).astype(np.float32)
    return xray.astype(np.float32), valid, drr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prepared-dataset stand-in: 4 patients x 2 sides x 2 poses; one sample file missing."""
    root = tmp_path_factory.mktemp("dataset")
    rows = []
    rng = np.random.default_rng(1)
    for p in range(4):
        abmd = {"right": 0.6 + 0.1 * p, "left": 0.65 + 0.1 * p}
        for side in ("right", "left"):
            for pose in (1, 2):
                sid = f"case_P{p}/xray_0{pose}_{side}"
                file = f"samples/case_P{p}/xray_0{pose}_{side}.npz"
                xray, valid, drr = _crop(10 * p + pose)
                (root / file).parent.mkdir(parents=True, exist_ok=True)
                if sid != "case_P3/xray_02_left":  # listed in index.csv, file missing
                    np.savez(
                        root / file,
                        xray=xray,
                        valid=valid,
                        pf_drr_g_cm2=drr,
                        bone_drr_g_cm2=drr,
                        pf_mask=drr > 0,
                    )
                    (root / file).with_suffix(".json").write_text("{}")
                rows.append(
                    {
                        "sample_id": sid,
                        "case_id": f"case_P{p}",
                        "patient_id": f"P{p}",
                        "side": side,
                        "file": file,
                        "sex": "F",
                        "age_years": "70",
                        "ct_abmd_g_cm2": abmd[side],
                        "qct_vbmd_mg_cm3": 250 + 100 * abmd[side],
                        "neck_abmd_g_cm2": abmd[side] - 0.1,
                        "bmd_drr_g_cm2": 1.2 + 0.01 * rng.standard_normal(),
                        "dxa_total_hip_g_cm2": abmd[side] + 0.02,
                        "dxa_neck_g_cm2": "",
                    }
                )
    with (root / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained bundle (the figures are meaningless; the plumbing is what is tested)."""
    torch.manual_seed(0)
    cfg = config.resolve({"image_size": SIZE, "generator": {"channels": [8, 16, 32]}})
    return write_bundle(
        tmp_path_factory.mktemp("model") / "model.pt",
        config=cfg,
        generator_state=build_generator(cfg).state_dict(),
        target_stats={"ct_abmd_g_cm2": [0.8, 0.15], "qct_vbmd_mg_cm3": [330.0, 60.0]},
    )


@pytest.fixture(scope="module")
def report(dataset, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--dataset",
            str(dataset),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--robustness",
            "pose,jpeg,noise",
            "--no-progress",
        ],
    )
    return out, result


def test_model_on_a_dataset_writes_every_section(report):
    out, result = report
    assert result.exit_code == 2, result.output  # one sample file is missing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {
        "images": 15,
        "hips": 8,
        "patients": 4,
        "failed": 1,
        "implant_samples_left_out": 0,
    }
    # no prepare.json: the originals are unknown, so no end-to-end run and no headline row of it
    assert metrics["end_to_end"] is None
    assert "prepare.json" in metrics["not_available"]["end_to_end"]
    assert {r["mode"] for r in metrics["headline"]["rows"]} == {"true_crops"}
    assert metrics["failures"][0]["sample_id"] == "case_P3/xray_02_left"
    assert "no such sample file" in metrics["failures"][0]["error"]
    pairs = {(a["estimate"], a["reference"], a["level"]) for a in metrics["agreement"]}
    assert ("ct_abmd_g_cm2", "ct_abmd_g_cm2", "image") in pairs
    assert ("ct_abmd_g_cm2", "ct_abmd_g_cm2", "hip") in pairs
    assert ("qct_vbmd_mg_cm3", "qct_vbmd_mg_cm3", "image") in pairs
    assert ("ct_abmd_g_cm2", "dxa_total_hip_g_cm2", "image") in pairs  # DXA from the aBMD head
    assert ("bmd_drr_g_cm2", "bmd_drr_g_cm2", "image") in pairs
    hip_rows = [a for a in metrics["agreement"] if a["level"] == "hip"]
    assert all(a["n"] == 8 for a in hip_rows)
    assert [t["name"] for t in metrics["diagnostic"]["tasks"]] == ["osteoporosis", "low bone mass"]
    assert sum(map(sum, metrics["diagnostic"]["who"]["matrix"])) == 15
    d = metrics["decomposition"]
    assert d["n"] == 15 and -1 <= d["gradient_correlation"]["mean"] <= 1
    assert d["pf_abmd"]["mean_abs_error_g_cm2"] >= 0
    assert metrics["reproducibility"]["estimates"]["ct_abmd_g_cm2"]["groups"] == 7
    kinds = [(r["kind"], r["level"]) for r in metrics["robustness"]["rows"]]
    assert kinds == [("jpeg", q) for q in PERTURBATIONS["jpeg"]] + [
        ("noise", s) for s in PERTURBATIONS["noise"]
    ]
    assert metrics["robustness"]["jpeg_target"]["met"] in (True, False)
    assert "exposure" not in {r["kind"] for r in metrics["robustness"]["rows"]}
    assert (out / "report.html").is_file() and "r " in result.output


def test_predictions_csv_round_trip_gives_the_same_agreement(report, tmp_path):
    out, _ = report
    metrics = json.loads((out / "metrics.json").read_text())
    again = evaluate(tmp_path / "again", predictions=out / "predictions.csv")
    # predictions.csv keeps full precision: the same figures up to float formatting
    assert len(again["agreement"]) == len(metrics["agreement"])
    for a, b in zip(again["agreement"], metrics["agreement"], strict=True):
        assert {k: v for k, v in a.items() if isinstance(v, str)} == {
            k: v for k, v in b.items() if isinstance(v, str)
        }
        assert a["n"] == b["n"]
        assert a["pearson_r"] == pytest.approx(b["pearson_r"], abs=1e-9)
        assert a["mae"] == pytest.approx(b["mae"], abs=1e-9)
    assert again["diagnostic"] == metrics["diagnostic"]
    r_again = again["reproducibility"]["estimates"]["ct_abmd_g_cm2"]
    r_first = metrics["reproducibility"]["estimates"]["ct_abmd_g_cm2"]
    assert r_again["rms_cv_pct"] == pytest.approx(r_first["rms_cv_pct"], rel=1e-9)
    assert again["decomposition"] is None and again["robustness"] is None
    assert "nothing to re-estimate" in again["not_available"]["robustness"]


def test_csv_figures_equal_the_statistics_by_hand(tmp_path):
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.5, 1.1, 40)
    est = ref + rng.normal(0.02, 0.05, 40)
    patients = [f"P{i // 4}" for i in range(40)]
    sides = ["right", "right", "left", "left"] * 10
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "side", "est_ct_abmd_g_cm2", "ref_ct_abmd_g_cm2"])
        w.writerows(zip(patients, sides, est, ref, strict=True))
    m = evaluate(tmp_path / "r", predictions=path, robustness=["pose"])
    image = next(a for a in m["agreement"] if a["level"] == "image")
    expected = agreement(est, ref)
    for key in ("pearson_r", "icc_a1", "mae", "rmse", "bias"):
        assert image[key] == pytest.approx(expected[key])
    assert image["limits_of_agreement"] == pytest.approx(expected["limits_of_agreement"])
    hips = [f"{p}/{s}" for p, s in zip(patients, sides, strict=True)]
    repro = m["reproducibility"]["estimates"]["ct_abmd_g_cm2"]
    assert repro["rms_cv_pct"] == pytest.approx(reproducibility(est, hips)["rms_cv_pct"])
    # diagnostic: T-scores of both against the same young-adult reference
    e_t = [t_score(v) for v in est]
    r_t = [t_score(v) for v in ref]
    task = m["diagnostic"]["tasks"][0]
    assert task["n_positive"] == sum(t <= -2.5 for t in r_t)
    assert task["confusion"]["tp"] == sum(
        a <= -2.5 and b <= -2.5 for a, b in zip(e_t, r_t, strict=True)
    )
    assert t_scores(np.array([0.942]))[0] == pytest.approx(0.0, abs=1e-9)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "data:image/png;base64," in html


def test_perturbations_change_only_the_field_and_grow_with_level():
    xray, valid, _ = _crop(0)
    rng = np.random.default_rng(0)
    for kind, levels in PERTURBATIONS.items():
        outs = [perturb(xray, valid, kind, lvl, rng) for lvl in levels]
        for out in outs:
            assert out.shape == xray.shape and out.dtype == np.float32
            np.testing.assert_array_equal(out[~valid], xray[~valid])
        errors = [float(np.abs(o - xray)[valid].mean()) for o in outs]
        assert all(e > 0 for e in errors), kind
    jpeg = [
        float(np.abs(perturb(xray, valid, "jpeg", q, rng) - xray)[valid].mean()) for q in (95, 10)
    ]
    assert jpeg[0] < jpeg[1]
    noise = [float((perturb(xray, valid, "noise", s, rng) - xray)[valid].std()) for s in (1, 8)]
    window = float(xray[valid].max() - xray[valid].min())
    assert noise[0] == pytest.approx(0.01 * window, rel=0.05)
    assert noise[1] == pytest.approx(0.08 * window, rel=0.05)
    with pytest.raises(InputError, match="unknown perturbation"):
        perturb(xray, valid, "blur", 1, rng)


def test_bad_inputs_are_clear(tmp_path, dataset):
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,bmd\nP1,0.8\n")
    with pytest.raises(InputError, match="est_<name> and ref_<name>"):
        read_predictions(bad)
    with pytest.raises(InputError, match="no such predictions file"):
        read_predictions(tmp_path / "missing.csv")
    samples = read_predictions(_csv(tmp_path / "ok.csv"))
    with pytest.raises(InputError, match="no reference values 'dxa_total_hip_g_cm2'"):
        primary_pair(samples, "dxa")
    result = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "give --dataset" in result.output
    result = runner.invoke(
        app,
        ["evaluate", "--out", str(tmp_path / "x"), "--predictions", str(bad), "--no-progress"],
    )
    assert result.exit_code == 1 and "bad.csv" in result.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--out",
            str(tmp_path / "x"),
            "--predictions",
            str(_csv(tmp_path / "ok.csv")),
            "--robustness",
            "pose,sharpness",
        ],
    )
    assert result.exit_code == 1 and "unknown robustness test(s) sharpness" in result.output
    result = runner.invoke(
        app, ["evaluate", "--out", str(tmp_path / "y"), "--dataset", str(tmp_path)]
    )
    assert result.exit_code == 1 and "index.csv" in result.output


def _csv(path):
    path.write_text(
        "patient_id,side,est_ct_abmd_g_cm2,ref_ct_abmd_g_cm2\n"
        "P1,right,0.8,0.82\nP1,right,0.81,0.82\nP2,left,0.6,0.55\nP3,left,0.9,0.95\n"
    )
    return path


def test_a_direct_ablation_model_has_no_virtual_xray_section(dataset, tmp_path):
    torch.manual_seed(0)
    cfg = config.resolve(
        {"image_size": SIZE, "generator": {"channels": [8, 16, 32]}, "ablation": "direct"}
    )
    path = write_bundle(
        tmp_path / "direct.pt",
        config=cfg,
        generator_state=build_generator(cfg).state_dict(),
        target_stats={"ct_abmd_g_cm2": [0.8, 0.15], "qct_vbmd_mg_cm3": [330.0, 60.0]},
    )
    m = evaluate(tmp_path / "r", model=path, dataset=dataset, robustness=[])
    assert m["decomposition"] is None
    assert "ablation 'direct'" in m["not_available"]["decomposition"]
    assert "bmd_drr_g_cm2" not in {a["estimate"] for a in m["agreement"]}
    assert {a["estimate"] for a in m["agreement"]} == {"ct_abmd_g_cm2", "qct_vbmd_mg_cm3"}
