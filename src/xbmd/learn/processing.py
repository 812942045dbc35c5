"""Processing augmentation: a random vendor-like processing chain on the model input.

Every device family processes its radiographs differently (``xbmd.synth.processing``: windowing
from a histogram, multi-scale contrast equalisation, noise reduction, an S-shaped LUT, storage at
a bit depth), and a hospital's device will be one more. The model must read the bone, not the
processing, so a share of the training inputs (``augment.processing_probability``) gets a chain
drawn at random, per image:

1. noise reduction: a Gaussian smoothing of sigma ``processing_smooth_sigma_px`` (input pixels);
2. multi-scale enhancement: two bands, ``x - G(r1) x`` (fine) and ``G(r1) x - G(r2) x`` (coarse),
   radii ``r1 < r2`` drawn log-uniformly in ``processing_enhance_radius_px``, each added back
   with a gain drawn in ``processing_enhance_gain`` (a positive fine gain is an unsharp mask, a
   negative coarse gain compresses the latitude);
3. windowing: the image is clipped to its percentiles ``p_lo`` and ``100 - p_hi`` inside the
   valid pixels, ``p_lo`` and ``p_hi`` drawn in ``[0, processing_window_percentile]``, and scaled
   to [0, 1];
4. a sigmoid LUT of slope drawn in ``processing_lut_slope`` (0: linear) around a centre drawn in
   [0.35, 0.65], scaled so that the window still maps to [0, 1];
5. 8-bit quantisation, for a share ``processing_quantise_probability`` of the processed images.

Blurs are normalised convolutions inside the valid pixels (the collimator edge does not bleed
in). The caller (:func:`xbmd.learn.data.augment`) normalises the input by its percentiles again
afterwards, as :func:`xbmd.model.inputs.model_input` does. All of it works on the batch at once;
random numbers come from the ``generator`` given (none are drawn when the probability is 0).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

#: The ``augment`` keys of processing augmentation and their defaults (off: probability 0).
PROCESSING_DEFAULTS: dict = {
    "processing_probability": 0.0,
    "processing_smooth_sigma_px": [0.0, 1.2],
    "processing_enhance_gain": [-0.5, 1.5],
    "processing_enhance_radius_px": [1.0, 16.0],
    "processing_window_percentile": 3.0,
    "processing_lut_slope": [0.0, 8.0],
    "processing_quantise_probability": 0.5,
}
#: Range of the sigmoid LUT's centre on the windowed [0, 1] axis.
LUT_CENTER = (0.35, 0.65)


def _uniform(lo: float, hi: float, n: int, generator, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)


def gaussian_blur(image: torch.Tensor, valid: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of (B, H, W) inside ``valid`` (normalised convolution), one sigma
    (px) per image (B,); sigma 0 leaves an image as it is. Outside ``valid``: 0."""
    b, h, w = image.shape
    sigma = sigma_px.to(image.dtype).clamp_min(1e-3)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, max(h, w) - 1)
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    k = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r + 1)
    mask = valid.to(image.dtype)
    # both the masked image and the mask, each image with its own kernel (grouped convolution)
    stacked = torch.cat([image * mask, mask])[None]  # (1, 2B, H, W)
    kernel = torch.cat([k, k])[:, None]  # (2B, 1, 2r + 1)
    out = F.conv2d(stacked, kernel[:, :, None, :], padding=(0, radius), groups=2 * b)
    out = F.conv2d(out, kernel[:, :, :, None], padding=(radius, 0), groups=2 * b)[0]
    num, den = out[:b], out[b:]
    return torch.where(valid, num / den.clamp_min(1e-6), 0.0)


def valid_percentile(image: torch.Tensor, valid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-image percentile (nearest rank) of (B, H, W) over its valid pixels; q (B,) in [0, 1]."""
    b = image.shape[0]
    flat = torch.where(valid, image, torch.inf).reshape(b, -1)
    ordered, _ = torch.sort(flat, dim=1)
    n = valid.reshape(b, -1).sum(1).clamp_min(1)
    rank = torch.round(q.to(image.dtype) * (n - 1).to(image.dtype)).long()
    return ordered.gather(1, rank[:, None])[:, 0]


def sigmoid_lut(x: torch.Tensor, slope: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """S-shaped LUT on [0, 1] -> [0, 1] per image: slope (B,) (0: identity), center (B,)."""
    s = slope[:, None, None].clamp_min(1e-3)
    c = center[:, None, None]
    lo, hi = torch.sigmoid(-s * c), torch.sigmoid(s * (1 - c))
    curve = (torch.sigmoid(s * (x - c)) - lo) / (hi - lo)
    return torch.where(slope[:, None, None] > 1e-3, curve, x)


def random_processing(
    image: torch.Tensor,
    valid: torch.Tensor,
    settings: dict,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random processing chain (module docstring) on a share of a batch.

    image (B, H, W) float, valid (B, H, W) bool; ``settings``: the config's ``augment`` section.
    Returns the batch with the chosen images processed (values in [0, 1] inside ``valid``, 0
    outside) and the others unchanged. Normalise it afterwards.
    """
    p = float(settings["processing_probability"])
    if p <= 0:
        return image
    b, dev = image.shape[0], image.device

    def draw(key: str) -> torch.Tensor:
        lo, hi = settings[key]
        return _uniform(float(lo), float(hi), b, generator, dev)

    chosen = (torch.rand(b, generator=generator) < p).to(dev)
    smooth = draw("processing_smooth_sigma_px")
    r_lo, r_hi = (math.log(max(float(r), 1e-3)) for r in settings["processing_enhance_radius_px"])
    radii = torch.exp(_uniform(r_lo, r_hi, 2 * b, generator, dev)).view(b, 2)
    radii, _ = torch.sort(radii, dim=1)
    gains = torch.stack([draw("processing_enhance_gain"), draw("processing_enhance_gain")], 1)
    w = float(settings["processing_window_percentile"]) / 100.0
    window = _uniform(0.0, w, 2 * b, generator, dev).view(b, 2)
    slope = draw("processing_lut_slope")
    center = _uniform(*LUT_CENTER, b, generator, dev)
    quantise = (
        torch.rand(b, generator=generator) < settings["processing_quantise_probability"]
    ).to(dev)

    x = gaussian_blur(image, valid, smooth)
    fine_blur = gaussian_blur(x, valid, radii[:, 0])
    coarse_blur = gaussian_blur(x, valid, radii[:, 1])
    x = (
        x
        + gains[:, 0, None, None] * (x - fine_blur)
        + gains[:, 1, None, None] * (fine_blur - coarse_blur)
    )
    lo = valid_percentile(x, valid, window[:, 0])
    hi = valid_percentile(x, valid, 1.0 - window[:, 1])
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    x = ((x - lo[:, None, None]) / span[:, None, None]).clamp(0, 1)
    x = sigmoid_lut(x, slope, center)
    x = torch.where(quantise[:, None, None], torch.round(x * 255.0) / 255.0, x)
    x = torch.where(valid, x, 0.0)
    return torch.where(chosen[:, None, None], x, image)
