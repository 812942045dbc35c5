"""Shared pieces of the estimate tests: a synthetic 12-bit AP pelvis, an untrained model bundle
whose predictions the tests replace, and fixed head detections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import xbmd.estimation.estimator as estimate_module
import xbmd.estimation.orientation as orientation_module
from xbmd.estimation.estimator import Estimator
from xbmd.io.xray_write import write_xray_dicom, write_xray_png
from xbmd.learn import config
from xbmd.model.bundle import Prediction, write_bundle
from xbmd.model.localiser import HeadDetection, Localiser, LocaliserSettings, localiser_state
from xbmd.model.networks import build_generator

SIZE = 64  # model resolution of the tiny bundle
SPACING_MM = 0.35
#: (row, col) of the right and left femoral heads of the synthetic pelvis (800 x 1000 pixels).
HEADS = {"right": (330.4, 300.7), "left": (325.2, 702.3)}
TARGET_STATS = {"ct_abmd_g_cm2": [0.9, 0.15], "qct_vbmd_mg_cm3": [300.0, 60.0]}


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    """An untrained bundle: 64 x 64 outputs, a tiny generator and a tiny localiser."""
    torch.manual_seed(0)
    cfg = config.resolve({"image_size": SIZE, "generator": {"channels": [8, 16, 32]}})
    localiser = Localiser(LocaliserSettings(input_size=32, channels=(4, 8)))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return write_bundle(
        path,
        config=cfg,
        generator_state=build_generator(cfg).state_dict(),
        target_stats=TARGET_STATS,
        localiser=localiser_state(localiser),
    )


def pelvis_image(rows: int = 800, cols: int = 1000, seed: int = 0) -> np.ndarray:
    """A 12-bit stand-in for an AP pelvis: soft tissue, two femoral heads and necks, noise."""
    r, c = np.mgrid[0:rows, 0:cols].astype(float)
    img = 900 + 500 * np.exp(-(((c - cols / 2) / (0.3 * cols)) ** 2))
    for side, (hr, hc) in HEADS.items():
        if hr < rows and hc < cols:
            img += 1500 * (np.hypot(r - hr, c - hc) < 70)
            lateral = -1 if side == "right" else 1
            img += 1000 * ((np.abs(c - hc - lateral * 90) < 45) & (r > hr) & (r < hr + 350))
    img += np.random.default_rng(seed).normal(0, 30, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xrays")
    pelvis = pelvis_image()
    write_xray_dicom(
        pelvis,
        folder / "pelvis.dcm",
        pixel_spacing_mm=SPACING_MM,
        sdd_mm=1100,
        sod_mm=950,
        patient_age_years=70,
        patient_sex="F",
        bits_stored=12,
    )
    write_xray_dicom(
        pelvis, folder / "ct.dcm", pixel_spacing_mm=SPACING_MM, extra={"Modality": "CT"}
    )
    whole = (folder / "pelvis.dcm").read_bytes()
    (folder / "corrupt.dcm").write_bytes(whole[: len(whole) // 2])  # truncated
    write_xray_png(pelvis, folder / "pelvis.png")
    chest = {"BodyPartExamined": "CHEST"}
    write_xray_dicom(pelvis, folder / "chest.dcm", pixel_spacing_mm=SPACING_MM, extra=chest)
    write_xray_dicom(pelvis_image(500, 500), folder / "hip.dcm", pixel_spacing_mm=SPACING_MM)
    return folder


@pytest.fixture(scope="module")
def estimator(bundle_path):
    return Estimator(bundle_path)


def fake_heads(monkeypatch, heads: dict[str, tuple[float, float]], confidence: float = 0.9):
    """Replace the (untrained, random) localiser by fixed detections."""
    found = [HeadDetection(side, *rc, confidence) for side, rc in heads.items()]
    monkeypatch.setattr(estimate_module, "locate_heads", lambda model, pixels: list(found))
    # the orientation check looks too: the same heads on every quarter turn keep the image as is
    monkeypatch.setattr(orientation_module, "locate_heads", lambda model, pixels: list(found))


def fixed_prediction(area_mm2: float, bmd_g_cm2: float) -> Prediction:
    """Two hips: a square region of about ``area_mm2`` at 1.2 g/cm2, aBMD ``bmd_g_cm2``."""
    side = round(math.sqrt(area_mm2) / (192 / SIZE))
    region = np.zeros((2, SIZE, SIZE), bool)
    region[:, 10 : 10 + side, 10 : 10 + side] = True
    drr = np.where(region, 1.2, 0.0).astype(np.float32)
    targets = {"ct_abmd_g_cm2": np.full(2, bmd_g_cm2), "qct_vbmd_mg_cm3": np.full(2, 310.0)}
    return Prediction(drr, region, region.astype(np.float32), np.full(2, 1.2), targets)
