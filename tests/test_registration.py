"""2D-3D registration: similarity measures, field mask, pose bookkeeping, and registration of a
tiny virtual case from perturbed and default starts, through the library and `xbmd register`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xbmd.cli import app
from xbmd.ct.landmarks import read_landmarks
from xbmd.drr import prepare_volume, render
from xbmd.errors import InputError
from xbmd.geometry import BodyPose, PerspectiveGeometry, RigidTransform
from xbmd.io.ct import read_ct, read_labels
from xbmd.io.xray import read_xray, xray_geometry
from xbmd.registration.optimise import RegistrationSettings, register
from xbmd.registration.result import (
    Registration,
    projected_distance_mm,
    read_poses,
    rotation_error_deg,
)
from xbmd.registration.scene import build_scene
from xbmd.similarity import block_all, block_mean, field_mask, similarity
from xbmd.synth.cohort import SynthSettings, generate_cohort
from xbmd.volume import Volume

# ---- similarity --------------------------------------------------------------------------------


def _blobs(seed: int = 0, size: int = 48) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(6):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(3, 8)]
        img += (np.hypot(yy - cy, xx - cx) < r) * rng.uniform(0.5, 2)
    return torch.as_tensor(img, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["gc", "ncc"])
def test_similarity_ignores_gain_and_offset_and_sees_inversion(kind):
    img = _blobs()
    mask = torch.ones_like(img)
    moving = torch.stack([2.5 * img + 7.0, -img, _blobs(seed=1)])
    s = similarity(moving, img, mask, kind).numpy()
    assert s[0] == pytest.approx(1.0, abs=1e-9)
    assert s[1] == pytest.approx(-1.0, abs=1e-9)
    assert abs(s[2]) < 0.5


def test_gc_peaks_at_the_right_shift_and_ignores_masked_pixels():
    img = _blobs(size=64)
    shifts = [-3, -1, 0, 1, 3]
    moving = torch.stack([torch.roll(img, s, dims=1) for s in shifts])
    mask = torch.ones_like(img)
    mask[:, :4] = mask[:, -4:] = 0  # roll wraps around: leave the seam out
    gc = similarity(moving, img, mask).numpy()
    assert shifts[int(np.argmax(gc))] == 0
    # a wild region outside the mask does not change the result
    wild = img.clone()
    wild[:20, :20] = torch.rand(20, 20, dtype=torch.float64) * 100
    mask2 = mask.clone()
    mask2[:22, :22] = 0
    a = similarity(moving, img, mask2).numpy()
    b = similarity(moving, wild, mask2).numpy()
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_similarity_is_differentiable():
    img = _blobs()
    moving = (img + 0.1 * torch.rand_like(img)).requires_grad_(True)
    similarity(moving[None], img, torch.ones_like(img))[0].backward()
    assert moving.grad is not None and torch.isfinite(moving.grad).all()
    assert moving.grad.abs().sum() > 0


@pytest.mark.parametrize("outside", ["black", "white"])
def test_field_mask_finds_a_shutter(outside):
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 900, (80, 100)).astype(np.float32)
    fill = 0.0 if outside == "black" else 1000.0
    img[:10] = fill
    img[:, 85:] = fill
    inside = field_mask(img, margin_px=2)
    assert not inside[:12].any() and not inside[:, 83:].any()
    assert inside[14:76, 4:80].all()


def test_field_mask_without_shutter_keeps_the_image():
    img = np.random.default_rng(1).uniform(0, 1, (50, 60)).astype(np.float32)
    inside = field_mask(img, margin_px=3)
    assert inside[6:-6, 6:-6].all() and not inside[:3].any()


def test_block_reductions():
    a = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_allclose(block_mean(a, 3), [[7, 10], [25, 28]])
    m = np.ones((7, 7), bool)
    m[0, 0] = False
    np.testing.assert_array_equal(block_all(m, 3), [[False, True], [True, True]])


# ---- pose bookkeeping ---------------------------------------------------------------------------


def test_body_pose_about_another_centre_is_the_same_placement():
    pose = BodyPose((3,), np.array([10.0, -5.0, 30.0]), RigidTransform((4, -7, 12), (5, 2, -9)))
    moved = pose.about(np.array([-40.0, 20.0, 0.0]))
    np.testing.assert_allclose(moved.to_room(), pose.to_room(), atol=1e-9)
    back = BodyPose.from_dict(json.loads(json.dumps(moved.to_dict())))
    np.testing.assert_allclose(back.to_room(), pose.to_room(), atol=1e-4)


def test_downsampled_volume_keeps_line_integrals():
    rng = np.random.default_rng(2)
    data = np.zeros((40, 40, 40), np.float32)
    data[8:32, 10:30, 12:28] = rng.uniform(100, 300, (24, 20, 16))
    body = prepare_volume(Volume.from_geometry(data, (1.0, 1.0, 1.0), unit="mg/cm3"), "density")
    geom = PerspectiveGeometry(1000, 900, (110, 110), 0.5)
    with torch.no_grad():
        fine = render(body, torch.zeros(6), geom)[0].numpy()
        coarse = render(body.downsampled(2), torch.zeros(6), geom)[0].numpy()
    assert coarse.sum() == pytest.approx(fine.sum(), rel=0.01)
    from scipy.ndimage import binary_erosion

    core = binary_erosion(fine > 0.1 * fine.max(), iterations=6)  # away from the blurred edges
    assert np.abs(coarse - fine)[core].mean() < 0.05 * fine.max()


def test_distance_and_rotation_error_metrics():
    geom = PerspectiveGeometry(1000, 900, (100, 100), 1.0)
    pts = np.array([[0.0, 0, 0], [20, 0, 10]])
    a = BodyPose((1,), np.zeros(3), RigidTransform())
    b = BodyPose((1,), np.zeros(3), RigidTransform((0, 3, 0), (9, 0, 0)))
    d = projected_distance_mm(pts, a, b, geom)
    assert d[0] == pytest.approx(9 * 1000 / 900, rel=1e-6)  # magnified at the isocentre plane
    assert rotation_error_deg(a, b) == pytest.approx(3.0, abs=1e-9)


def test_read_poses_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json"):
        read_poses(bad)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(InputError, match="poses"):
        read_poses(tmp_path / "empty.json")
    with pytest.raises(InputError, match="no such"):
        read_poses(tmp_path / "missing.json")


# ---- registration of a tiny virtual case --------------------------------------------------------

TINY = SynthSettings(ct_spacing_mm=2.0, xray_spacing_mm=0.6, poses=2, phantomless_fraction=0.0)
#: Coarse pyramid for the coarse test case: 2.4 and 1.2 mm detector pixels.
FAST = RegistrationSettings(level_pixels_mm=(2.4, 1.2), cma_generations=20, gradient_steps=20)


#: Seed of the test's case: both radiographs show every bone (>= 94 % of each femur's window in
#: the field; a collimated-away femur is flagged, rightly, and proves nothing here).
CASE_SEED = 8


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    out = tmp_path_factory.mktemp("regcohort")
    generate_cohort(out, cases=1, seed=CASE_SEED, settings=TINY, workers=1, progress=False)
    case_dir = next((out / "cases").iterdir())
    truth = json.loads((case_dir / "truth.json").read_text())
    ct = read_ct(case_dir / "ct.nii.gz")
    labels = read_labels(case_dir / "labels.nii.gz", ct)
    landmarks = read_landmarks(case_dir / "landmarks.json")
    scene = build_scene(ct, labels, truth["ct"]["label_map"], landmarks)
    return case_dir, truth, scene


def _truth_poses(scene, xray: dict) -> dict[str, BodyPose]:
    return {n: BodyPose.from_dict(d).about(scene.centre(n)) for n, d in xray["poses"].items()}


def _errors(scene, reg: Registration, truth: dict[str, BodyPose]) -> dict[str, tuple]:
    return {
        n: (
            rotation_error_deg(b.pose, truth[n]),
            float(
                projected_distance_mm(scene.landmarks_mm[n], b.pose, truth[n], reg.geometry).mean()
            ),
        )
        for n, b in reg.bodies.items()
    }


def test_registration_recovers_perturbed_poses(case):
    case_dir, truth, scene = case
    xray = truth["xrays"][1]
    image = read_xray(case_dir / xray["dicom"])
    geometry, warnings = xray_geometry(image)
    assert warnings == []
    true = _truth_poses(scene, xray)
    rng = np.random.default_rng(3)
    init = {}
    for name, p in true.items():
        v = p.vector + np.r_[rng.uniform(-8, 8, 3), rng.uniform(-15, 15), rng.uniform(-40, 40), 10]
        init[name] = BodyPose(p.label_ids, p.isocenter_mm, RigidTransform.from_vector(v))
    before = {n: rotation_error_deg(init[n], true[n]) for n in true}
    reg = register(scene, image.pixels, geometry, settings=FAST, init=init)
    errors = _errors(scene, reg, true)
    for name, (rot, mpd) in errors.items():
        # 2 mm CT, 0.6 mm radiograph, a fast pyramid: a coarse case (the 1 mm benchmark is far
        # tighter). Measured on this case, made and registered under three CPU code paths
        # (ATEN_CPU_CAPABILITY default, avx2, avx512) from six perturbed starts each: worst mPD
        # 0.79 mm, worst rotation 2.41 degrees (a femur). Thresholds leave 90 % and 45 % over.
        assert mpd < 1.5, (name, errors, before)
        assert rot < 3.5, (name, errors, before)
        assert not reg.bodies[name].flagged, reg.bodies[name].reasons
    doc = reg.to_dict()
    assert doc["quality"] == "good" and set(doc["poses"]) == set(true)


def test_registration_of_a_wrong_image_is_flagged(case):
    case_dir, truth, scene = case
    image = read_xray(case_dir / truth["xrays"][0]["dicom"])
    geometry, _ = xray_geometry(image)
    noise = np.random.default_rng(0).normal(size=image.pixels.shape).astype(np.float32)
    reg = register(scene, noise, geometry, settings=FAST, bodies=("pelvis",))
    assert reg.flagged and reg.bodies["pelvis"].reasons
    assert "similarity" in " ".join(reg.bodies["pelvis"].reasons)


def test_register_command_writes_poses_and_overlay(case, tmp_path):
    case_dir, truth, scene = case
    xray = case_dir / truth["xrays"][0]["dicom"]
    out = tmp_path / "poses.json"
    res = CliRunner().invoke(
        app,
        [
            "register",
            str(case_dir / "ct.nii.gz"),
            str(xray),
            "--labels",
            str(case_dir / "labels.nii.gz"),
            "--landmarks",
            str(case_dir / "landmarks.json"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code in (0, 3), res.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "xbmd-registration"
    assert set(doc["poses"]) == {"pelvis", "femur_right", "femur_left"}
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    # the default start (no pose given) lands on the truth too
    poses = read_poses(out)
    true = _truth_poses(scene, truth["xrays"][0])
    geometry = PerspectiveGeometry.from_dict(doc["geometry"])
    for name, pose in poses.items():
        mpd = projected_distance_mm(scene.landmarks_mm[name], pose, true[name], geometry).mean()
        assert mpd < 2.0, (name, mpd, res.output)
    # exit code 3 exactly when a bone is flagged (here: a collimated-away femur, if any)
    assert res.exit_code == (3 if doc["quality"] == "flagged" else 0), res.output


def test_register_command_reports_bad_input(case, tmp_path):
    case_dir, _, _ = case
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom at all")
    res = CliRunner().invoke(
        app,
        [
            "register",
            str(case_dir / "ct.nii.gz"),
            str(broken),
            "--labels",
            str(case_dir / "labels.nii.gz"),
            "--out",
            str(tmp_path / "p.json"),
        ],
    )
    assert res.exit_code == 1
    assert "broken.dcm" in res.output and "Traceback" not in res.output
