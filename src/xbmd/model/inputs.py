"""The model's input and its outputs' summary, shared by training and inference.

The model input is built by :func:`model_input` from a hip crop (``xbmd.dataset.hip``, 256 x 256
of 0.75 detector mm) in training and in ``xbmd estimate`` alike:

1. the crop and its valid mask are area-averaged to ``image_size`` (valid-weighted);
2. the X-ray is normalised by its 1st and 99th percentiles inside the valid pixels (so exposure,
   window and bit depth do not matter), clipped to ``CLIP``, and set to 0 where not valid;
3. channel 0 is that image, channel 1 the valid mask.

:func:`region_bmd` turns a virtual X-ray and its region into BMD_drr, the mean areal density
inside the region (g/cm2). :func:`kvp_features` is the regression head's kVp input of a model
trained with it (``regression.kvp``).
"""

from __future__ import annotations

import numpy as np
import torch

from xbmd.dataset.hip import CROP_SIZE_PX
from xbmd.errors import InputError
from xbmd.similarity import block_mean

#: Normalised X-ray values are clipped to this range.
CLIP = (-0.5, 1.5)
#: A crop pixel counts as valid at model resolution when this share of its block is valid.
VALID_SHARE = 0.5


def normalise(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Percentile normalisation inside ``valid`` (1st -> 0, 99th -> 1), clipped, 0 outside."""
    values = image[valid]
    if values.size < 16:
        return np.zeros_like(image, dtype=np.float32)
    lo, hi = np.percentile(values, [1.0, 99.0])
    scale = hi - lo if hi > lo else 1.0
    out = np.clip((image - lo) / scale, *CLIP)
    return np.where(valid, out, 0.0).astype(np.float32)


def model_input(xray: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """(2, size, size) float32 model input from a hip crop (CROP_SIZE_PX square) and its mask."""
    if xray.shape != (CROP_SIZE_PX, CROP_SIZE_PX) or valid.shape != xray.shape:
        raise InputError(
            f"a hip crop must be {CROP_SIZE_PX} x {CROP_SIZE_PX}, not {xray.shape} / {valid.shape}"
        )
    factor = CROP_SIZE_PX // size
    weight = block_mean(valid.astype(np.float32), factor)
    summed = block_mean(np.where(valid, xray, 0.0).astype(np.float32), factor)
    ok = weight >= VALID_SHARE
    image = np.where(ok, summed / np.maximum(weight, 1e-6), 0.0)
    return np.stack([normalise(image, ok), ok.astype(np.float32)])


def downsample_map(image: np.ndarray, size: int) -> np.ndarray:
    """Area average of a (256, 256) map (a DRR in g/cm2 keeps its units) to ``size``."""
    return block_mean(np.asarray(image, dtype=np.float32), image.shape[-1] // size)


#: The kVp input: (kVp - KVP_CENTER) / KVP_SCALE, with a flag saying it is known.
KVP_CENTER, KVP_SCALE = 75.0, 10.0
#: Tube voltages outside this range (kVp) are taken as unknown: no radiograph of the hip is
#: made outside it, so such a DICOM KVP is a wrong value, not a device setting.
KVP_PLAUSIBLE = (40.0, 150.0)


def kvp_features(kvp, n: int | None = None) -> np.ndarray:
    """(N, 2) float32 kVp input of the regression head: ``[(kVp - 75) / 10, 1]`` where the kVp
    is known, ``[0, 0]`` where not (None, NaN, or outside ``KVP_PLAUSIBLE``).

    ``kvp``: a number or None (the same for all ``n`` crops), or (N,) values, NaN = unknown.
    """
    values = np.atleast_1d(np.asarray(np.nan if kvp is None else kvp, dtype=np.float64))
    if values.ndim != 1:
        raise InputError(f"kvp must be one value or one per crop, not shape {values.shape}")
    if n is not None and values.size == 1:
        values = np.repeat(values, n)
    if n is not None and values.size != n:
        raise InputError(f"{values.size} kVp values for {n} crops")
    known = np.isfinite(values) & (values >= KVP_PLAUSIBLE[0]) & (values <= KVP_PLAUSIBLE[1])
    scaled = np.where(known, (np.where(known, values, KVP_CENTER) - KVP_CENTER) / KVP_SCALE, 0.0)
    return np.stack([scaled, known.astype(np.float64)], axis=1).astype(np.float32)


def region_bmd(drr: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean DRR inside the region per image (NaN where the region is empty). (B, H, W) -> (B,)."""
    region = region.to(drr.dtype)
    n = region.sum(dim=(1, 2))
    mean = (drr * region).sum(dim=(1, 2)) / n.clamp_min(1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
