"""Training the hip localiser (the network and its inference: ``xbmd.model.localiser``).

Training (:func:`train_localiser`) reads the radiographs of ``xbmd prepare`` datasets (the reduced
copies the dataset holds) and their head centres, and draws random views of them: whole images,
hips zoomed in (often one head only), anywhere (often no head), all with random scale, rotation,
exposure, gamma, blur and noise, and horizontal flips that swap the right/left channels (a mirrored
right hip looks like a left hip: the side comes from the anatomy). The targets are Gaussians of
``sigma_px`` input pixels at the head centres. Synthetic images with no hip (blank, noise,
gradients, blobs, bars, discs) teach it to report low confidence there. A side missing from a
dataset's index (refused by ``xbmd prepare``) is unknown, not absent: for that radiograph its class
is merged with the background in the loss.

Why a softmax over three classes, not two independent heatmaps with a squared error: on
``benchmarks/bench_localiser.py`` (30 training radiographs, 900 steps) the squared error still
confused the sides at 300 steps (an "any head" channel is an easy plateau for it), ended less
precise (median 2.9 vs 2.3 mm at the first look) and answered higher on images with no hip; the
cross-entropy makes the classes compete at every pixel.

Example
-------
>>> model, report = train_localiser(Path("dataset"), LocaliserSettings())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from xbmd.dataset.format import dataset_radiographs
from xbmd.errors import InputError, XbmdError
from xbmd.geometry import SIDES
from xbmd.model.localiser import (
    STORE_FACTOR,
    Localiser,
    LocaliserSettings,
    normalise_intensity,
    preprocess,
)

#: Views drawn in training: (kind, probability). 'whole': the whole radiograph; 'hip': zoomed in
#: around a known head (often one head only); 'anywhere': zoomed in anywhere (often no head);
#: 'negative': a synthetic image with no hip.
VIEW_KINDS = (("whole", 0.35), ("hip", 0.35), ("anywhere", 0.15), ("negative", 0.15))
#: Loss weight of target pixels (1 + POSITIVE_WEIGHT * target): heads are small. At 20 the
#: heads stayed flat plateaus of p = 1/3 per class for hundreds of steps on the benchmark.
POSITIVE_WEIGHT = 50.0
#: Head (row, col) of a side known to be absent (synthetic negatives): far outside every view, so
#: its target is 0 and it counts in the loss.
ABSENT = -1e6


class TrainingImage(NamedTuple):
    """One radiograph of a training set: its file (:func:`load_pixels` reads it) and its head
    centres.

    ``heads[side]`` is (row, col) in the pixels of that file, or None where the side is unknown
    (not in the dataset's index): unknown, not absent.
    """

    xray: Path
    heads: dict[str, tuple[float, float] | None]


# ------------------------------------------------------------------------------------------------
# Training set


def localiser_training_set(dataset: Path) -> list[TrainingImage]:
    """The radiographs of an ``xbmd prepare`` dataset (its reduced copies, ``radiographs/``) and
    their femoral head centres, one entry per radiograph in index order; a side with no sample
    is None (unknown). See :func:`xbmd.dataset.format.dataset_radiographs`."""
    return [TrainingImage(r.path, r.heads) for r in dataset_radiographs(dataset)]


def load_pixels(path: Path) -> np.ndarray:
    """A training radiograph's pixels: a dataset's reduced radiograph (``.npz``) or any
    radiograph file ``xbmd.io.xray.read_xray`` reads."""
    if Path(path).suffix == ".npz":
        with np.load(path) as data:
            return data["pixels"].astype(np.float32)
    from xbmd.io.xray import read_xray

    return read_xray(path).pixels


# ------------------------------------------------------------------------------------------------
# Views: random fields of a stored radiograph, as network inputs with their targets


@dataclass(frozen=True)
class View:
    """A square field of a stored image: view pixel (row, col) -> stored pixel
    ``center_rc + scale * R(angle) @ F @ ((row, col) - (n - 1) / 2)``, n = input size, F a
    column flip when ``flip``. A flipped view swaps the right/left target channels."""

    center_rc: tuple[float, float]
    scale: float
    angle_rad: float = 0.0
    flip: bool = False

    def matrix(self, input_size: int) -> np.ndarray:
        """(2, 3) affine: view (row, col, 1) -> stored (row, col)."""
        cos, sin = math.cos(self.angle_rad), math.sin(self.angle_rad)
        linear = self.scale * np.array([[cos, -sin], [sin, cos]])
        if self.flip:
            linear = linear @ np.diag([1.0, -1.0])
        half = (input_size - 1) / 2
        shift = np.asarray(self.center_rc, dtype=float) - linear @ [half, half]
        return np.column_stack([linear, shift])


def render_views(
    stored: torch.Tensor,
    heads: np.ndarray,
    views: list[View],
    input_size: int,
    sigma_px: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network inputs and targets of views of stored images.

    Parameters
    ----------
    stored : (batch, 1, H, W) float32, the image each view looks at (normalised, 0 outside).
    heads : (batch, 2, 2) float, (row, col) of the right and left heads in stored pixels, NaN
        where unknown.
    views : one View per image.

    Returns
    -------
    images : (batch, 1, n, n) float32, n = input_size, bilinear, 0 outside the stored image.
    targets : (batch, 2, n, n) float32 Gaussians of ``sigma_px`` at the heads (right, left; the
        channels swapped in flipped views); 0 where the head is unknown.
    known : (batch, 2) float32, 1 where the channel's head is known (present or absent).
    """
    batch, _, height, width = stored.shape
    grid_rc = np.stack(np.mgrid[0:input_size, 0:input_size], axis=-1).astype(float)
    coords, view_heads = [], np.full((batch, 2, 2), np.nan)
    for b, view in enumerate(views):
        m = view.matrix(input_size)
        coords.append(grid_rc @ m[:, :2].T + m[:, 2])
        inverse = np.linalg.inv(m[:, :2])
        channels = SIDES[::-1] if view.flip else SIDES
        for k, side in enumerate(SIDES):
            view_heads[b, channels.index(side)] = inverse @ (heads[b, k] - m[:, 2])
    rc = torch.from_numpy(np.stack(coords)).float()
    grid = torch.stack([(2 * rc[..., 1] + 1) / width - 1, (2 * rc[..., 0] + 1) / height - 1], -1)
    images = F.grid_sample(stored, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    known = torch.from_numpy(np.isfinite(view_heads).all(-1)).float()
    centers = torch.from_numpy(np.nan_to_num(view_heads, nan=-1e4)).float()
    axis = torch.arange(input_size, dtype=torch.float32)
    dr = (axis[None, None, :] - centers[..., 0:1]) ** 2  # (batch, 2, n)
    dc = (axis[None, None, :] - centers[..., 1:2]) ** 2
    targets = torch.exp(-(dr[..., :, None] + dc[..., None, :]) / (2 * sigma_px**2))
    return images, targets * known[..., None, None], known


def _random_view(
    rng: np.random.Generator, stored_size: int, content: tuple, heads: np.ndarray, input_size: int
) -> tuple[str, View]:
    """A random view of a stored image: its kind (``VIEW_KINDS``) and field."""
    kinds, probabilities = zip(*VIEW_KINDS, strict=True)
    kind = str(rng.choice(kinds, p=probabilities))
    known = heads[np.isfinite(heads).all(-1)]
    if kind == "hip" and not len(known):
        kind = "anywhere"
    (r0, c0), (nr, nc) = content
    whole_scale = stored_size / input_size  # stored pixels per view pixel, whole image in view
    angle = float(np.clip(rng.normal(0.0, math.radians(6)), -0.3, 0.3))
    flip = bool(rng.random() < 0.5)
    if kind == "whole" or kind == "negative":
        scale = whole_scale * rng.uniform(0.85, 1.25)
        center = (stored_size - 1) / 2 + rng.normal(0.0, 0.06 * stored_size, 2)
    elif kind == "hip":
        scale = whole_scale * rng.uniform(0.3, 0.75)
        jitter = rng.uniform(-0.35, 0.35, 2) * scale * input_size
        center = known[rng.integers(len(known))] + jitter
    else:
        scale = whole_scale * rng.uniform(0.3, 0.9)
        center = np.array([r0 + rng.uniform(0, nr), c0 + rng.uniform(0, nc)])
    return kind, View((float(center[0]), float(center[1])), float(scale), angle, flip)


def synthetic_negative(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) float32 image with no hip, normalised like a radiograph: smooth noise,
    an intensity gradient, soft blobs and blurred bars (a chest's ribs, a hand's bones)."""
    from scipy import ndimage

    rows, cols = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    plain = rng.random()
    if plain < 0.1:  # blank
        return img.astype(np.float32)
    if plain < 0.2:  # pure noise
        return normalise_intensity(rng.normal(size=img.shape))
    if rng.random() < 0.8:  # smooth noise, blobs of about 1/50 to 1/4 of the image
        spectrum = np.fft.fft2(rng.normal(size=(size, size)))
        sigma = size / rng.uniform(4, 50)
        img += np.fft.ifft2(ndimage.fourier_gaussian(spectrum, sigma)).real
        img /= img.std() + 1e-9
    if rng.random() < 0.6:
        angle = rng.uniform(0, 2 * np.pi)
        img += rng.uniform(1, 4) * (np.cos(angle) * rows + np.sin(angle) * cols)
    for _ in range(rng.integers(0, 6)):
        center, sigma = rng.uniform(0, 1, 2), rng.uniform(0.02, 0.2)
        blob = np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma**2))
        img += rng.uniform(-2, 3) * blob
    for _ in range(rng.integers(0, 9)):
        img += rng.uniform(0.5, 2.5) * _bar(rng, rows, cols)
    for _ in range(rng.integers(0, 4)):  # hard-edged discs and ellipses: a disc is not a head
        center, axes = rng.uniform(0.1, 0.9, 2), rng.uniform(0.03, 0.2, 2)
        inside = ((rows - center[0]) / axes[0]) ** 2 + ((cols - center[1]) / axes[1]) ** 2 < 1
        img += rng.uniform(0.5, 2.5) * inside
    img = ndimage.gaussian_filter(img, rng.uniform(0.3, 2.0))
    img += rng.normal(0, rng.uniform(0.01, 0.2) * (img.std() + 1e-3), img.shape)
    return normalise_intensity(img)


def _bar(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A soft bar between two random points, of random width (fractions of the image)."""
    a, b = rng.uniform(-0.1, 1.1, 2), rng.uniform(-0.1, 1.1, 2)
    d = b - a
    t = np.clip(((rows - a[0]) * d[0] + (cols - a[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
    dist2 = (rows - a[0] - t * d[0]) ** 2 + (cols - a[1] - t * d[1]) ** 2
    return np.exp(-dist2 / (2 * rng.uniform(0.005, 0.04) ** 2))


def _photometric(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random exposure (contrast, brightness), gamma, blur and noise, per image."""
    batch = images.shape[0]
    x = images.clone()
    for b in range(batch):
        img = x[b, 0]
        gamma = math.exp(rng.normal(0.0, 0.3))
        img = torch.sign(img) * img.abs() ** gamma
        img = img * rng.uniform(0.7, 1.3) + rng.uniform(-0.15, 0.15)
        if rng.random() < 0.3:
            img = _gaussian_blur(img, rng.uniform(0.3, 1.2))
        noise = torch.from_numpy(rng.normal(0.0, rng.uniform(0.0, 0.06), img.shape)).float()
        x[b, 0] = img + noise
    return x


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.conv2d(img[None, None], k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(out, k.view(1, 1, -1, 1), padding=(radius, 0))[0, 0]


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class _Store:
    """The training radiographs, preprocessed once at ``STORE_FACTOR`` x the input size."""

    sharp: torch.Tensor  # (n, 1, S, S)
    smooth: torch.Tensor  # (n, 1, S, S), anti-aliased for views that shrink the image
    heads: np.ndarray  # (n, 2, 2) stored (row, col), NaN where unknown
    content: list  # per image: ((row0, col0), (rows, cols)) of the radiograph in the store


def _load_store(images: list[TrainingImage], size: int, progress: bool) -> _Store:
    from scipy import ndimage
    from tqdm import tqdm

    sharp, heads, content = [], [], []
    for item in tqdm(images, desc="localiser: reading", unit="image", disable=not progress):
        try:
            pixels = load_pixels(item.xray)
        except (XbmdError, OSError, ValueError, KeyError) as exc:
            warnings.warn(f"{item.xray}: cannot be read, skipped ({exc})", stacklevel=3)
            continue
        image, box = preprocess(pixels, size)
        sharp.append(image)
        heads.append(
            [box.to_input(item.heads[s]) if item.heads[s] else (np.nan, np.nan) for s in SIDES]
        )
        content.append((box.pad_rc, box.resized_rc))
    if not sharp:
        raise InputError(f"none of the {len(images)} training radiographs could be read")
    smooth = [ndimage.gaussian_filter(s, 0.6) for s in sharp]
    as_tensor = lambda a: torch.from_numpy(np.stack(a))[:, None].float()  # noqa: E731
    return _Store(as_tensor(sharp), as_tensor(smooth), np.array(heads, dtype=float), content)


def _batch(
    store: _Store, order: np.ndarray, rng: np.random.Generator, settings: LocaliserSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch (images, targets, known) of random views."""
    n, size = settings.input_size, store.sharp.shape[-1]
    stored, heads, views = [], [], []
    for i in order:
        kind, view = _random_view(rng, size, store.content[i], store.heads[i], n)
        if kind == "negative":
            image = torch.from_numpy(synthetic_negative(rng, size))[None]
            stored.append(image)
            heads.append(np.full((2, 2), ABSENT))
        else:
            shrinks = view.scale > 1.3  # anti-alias views that shrink the stored image
            stored.append((store.smooth if shrinks else store.sharp)[i])
            heads.append(store.heads[i])
        views.append(view)
    images, targets, known = render_views(
        torch.stack(stored), np.array(heads), views, n, settings.sigma_px
    )
    return _photometric(images, rng), targets, known


def heatmap_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-pixel classes (background, right head, left head) against the soft
    Gaussian targets, target pixels weighted (1 + ``POSITIVE_WEIGHT`` x target). An unknown
    side is merged with the background: there, 'background or that head' is the class."""
    logp = torch.log_softmax(logits, 1)
    unknown_log = torch.log(1 - known)[..., None, None]  # 0 where unknown, -inf where known
    log_background = torch.logsumexp(torch.cat([logp[:, :1], logp[:, 1:] + unknown_log], 1), 1)
    heads = targets.sum(1)
    nll = -((1 - heads).clamp(min=0) * log_background + (targets * logp[:, 1:]).sum(1))
    return (nll * (1 + POSITIVE_WEIGHT * heads)).mean()


def train_localiser(
    dataset: Path | list[Path], settings: LocaliserSettings, progress: bool = True
) -> tuple[Localiser, dict]:
    """Train a localiser on the radiographs of one or more ``xbmd prepare`` datasets.

    Returns the model (eval mode) and the training report: 'epochs', 'steps', 'seconds',
    'final_loss' (mean of the last epoch), 'n_images', 'datasets'. Deterministic for a seed (on
    one machine and thread count).
    """
    datasets = [Path(dataset)] if isinstance(dataset, (str, Path)) else [Path(d) for d in dataset]
    images = [image for d in datasets for image in localiser_training_set(d)]
    if not images:
        names = ", ".join(str(d) for d in datasets)
        raise InputError(f"none of the training radiographs of {names} could be read")
    model, report = fit_localiser(images, settings, progress)
    report["datasets"] = [str(d) for d in datasets]
    model.provenance = report
    return model, report


def fit_localiser(
    images: list[TrainingImage], settings: LocaliserSettings, progress: bool = True
) -> tuple[Localiser, dict]:
    """Train a localiser on a list of radiographs (:func:`train_localiser` without datasets)."""
    from tqdm import tqdm

    if not images:
        raise InputError("no training radiographs")
    start = time.perf_counter()
    store = _load_store(images, STORE_FACTOR * settings.input_size, progress)
    load_seconds = time.perf_counter() - start
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = Localiser(settings)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    total = settings.epochs * settings.steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total))),
    )
    n_images = len(store.content)
    queue: list[int] = []
    losses: list[float] = []
    bar = tqdm(total=total, desc="localiser: training", unit="step", disable=not progress)
    for _ in range(total):
        while len(queue) < settings.batch_size:  # every radiograph equally often
            queue.extend(rng.permutation(n_images).tolist())
        order, queue = np.array(queue[: settings.batch_size]), queue[settings.batch_size :]
        images_b, targets, known = _batch(store, order, rng, settings)
        loss = heatmap_loss(model.logits(images_b), targets, known)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    report = {
        "epochs": settings.epochs,
        "steps": total,
        "seconds": round(time.perf_counter() - start, 2),
        "load_seconds": round(load_seconds, 2),
        "final_loss": float(np.mean(losses[-settings.steps_per_epoch :])),
        "n_images": n_images,
        "n_heads": int(np.isfinite(store.heads).all(-1).sum()),
        "settings": asdict(settings),
    }
    model.provenance = report
    return model, report
