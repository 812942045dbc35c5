"""The hip localiser: training set, preprocessing round trip, flipped views, a toy problem learned,
no detection on noise, state round trip, bad datasets."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xbmd.dataset.format import REQUIRED_COLUMNS, load_sample, radiograph_arrays
from xbmd.dataset.hip import CROP_SIZE_PX, HEAD_POSITION
from xbmd.errors import InputError
from xbmd.geometry import SIDES
from xbmd.learn.localiser import View, localiser_training_set, render_views, train_localiser
from xbmd.model.localiser import (
    LocaliserSettings,
    heatmap_peak,
    letterbox,
    localiser_from_state,
    localiser_heatmaps,
    localiser_state,
    locate_heads,
    preprocess,
)
from xbmd.stages import write_csv, write_npz
from xbmd.synth.cohort import SynthSettings

#: Small enough to learn the toy problem in seconds on one core.
TOY = LocaliserSettings(
    input_size=64,
    channels=(8, 16, 32, 64),
    epochs=40,
    steps_per_epoch=10,
    batch_size=8,
    lr=5e-3,
    sigma_px=2.5,
    seed=3,
)
TOY_SHAPE = (150, 190)
#: A few seconds per case (as tests/test_prepare.py).
TINY_COHORT = SynthSettings(ct_spacing_mm=3.0, xray_spacing_mm=1.6, poses=1, phantomless_fraction=0)
QUICK = LocaliserSettings(input_size=32, channels=(4, 8), epochs=1, steps_per_epoch=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two-core machines run other jobs: keep to one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# A toy problem: a pelvis-like picture with a femoral head, an acetabulum and a femur per side


def toy_radiograph(rng, sides=SIDES, shape=TOY_SHAPE) -> tuple[np.ndarray, dict]:
    """A (rows, cols) image and its head centres {side: (row, col)}.

    Each hip: a bright disc (head) under an arc (acetabulum) with a bar (neck and shaft) going
    down and outwards: the patient's right hip is on the image's left, its femur pointing left.
    """
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    img = 0.3 + 0.2 * rows / shape[0] + rng.normal(0, 0.03, shape)
    heads = {}
    for side in sides:
        outward = -1 if side == "right" else 1
        r = shape[0] * rng.uniform(0.4, 0.6)
        c = shape[1] * (0.5 + outward * rng.uniform(0.22, 0.3))
        radius = rng.uniform(10, 13)
        d = np.hypot(rows - r, cols - c)
        img += 0.6 * (d < radius)
        img += 0.4 * ((np.abs(d - radius - 4) < 2.5) & (rows < r))  # acetabulum
        u = np.array([1.0, 0.7 * outward]) / np.hypot(1.0, 0.7)
        t = np.clip((rows - r) * u[0] + (cols - c) * u[1], 0, 60)
        bar = np.hypot(rows - r - t * u[0], cols - c - t * u[1])
        img += 0.5 * (bar < 8) * (d >= radius)
        trochanter = np.hypot(rows - r - 1.6 * radius, cols - c - outward * 2.4 * radius)
        img += 0.4 * (trochanter < 0.8 * radius)
        heads[side] = (r, c)
    return img.astype(np.float32), heads


def write_dataset(root: Path, radiographs: list, missing: tuple = ()) -> Path:
    """An ``xbmd prepare``-style dataset: index.csv, sidecars, reduced radiographs.

    ``radiographs``: [(pixels, heads)]; ``missing``: (radiograph number, side) not in the index.
    """
    dataset = root / "dataset"
    rows = []
    for n, (pixels, heads) in enumerate(radiographs):
        case, xray = f"case_{n:02d}", f"cases/case_{n:02d}/xray_01.png"
        write_npz(dataset / f"radiographs/{case}/xray_01.npz", radiograph_arrays(pixels))
        for side, (r, c) in heads.items():
            if (n, side) in missing:
                continue
            file = f"samples/{case}/xray_01_{side}.npz"
            sidecar = dataset / file.replace(".npz", ".json")
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            sidecar.write_text(json.dumps({"landmarks_image_px": {"head_center_px": [r, c]}}))
            rows.append(
                dict.fromkeys(REQUIRED_COLUMNS, "")
                | {"sample_id": f"{case}/xray_01_{side}", "case_id": case, "patient_id": f"P{n}"}
                | {"xray": xray, "side": side, "file": file}
                | {"radiograph": f"radiographs/{case}/xray_01.npz"}
            )
    write_csv(dataset / "index.csv", tuple(rows[0]), rows)
    return dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """12 toy radiographs (one with its left side refused) and a model trained on them."""
    rng = np.random.default_rng(0)
    radiographs = [toy_radiograph(rng) for _ in range(12)]
    root = tmp_path_factory.mktemp("toy")
    dataset = write_dataset(root, radiographs, missing={(4, "left")})
    model, report = train_localiser(dataset, TOY, progress=False)
    return dataset, radiographs, model, report


# ------------------------------------------------------------------------------------------------
# Training set


def test_training_set_has_every_radiograph_with_unknown_sides_as_none(toy):
    dataset, radiographs, _, _ = toy
    images = localiser_training_set(dataset)
    assert len(images) == 12
    for n, (image, (_, heads)) in enumerate(zip(images, radiographs, strict=True)):
        assert image.xray == dataset / f"radiographs/case_{n:02d}/xray_01.npz"
        assert image.xray.is_file()  # the dataset's own reduced copy: self-contained
        assert set(image.heads) == set(SIDES)
        for side in SIDES:
            if n == 4 and side == "left":
                assert image.heads[side] is None  # refused by prepare: unknown, not absent
            else:
                np.testing.assert_allclose(image.heads[side], heads[side])


@pytest.fixture(scope="module")
def prepared(tiny_dataset):
    """A real ``xbmd prepare`` dataset: three virtual cases, one DICOM radiograph each."""
    return tiny_dataset


def test_a_prepared_dataset_gives_its_radiographs_and_heads(prepared):
    images = {image.xray.parent.name: image for image in localiser_training_set(prepared)}
    assert len(images) == 3
    for image in images.values():
        assert image.xray.suffix == ".npz" and image.xray.is_file()
        assert image.heads["right"][1] < image.heads["left"][1]  # AP: right on image left
        with np.load(image.xray) as stored:
            assert max(stored["pixels"].shape) <= 512 and stored["pixels"].dtype == np.float32
    with (prepared / "index.csv").open() as fh:
        for row in csv.DictReader(fh):
            image = images[row["case_id"]]
            with np.load(image.xray) as stored:
                scale = stored["scale_rc"]
            # the head centre is where the hip crop puts it (the estimator crops the same way),
            # in the reduced radiograph's pixels
            meta = load_sample(prepared / row["file"]).meta
            crop_to_image = np.array(meta["crop"]["crop_to_image"])
            head = crop_to_image[:, :2] @ np.multiply(HEAD_POSITION, CROP_SIZE_PX)
            reduced = (head + crop_to_image[:, 2] + 0.5) * scale - 0.5
            np.testing.assert_allclose(reduced, image.heads[row["side"]], atol=1e-3)
    _, report = train_localiser(prepared, QUICK, progress=False)  # reads only the dataset
    assert report["n_images"] == 3 and report["n_heads"] == 6


def test_unknown_side_is_left_out_of_the_loss():
    stored = torch.zeros(1, 1, 64, 64)
    heads = np.array([[[20.0, 15.0], [np.nan, np.nan]]])
    _, targets, known = render_views(stored, heads, [View((31.5, 31.5), 1.0)], 64, 2.0)
    assert known.tolist() == [[1.0, 0.0]]
    assert targets[0, 0].max() > 0.9 and targets[0, 1].max() == 0


def test_bad_datasets_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such dataset folder"):
        localiser_training_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"index\.csv: no such file"):
        localiser_training_set(tmp_path / "empty")
    rng = np.random.default_rng(1)
    dataset = write_dataset(tmp_path, [toy_radiograph(rng), toy_radiograph(rng)])
    (dataset / "radiographs/case_00/xray_01.npz").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"case_00/xray_01\.npz: cannot be read, skipped"):
        _, report = train_localiser(dataset, QUICK, progress=False)
    assert report["n_images"] == 1
    (dataset / "radiographs/case_01/xray_01.npz").unlink()
    with pytest.raises(InputError, match="none of the training radiographs"):
        with pytest.warns(UserWarning):
            train_localiser(dataset, QUICK, progress=False)
    (dataset / "samples/case_00/xray_01_left.json").write_text("{}")
    with pytest.raises(InputError, match=r"xray_01_left\.json: no femoral head centre"):
        localiser_training_set(dataset)


# ------------------------------------------------------------------------------------------------
# Preprocessing and views


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (64, 64)])
def test_preprocessing_maps_coordinates_back_exactly(shape):
    box = letterbox(shape, 64)
    points = np.array([[0.0, 0.0], [shape[0] - 1, shape[1] - 1], [123.4, 45.6]])
    np.testing.assert_allclose(box.to_image(box.to_input(points)), points, atol=1e-9)
    # the image's corner pixels land inside the input, the longer side fills it
    corners = box.to_input(np.array([[-0.5, -0.5], [shape[0] - 0.5, shape[1] - 0.5]]))
    assert corners.min() >= -0.5 - 1e-9 and corners.max() <= 63.5 + 1e-9
    assert np.isclose((corners[1] - corners[0]).max(), 64)
    # a blob's centroid in the input maps back onto the blob's centre in the image
    center = np.array([0.41 * shape[0], 0.63 * shape[1]])
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    blob = np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * (shape[0] / 12) ** 2))
    image, box = preprocess(100 + 50 * blob, 64)
    assert image.shape == (64, 64) and image.dtype == np.float32
    weights = np.clip(image - 0.5, 0, None)
    found = [(weights * g).sum() / weights.sum() for g in np.mgrid[0:64, 0:64]]
    pixel = max(shape) / 64
    np.testing.assert_allclose(box.to_image(found), center, atol=0.1 * pixel)


def test_flipped_view_mirrors_the_image_and_swaps_the_sides():
    stored = torch.rand(1, 1, 64, 64)
    heads = np.array([[[20.0, 15.0], [np.nan, np.nan]]])  # right head only, left unknown
    for flip in (False, True):
        images, targets, known = render_views(
            stored, heads, [View((31.5, 31.5), 1.0, flip=flip)], 64, 2.0
        )
        expected = stored.flip(-1) if flip else stored
        torch.testing.assert_close(images[:, :, 2:-2, 2:-2], expected[:, :, 2:-2, 2:-2])
        # a mirrored right hip looks like a left hip: its target moves to the left channel
        channel = 1 if flip else 0
        assert known[0].tolist() == ([0.0, 1.0] if flip else [1.0, 0.0])
        row, col, peak = heatmap_peak(targets[0, channel].numpy(), 2.0)
        assert (row, col) == pytest.approx((20.0, 48.0 if flip else 15.0), abs=1e-6)
        assert peak == pytest.approx(1.0) and targets[0, 1 - channel].max() == 0


def test_view_scale_and_rotation_move_the_target_with_the_image():
    stored = torch.zeros(1, 1, 128, 128)
    stored[0, 0, 60:65, 90:95] = 1.0  # a square centred on (62, 92)
    view = View((64.0, 70.0), 1.5, angle_rad=0.3)
    images, targets, _ = render_views(
        stored, np.array([[[62.0, 92.0], [62.0, 92.0]]]), [view], 64, 2
    )
    row, col, _ = heatmap_peak(targets[0, 0].numpy(), 2.0)
    weights = images[0, 0].numpy()
    centroid = [(weights * g).sum() / weights.sum() for g in np.mgrid[0:64, 0:64]]
    np.testing.assert_allclose(centroid, [row, col], atol=0.3)


# ------------------------------------------------------------------------------------------------
# The toy problem learned


def test_heads_are_found_on_new_radiographs(toy):
    _, _, model, report = toy
    assert report["n_images"] == 12 and report["n_heads"] == 23 and report["steps"] == 400
    rng = np.random.default_rng(100)
    errors = []
    for _ in range(4):
        pixels, heads = toy_radiograph(rng)
        found = locate_heads(model, pixels)
        assert [d.side for d in found] == list(SIDES)
        for d in found:
            assert model.settings.threshold <= d.confidence <= 1
            errors.append(np.hypot(d.row - heads[d.side][0], d.col - heads[d.side][1]))
    assert max(errors) < 4.0  # pixels of the radiograph; an input pixel is 3 of them


def test_one_hip_is_found_on_its_side(toy):
    _, _, model, _ = toy
    pixels, _ = toy_radiograph(np.random.default_rng(5), sides=("left",))
    found = locate_heads(model, pixels)
    assert [d.side for d in found] == ["left"]


def test_a_mirrored_radiograph_gives_mirrored_heads_with_sides_swapped(toy):
    _, _, model, _ = toy
    pixels, _ = toy_radiograph(np.random.default_rng(11))
    found = locate_heads(model, pixels)
    mirrored = {d.side: d for d in locate_heads(model, pixels[:, ::-1])}
    assert len(found) == len(mirrored) == 2
    for d in found:
        other = mirrored[SIDES[1 - SIDES.index(d.side)]]
        assert other.row == pytest.approx(d.row, abs=1e-3)
        assert other.col == pytest.approx(TOY_SHAPE[1] - 1 - d.col, abs=1e-3)
        assert other.confidence == pytest.approx(d.confidence, abs=1e-5)


def test_noise_gives_no_confident_head(toy):
    _, _, model, _ = toy
    rng = np.random.default_rng(7)
    pixels = rng.normal(size=TOY_SHAPE)
    assert locate_heads(model, pixels) == []
    heat, _ = localiser_heatmaps(model, pixels)
    assert heat.max() < 0.5 * model.settings.threshold
    assert locate_heads(model, np.full(TOY_SHAPE, 3.0)) == []  # no contrast: nothing to see


def test_state_round_trip_gives_identical_outputs(toy):
    _, _, model, report = toy
    buffer = io.BytesIO()
    torch.save({"localiser": localiser_state(model)}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["localiser"]
    again = localiser_from_state(state)
    assert again.settings == model.settings and again.provenance["steps"] == report["steps"]
    pixels, _ = toy_radiograph(np.random.default_rng(9))
    np.testing.assert_array_equal(
        localiser_heatmaps(again, pixels)[0], localiser_heatmaps(model, pixels)[0]
    )
    assert locate_heads(again, pixels) == locate_heads(model, pixels)
    with pytest.raises(InputError, match="not a hip localiser state"):
        localiser_from_state({"format": "something else"})
    with pytest.raises(InputError, match="version 1 is not supported"):
        localiser_from_state(state | {"format_version": 1})


def test_training_is_deterministic_for_a_seed(toy):
    dataset = toy[0]
    quick = LocaliserSettings(input_size=32, channels=(4, 8), epochs=2, steps_per_epoch=2, seed=5)
    a, _ = train_localiser(dataset, quick, progress=False)
    b, _ = train_localiser(dataset, quick, progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
