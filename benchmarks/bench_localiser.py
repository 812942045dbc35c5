"""The hip localiser: training time, head error, detection, wrong sides, non-hip images, speed.

Trains ``xbmd.learn.localiser`` with default settings (or the ones given) on the radiographs of
``--train`` datasets (``xbmd prepare`` output), then on the test radiographs (``--test``
datasets, or ``--holdout`` of the training patients, split by patient) prints:

- head error, mm (median, p95, max) of the heads found on the right side, using the radiograph's
  pixel spacing (the detector's, as read);
- detection rate (known heads found on their side), wrong-side detections (a detection nearer
  the other side's true head), and detections of sides whose truth is unknown;
- the highest confidence on a few synthetic images with no hip (noise, chest-like, hand-like,
  knee-like);
- inference time per radiograph (reading excluded, preprocessing included).

Usage::

    python benchmarks/bench_localiser.py --train bench_out/prepare20/known --holdout 0.25
    python benchmarks/bench_localiser.py --train TRAIN --test TEST --sheet loc.png --save loc.pt
    python benchmarks/bench_localiser.py --load loc.pt --test TEST
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from xbmd.geometry import SIDES
from xbmd.io.xray import read_xray
from xbmd.learn.localiser import TrainingImage, fit_localiser, localiser_training_set
from xbmd.model.localiser import (
    LocaliserSettings,
    localiser_from_state,
    localiser_state,
    locate_heads,
)


def patients(dataset: Path) -> dict[Path, str]:
    """Radiograph path -> patient id, from a dataset's index."""
    manifest = Path(json.loads((dataset / "prepare.json").read_text())["manifest"])
    with (dataset / "index.csv").open(newline="") as fh:
        return {manifest.parent / r["xray"]: r["patient_id"] for r in csv.DictReader(fh)}


def split(datasets: list[Path], holdout: float, seed: int) -> tuple[list, list]:
    images = [im for d in datasets for im in localiser_training_set(d)]
    owner = {k: v for d in datasets for k, v in patients(d).items()}
    ids = sorted(set(owner.values()))
    rng = np.random.default_rng(seed)
    test_ids = set(rng.permutation(ids)[: max(1, math.ceil(holdout * len(ids)))].tolist())
    test = [im for im in images if owner[im.xray] in test_ids]
    train = [im for im in images if owner[im.xray] not in test_ids]
    print(f"split by patient: {len(ids) - len(test_ids)} train / {len(test_ids)} test patients")
    return train, test


def evaluate(model, test: list[TrainingImage]) -> tuple[dict, list]:
    errors_mm, seconds, found_known, known, wrong, unknown_found = [], [], 0, 0, 0, 0
    shown = []
    for item in test:
        xray = read_xray(item.xray)
        start = time.perf_counter()
        detections = locate_heads(model, xray.pixels)
        seconds.append(time.perf_counter() - start)
        spacing = np.asarray(xray.pixel_spacing_mm or (np.nan, np.nan))
        truth = {s: np.asarray(rc) for s, rc in item.heads.items() if rc is not None}
        known += len(truth)
        for det in detections:
            rc = np.array([det.row, det.col])
            if det.side not in truth:
                unknown_found += 1
                continue
            other = truth.get(SIDES[1 - SIDES.index(det.side)])
            own_d = np.linalg.norm(rc - truth[det.side])
            if other is not None and np.linalg.norm(rc - other) < own_d:
                wrong += 1
                continue
            found_known += 1
            errors_mm.append(float(np.linalg.norm((rc - truth[det.side]) * spacing)))
        shown.append((xray.pixels, truth, detections))
    e = np.array(errors_mm) if errors_mm else np.array([np.nan])
    confidences = [d.confidence for _, _, found in shown for d in found]
    return {
        "heads_known": known,
        "detected": found_known,
        "detection_rate": found_known / max(known, 1),
        "wrong_side": wrong,
        "detections_of_unknown_sides": unknown_found,
        "error_mm_median": float(np.median(e)),
        "error_mm_p95": float(np.percentile(e, 95)),
        "error_mm_max": float(np.max(e)),
        "seconds_per_image": float(np.median(seconds)),
        "confidence_min": float(min(confidences, default=np.nan)),
        "confidence_median": float(np.median(confidences)) if confidences else np.nan,
    }, shown


def evaluate_unilateral(model, test: list[TrainingImage], half_width: float = 0.3) -> dict:
    """Single-hip radiographs made from the test radiographs: the columns within ``half_width``
    of the image width around each known head (the other head left out)."""
    right_side, wrong_side, missed, errors_mm = 0, 0, 0, []
    for item in test:
        xray = read_xray(item.xray)
        cols = xray.pixels.shape[1]
        for side, rc in item.heads.items():
            if rc is None:
                continue
            c0 = max(0, round(rc[1] - half_width * cols))
            crop = xray.pixels[:, c0 : round(rc[1] + half_width * cols)]
            found = locate_heads(model, crop)
            wrong_side += sum(d.side != side for d in found)
            mine = [d for d in found if d.side == side]
            if not mine:
                missed += 1
                continue
            right_side += 1
            delta = np.array([mine[0].row - rc[0], mine[0].col + c0 - rc[1]])
            errors_mm.append(float(np.linalg.norm(delta * np.asarray(xray.pixel_spacing_mm))))
    e = np.array(errors_mm) if errors_mm else np.array([np.nan])
    return {
        "crops": right_side + missed,
        "found": right_side,
        "wrong_side": wrong_side,
        "error_mm_median": float(np.median(e)),
        "error_mm_max": float(np.max(e)),
    }


def non_hip_images(seed: int = 123) -> dict[str, np.ndarray]:
    """Synthetic radiograph-sized images with no hip."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:1000, 0:1200] / 1000.0
    from scipy import ndimage

    chest = 1.0 - 0.7 * (
        (((rows - 0.5) / 0.35) ** 2 + ((cols - 0.35) / 0.15) ** 2 < 1)
        | (((rows - 0.5) / 0.35) ** 2 + ((cols - 0.85) / 0.15) ** 2 < 1)
    )
    for k in range(9):  # ribs: arcs
        r = np.hypot(rows - (0.05 + 0.08 * k) + 0.3, cols - 0.6)
        chest = chest + 0.4 * (np.abs(r - 0.45) < 0.012)
    chest = chest + 0.8 * (np.abs(cols - 0.6) < 0.04)  # spine
    hand = np.zeros_like(rows)
    for k in range(5):  # fingers and metacarpals
        c = 0.35 + 0.1 * k
        hand += 1.0 * (
            (np.abs(cols - c) < 0.025) & (rows > 0.05 + 0.05 * abs(k - 2)) & (rows < 0.6)
        )
        hand += 1.0 * ((np.abs(cols - (c + 0.5 * (0.6 - rows) * 0)) < 0.03) & (rows > 0.62))
    knee = np.zeros_like(rows)
    knee += (np.abs(cols - 0.6) < 0.12) & (rows < 0.45)  # femur shaft
    knee += (((rows - 0.47) / 0.08) ** 2 + ((cols - 0.53) / 0.08) ** 2) < 1  # condyles
    knee += (((rows - 0.47) / 0.08) ** 2 + ((cols - 0.68) / 0.08) ** 2) < 1
    knee += (np.abs(cols - 0.6) < 0.13) & (rows > 0.58)  # tibia
    images = {
        "white noise": rng.normal(size=(1000, 1200)),
        "smooth noise": ndimage.gaussian_filter(rng.normal(size=(1000, 1200)), 40),
        "chest-like": chest,
        "hand-like": hand,
        "knee-like": knee,
        "constant": np.full((1000, 1200), 7.0),
    }
    return {
        k: ndimage.gaussian_filter(v.astype(float), 3) + rng.normal(0, 0.02, v.shape)
        for k, v in images.items()
    }


def contact_sheet(shown: list, path: Path, columns: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xbmd.display import to_display_uint8

    n = len(shown)
    fig, axes = plt.subplots(
        math.ceil(n / columns), columns, figsize=(3 * columns, 2.5 * math.ceil(n / columns))
    )
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    colours = {"right": "tab:red", "left": "tab:cyan"}
    for ax, (pixels, truth, detections) in zip(np.atleast_1d(axes).ravel(), shown, strict=False):
        ax.imshow(to_display_uint8(pixels), cmap="gray")
        for rc in truth.values():
            ax.plot(rc[1], rc[0], "+", color="yellow", ms=10)
        for d in detections:
            ax.plot(d.col, d.row, "o", mfc="none", color=colours[d.side], ms=8)
            ax.text(d.col, d.row - 60, f"{d.confidence:.2f}", color=colours[d.side], fontsize=7)
    fig.suptitle("truth + (yellow), found: right o red, left o cyan, with confidence")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"contact sheet: {path}")


def train(args: argparse.Namespace, settings: LocaliserSettings) -> tuple:
    if not args.train:
        raise SystemExit("--train DATASET [...] is needed (or --load STATE --test DATASET)")
    if args.test:
        train = [im for d in args.train for im in localiser_training_set(d)]
        test = [im for d in args.test for im in localiser_training_set(d)]
    else:
        train, test = split(args.train, args.holdout, args.seed)
    print(f"train {len(train)} radiographs, test {len(test)}; settings {settings}")
    model, report = fit_localiser(train, settings, progress=True)
    print(
        f"training: {report['seconds']:.1f} s ({report['load_seconds']:.1f} s reading) for "
        f"{report['n_images']} radiographs, {report['steps']} steps, final loss "
        f"{report['final_loss']:.5f}, {torch.get_num_threads()} threads"
    )
    if args.save:
        torch.save(localiser_state(model), args.save)
    return model, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, nargs="*", default=[])
    parser.add_argument("--test", type=Path, nargs="*", default=[])
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG of the test detections")
    parser.add_argument("--set", nargs="*", default=[], help="settings overrides, name=value")
    parser.add_argument("--save", type=Path, help="save the trained localiser's state here")
    parser.add_argument("--load", type=Path, help="evaluate this saved state on --test instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {}
    for item in args.set:
        name, value = item.split("=", 1)
        overrides[name] = json.loads(value)
    if args.load:
        model = localiser_from_state(torch.load(args.load, weights_only=True))
        test = [im for d in args.test for im in localiser_training_set(d)]
        print(f"loaded {args.load}: {model.settings}")
    else:
        model, test = train(args, LocaliserSettings(**overrides))
    figures, shown = evaluate(model, test)
    print(
        f"{len(test)} test radiographs, "
        f"{figures['heads_known']} known heads; detected {figures['detected']} "
        f"({100 * figures['detection_rate']:.1f} %), wrong side {figures['wrong_side']}, "
        f"detections of unknown sides {figures['detections_of_unknown_sides']}; head error "
        f"mm: median {figures['error_mm_median']:.2f}, p95 {figures['error_mm_p95']:.2f}, "
        f"max {figures['error_mm_max']:.2f}; {1000 * figures['seconds_per_image']:.1f} ms "
        f"per radiograph (median); confidence of the heads found: min "
        f"{figures['confidence_min']:.2f}, median {figures['confidence_median']:.2f}"
    )
    one = evaluate_unilateral(model, test)
    print(
        f"single-hip crops (60 % of the width around one head): {one['found']} of {one['crops']} "
        f"found on their side, {one['wrong_side']} detections of the wrong side; error mm "
        f"median {one['error_mm_median']:.2f}, max {one['error_mm_max']:.2f}"
    )
    for name, image in non_hip_images().items():
        from xbmd.model.localiser import localiser_heatmaps

        heat, _ = localiser_heatmaps(model, image)
        found = locate_heads(model, image)
        print(
            f"non-hip {name:13s}: max heatmap {heat.max():.3f}, detections "
            f"{[(d.side, round(d.confidence, 2)) for d in found]}"
        )
    if args.sheet:
        contact_sheet(shown, args.sheet)


if __name__ == "__main__":
    main()
