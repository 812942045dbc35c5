"""The hip localiser at inference: finds each femoral head on a whole AP pelvis or hip radiograph.

``xbmd estimate`` crops each hip around its femoral head (:func:`xbmd.dataset.hip.hip_crop`);
this module says where the heads are. A small fully-convolutional network (a MONAI-identical
``UNet`` from :mod:`xbmd.model.blocks`, batch norm) maps the radiograph, fitted into a square
input (:func:`preprocess`; nothing depends on the pixel spacing, which PNG inputs may lack), to
per-pixel probabilities of three classes:
background, the patient's RIGHT femoral head (the image's left on an AP view), the patient's
LEFT femoral head. The two head channels are the heatmaps (``Localiser.forward``).

:func:`locate_heads` looks at the radiograph and at its mirror image (channels swapped back),
averages, and takes each channel's highest peak: its height is the confidence (0..1), its
position the centroid of the values above half its height (sub-pixel).

Training is in ``xbmd.learn.localiser``.

Example
-------
>>> model = localiser_from_state(bundle["localiser"])  # doctest: +SKIP
>>> locate_heads(model, read_xray("pelvis.dcm").pixels)  # doctest: +SKIP
[HeadDetection(side='right', row=702.3, col=318.9, confidence=0.91), ...]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch.nn import functional as F

from xbmd import __version__
from xbmd.errors import InputError
from xbmd.geometry import SIDES

STATE_FORMAT = "xbmd-hip-localiser"
#: 2: three classes (background, right, left) by softmax; version 1 had two squared-error
#: heatmaps and cannot be read.
STATE_FORMAT_VERSION = 2
#: Intensity percentiles mapped to 0 and 1 by :func:`normalise_intensity`.
NORMALISE_PERCENTILES = (1.0, 99.0)
#: Training radiographs are kept at this many times the input size, so that zoomed views stay
#: sharp.
STORE_FACTOR = 2
#: Two peaks (right, left) closer than this fraction of the input size are the same head seen as
#: both sides: only the stronger is reported.
MIN_SEPARATION = 0.1


@dataclass(frozen=True)
class HeadDetection:
    """One femoral head found on a radiograph.

    Attributes
    ----------
    side : 'right' or 'left', the patient's side.
    row, col : the head centre, continuous pixel coordinates of the radiograph given.
    confidence : the heatmap peak height, 0..1.
    """

    side: str
    row: float
    col: float
    confidence: float


@dataclass
class LocaliserSettings:
    """How the localiser is built and trained.

    Attributes
    ----------
    input_size : side of the square network input, pixels (a multiple of 2**(levels - 1)).
    channels : UNet feature channels per level (levels = len(channels)).
    res_units : residual units per UNet block.
    epochs, steps_per_epoch, batch_size : training length. An epoch is ``steps_per_epoch``
        batches of random views, spread evenly over the radiographs, so that training time does
        not grow with the dataset.
    lr : peak learning rate (Adam, linear warm-up then cosine decay).
    sigma_px : Gaussian target width, input pixels.
    seed : seed of every random draw in training (initialisation, views, augmentation).
    threshold : confidence below which a head counts as absent.
    """

    input_size: int = 128
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    res_units: int = 1
    epochs: int = 30
    steps_per_epoch: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    sigma_px: float = 3.0
    seed: int = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        stride = 2 ** (len(self.channels) - 1)
        if len(self.channels) < 2 or self.input_size % stride or self.input_size < 2 * stride:
            raise InputError(
                f"input_size ({self.input_size}) must be a multiple of 2**(levels - 1) = {stride} "
                f"and at least twice it, for channels {self.channels} (at least 2 levels)"
            )
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not (self.sigma_px > 0 and self.lr > 0 and 0 < self.threshold < 1):
            raise InputError("sigma_px and lr must be positive and threshold in (0, 1)")


# ------------------------------------------------------------------------------------------------
# Preprocessing: any radiograph -> the square network input, and back


@dataclass(frozen=True)
class Letterbox:
    """How a radiograph was fitted into the square input: ``input_rc = image_rc * scale + offset``.

    Continuous pixel coordinates (pixel centres at integers) on both sides; per axis because the
    resized size is rounded to whole pixels.
    """

    input_size: int
    scale_rc: tuple[float, float]
    offset_rc: tuple[float, float]
    resized_rc: tuple[int, int]
    pad_rc: tuple[int, int]

    def to_input(self, rc: np.ndarray) -> np.ndarray:
        """Radiograph (row, col) points (..., 2) -> input (row, col) (..., 2)."""
        return np.asarray(rc, dtype=float) * self.scale_rc + self.offset_rc

    def to_image(self, rc: np.ndarray) -> np.ndarray:
        """Input (row, col) points (..., 2) -> radiograph (row, col) (..., 2)."""
        return (np.asarray(rc, dtype=float) - self.offset_rc) / self.scale_rc

    def then(self, other: Letterbox) -> Letterbox:
        """This fit followed by ``other``, a fit of this fit's square input."""
        scale = np.multiply(self.scale_rc, other.scale_rc)
        offset = np.multiply(self.offset_rc, other.scale_rc) + other.offset_rc
        resized = np.rint(np.multiply(self.resized_rc, other.scale_rc)).astype(int)
        pad = np.rint(np.multiply(self.pad_rc, other.scale_rc) + other.pad_rc).astype(int)
        return Letterbox(
            other.input_size,
            (float(scale[0]), float(scale[1])),
            (float(offset[0]), float(offset[1])),
            (int(resized[0]), int(resized[1])),
            (int(pad[0]), int(pad[1])),
        )


def letterbox(shape: tuple[int, int], input_size: int) -> Letterbox:
    """The fit of an image of ``shape`` (rows, cols) into ``input_size`` squared: the longer side
    scaled to ``input_size``, aspect kept, the other side padded equally on both ends."""
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1:
        raise InputError(f"image must have at least one pixel, got shape {shape}")
    factor = input_size / max(rows, cols)
    resized = (max(1, round(rows * factor)), max(1, round(cols * factor)))
    scale = (resized[0] / rows, resized[1] / cols)
    pad = ((input_size - resized[0]) // 2, (input_size - resized[1]) // 2)
    # resizing maps pixel centres as (x + 0.5) * scale - 0.5 (half-pixel convention)
    offset = tuple(0.5 * s - 0.5 + p for s, p in zip(scale, pad, strict=True))
    return Letterbox(input_size, scale, offset, resized, pad)


def normalise_intensity(pixels: np.ndarray) -> np.ndarray:
    """Robust intensity scale: the ``NORMALISE_PERCENTILES`` of the finite values to 0 and 1,
    clipped to [-0.5, 1.5]; non-finite values become 0. A constant image becomes 0."""
    img = np.asarray(pixels, dtype=np.float32)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, np.float32)
    low, high = np.percentile(img[finite], NORMALISE_PERCENTILES)
    if high <= low:
        return np.zeros(img.shape, np.float32)
    out = np.clip((img - low) / (high - low), -0.5, 1.5)
    return np.where(finite, out, 0).astype(np.float32)


def preprocess(pixels: np.ndarray, input_size: int) -> tuple[np.ndarray, Letterbox]:
    """A radiograph as the square network input.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols), bone bright (``XRay.pixels``), any intensity units.
    input_size : side of the square output, pixels.

    Returns
    -------
    image : ndarray (input_size, input_size) float32, resized with anti-aliasing (bilinear),
        intensity-normalised (:func:`normalise_intensity`), padded with 0.
    box : Letterbox, to map input coordinates back to the radiograph's.
    """
    img = np.asarray(pixels, dtype=np.float32)
    if img.ndim != 2:
        raise InputError(f"radiograph pixels must be 2D (rows, cols), got shape {img.shape}")
    box = letterbox(img.shape, input_size)
    finite = np.isfinite(img)
    fill = float(np.median(img[finite])) if finite.any() else 0.0
    resized = _resize(np.where(finite, img, fill), box.resized_rc)
    out = np.zeros((input_size, input_size), np.float32)
    (r0, c0), (nr, nc) = box.pad_rc, box.resized_rc
    out[r0 : r0 + nr, c0 : c0 + nc] = normalise_intensity(resized)
    return out, box


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with anti-aliasing, pixel centres mapped as (x + 0.5) * scale - 0.5."""
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


# ------------------------------------------------------------------------------------------------
# The network


class Localiser(torch.nn.Module):
    """Radiograph -> two head heatmaps (right, left). Holds its settings.

    ``forward`` takes (batch, 1, n, n) preprocessed images (n = ``input_size``) and returns
    (batch, 2, n, n) heatmaps: the probabilities of the right and the left head classes (near 1
    at a head centre, near 0 elsewhere). ``logits`` gives the three classes' logits.
    """

    def __init__(self, settings: LocaliserSettings) -> None:
        super().__init__()
        from xbmd.model.blocks import UNet

        self.settings = settings
        #: How the weights were made (the training report), kept in the state.
        self.provenance: dict = {}
        self.net = UNet(
            in_channels=1,
            out_channels=1 + len(SIDES),  # background, right head, left head
            channels=settings.channels,
            res_units=settings.res_units,
            # batch norm: on the benchmark, after 300 steps, it had found the heads (median
            # 3.9 mm) where MONAI's default instance norm had not (median 110 mm)
            norm="batch",
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 3, n, n) class logits: background, right head, left head."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), 1)[:, 1:]


def localiser_state(model: Localiser) -> dict:
    """A plain dict (settings, weights, provenance) to embed in a bundle saved with torch.save."""
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "xbmd_version": __version__,
        "settings": asdict(model.settings),
        "provenance": dict(model.provenance),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def localiser_from_state(state: dict) -> Localiser:
    """The localiser saved by :func:`localiser_state`, in eval mode."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"not a hip localiser state (format {STATE_FORMAT!r} expected)")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise InputError(
            f"hip localiser state version {state.get('format_version')!r} is not supported "
            f"(this xbmd reads version {STATE_FORMAT_VERSION}): train the localiser again"
        )
    known = {f.name for f in fields(LocaliserSettings)}
    unknown = sorted(set(state["settings"]) - known)
    if unknown:
        raise InputError(f"hip localiser state has unknown settings {unknown}; known: {known}")
    model = Localiser(LocaliserSettings(**state["settings"]))
    model.load_state_dict(state["state_dict"])
    model.provenance = dict(state.get("provenance", {}))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Inference


def localiser_heatmaps(model: Localiser, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]:
    """A radiograph's head heatmaps and the fit that maps their pixels to the radiograph's.

    The radiograph is preprocessed as in training (at ``STORE_FACTOR`` x the input size, then
    resized to it), and looked at twice: as it is and mirrored, the mirrored look's channels
    swapped back (a mirrored right hip looks like a left hip), the two averaged. This halves
    the bias the network has between the sides and makes the answer exactly mirror-symmetric.

    Returns
    -------
    heat : ndarray (2, n, n) float32, n = ``input_size``: right, left.
    box : Letterbox, radiograph (row, col) <-> heatmap (row, col).
    """
    heat, box, _ = _heatmaps(model, pixels)
    return heat, box


def _heatmaps(model: Localiser, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox, bool]:
    """:func:`localiser_heatmaps`, and whether the radiograph has any contrast."""
    n = model.settings.input_size
    stored, box = preprocess(pixels, STORE_FACTOR * n)
    image = torch.from_numpy(_resize(stored, (n, n)))[None, None]
    heat = _predict(model, torch.cat([image, image.flip(-1)]))
    heat = 0.5 * (heat[0] + heat[1, ::-1, :, ::-1])
    return heat.astype(np.float32), box.then(letterbox(stored.shape, n)), bool(stored.any())


def locate_heads(model: Localiser, pixels: np.ndarray) -> list[HeadDetection]:
    """The femoral heads on a radiograph: one detection per side whose confidence reaches the
    model's ``threshold`` (0, 1 or 2), right first.

    Parameters
    ----------
    model : a trained Localiser.
    pixels : ndarray of shape (rows, cols), bone bright (``XRay.pixels``).

    Returns
    -------
    list of HeadDetection, (row, col) in the radiograph's pixels.

    Examples
    --------
    >>> locate_heads(model, read_xray("pelvis.dcm").pixels)  # doctest: +SKIP
    [HeadDetection(side='right', row=702.3, col=318.9, confidence=0.91), ...]
    """
    settings = model.settings
    heat, box, contrast = _heatmaps(model, pixels)
    if not contrast:
        return []  # a blank or constant image: nothing to see
    peaks = [heatmap_peak(h, settings.sigma_px) for h in heat]
    (r0, c0, p0), (r1, c1, p1) = peaks
    if math.hypot(r0 - r1, c0 - c1) < MIN_SEPARATION * settings.input_size:
        peaks[int(p0 >= p1)] = (r0, c0, 0.0)  # one head seen as both sides: keep the stronger
    found = []
    for side, (row, col, peak) in zip(SIDES, peaks, strict=True):
        confidence = float(np.clip(peak, 0.0, 1.0))
        if confidence >= settings.threshold:
            image_rc = box.to_image([row, col])
            found.append(HeadDetection(side, float(image_rc[0]), float(image_rc[1]), confidence))
    return found


def _predict(model: Localiser, images: torch.Tensor) -> np.ndarray:
    """Heatmaps (batch, 2, n, n) of inputs (batch, 1, n, n), in eval mode, no gradients."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        heat = model(images.float()).numpy()
    model.train(was_training)
    return heat


def heatmap_peak(heatmap: np.ndarray, sigma_px: float) -> tuple[float, float, float]:
    """(row, col, height) of a heatmap's highest peak; (row, col) is the centroid of the peak's
    values above half its height, within 2 sigma of the maximum (sub-pixel, unbiased for a
    Gaussian)."""
    heat = np.asarray(heatmap, dtype=np.float64)
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    peak = float(heat[r, c])
    radius = max(2, math.ceil(2 * sigma_px))
    rows_n, cols_n = heat.shape
    rs = slice(max(r - radius, 0), min(r + radius + 1, rows_n))
    cs = slice(max(c - radius, 0), min(c + radius + 1, cols_n))
    weights = np.clip(heat[rs, cs] - 0.5 * peak, 0, None)
    if peak <= 0 or weights.sum() <= 0:
        return float(r), float(c), peak
    rows, cols = np.mgrid[rs, cs]
    total = weights.sum()
    return float((weights * rows).sum() / total), float((weights * cols).sum() / total), peak
