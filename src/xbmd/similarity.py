"""Image similarity: gradient correlation (GC) and normalised cross-correlation (NCC) for 2D-3D
registration, GC and PSNR of image pairs for training and evaluation.

Both compare a batch of DRRs (B, H, W) with one radiograph (H, W) inside a mask, in PyTorch, so
the registration can differentiate them with respect to the poses.

Gradient correlation (Penney et al., IEEE TMI 1998): the mean of the normalised cross-correlations
of the horizontal and of the vertical Sobel gradients. It ignores a radiograph's unknown offset and
gain, and depends little on its processing (log, look-up table, edge enhancement), because it only
asks that the edges be in the same places with the same sign. Values lie in [-1, 1].

The radiograph's collimated field: outside it the image is a shutter (black, white) or the
saturated direct beam; :func:`field_mask` finds that region so that its border edge does not
count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SIMILARITIES = ("gc", "ncc")
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
#: Pixels of the field border left out of the comparison (Sobel support, collimator penumbra).
FIELD_MARGIN_PX = 4


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row Sobel gradients of (B, H, W) images, each (B, H - 2, W - 2) (valid part)."""
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(image.dtype)
    g = F.conv2d(image[:, None], kernel)
    return g[:, 0], g[:, 1]


def _ncc(moving: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted NCC of (B, H, W) with (H, W) over ``weight`` (H, W) in {0, 1}; (B,)."""
    n = weight.sum().clamp_min(1.0)
    fm = fixed - (fixed * weight).sum() / n
    mm = moving - (moving * weight).sum(dim=(1, 2), keepdim=True) / n
    num = (mm * fm * weight).sum(dim=(1, 2))
    den = torch.sqrt((mm * mm * weight).sum(dim=(1, 2)) * (fm * fm * weight).sum() + 1e-20)
    return num / den


def similarity(
    moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor, kind: str = "gc"
) -> torch.Tensor:
    """Similarity of each of ``moving`` (B, H, W) to ``fixed`` (H, W) inside ``mask`` (H, W).

    ``kind`` is 'gc' (gradient correlation) or 'ncc' (normalised cross-correlation of the
    intensities). Higher is more similar; 1 is a perfect (affine) match.

    Examples
    --------
    >>> img = torch.rand(32, 32)
    >>> round(float(similarity(3 * img[None] + 1, img, torch.ones(32, 32))[0]), 6)
    1.0
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be 'gc' or 'ncc', not {kind!r}")
    weight = mask.to(moving.dtype)
    if kind == "ncc":
        return _ncc(moving, fixed.to(moving.dtype), weight)
    mx, my = sobel(moving)
    fx, fy = sobel(fixed[None].to(moving.dtype))
    w = weight[1:-1, 1:-1]
    return 0.5 * (_ncc(mx, fx[0], w) + _ncc(my, fy[0], w))


def paired_gradient_correlation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient correlation of each pair of images: the mean NCC of their Sobel x and y
    gradients over the whole image. pred, target (B, H, W) -> (B,), in [-1, 1]."""

    def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
        b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
        return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)

    px, py = sobel(pred)
    tx, ty = sobel(target)
    return 0.5 * (ncc(px, tx) + ncc(py, ty))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per image, data range = the target's maximum. (B, H, W) -> (B,)."""
    mse = ((pred - target) ** 2).mean(dim=(1, 2)).clamp_min(1e-12)
    peak = target.amax(dim=(1, 2)).clamp_min(1e-6)
    return 10 * torch.log10(peak**2 / mse)


def field_mask(pixels: np.ndarray, margin_px: int = FIELD_MARGIN_PX) -> np.ndarray:
    """True inside a radiograph's collimated field (bool, same shape as ``pixels``).

    Outside is what touches the image border and is flat at the image's minimum or maximum value
    (an electronic shutter, or the clipped direct beam); the field's border is then eroded by
    ``margin_px`` so its edge never enters a comparison. An image without shutters is all True
    except the margin at the border.
    """
    img = np.asarray(pixels, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    flat = ndimage.maximum_filter(img, 3) - ndimage.minimum_filter(img, 3) == 0
    shutter = flat & ((img == lo) | (img == hi))
    labels, n = ndimage.label(shutter)
    if n:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        # the flatness test misses the shutter's last pixel ring: give it back
        outside = ndimage.binary_dilation(np.isin(labels, border[border > 0]))
    else:
        outside = np.zeros(img.shape, dtype=bool)
    inside = ~outside
    if margin_px <= 0:
        return inside
    inside[:margin_px] = inside[-margin_px:] = False
    inside[:, :margin_px] = inside[:, -margin_px:] = False
    return ndimage.binary_erosion(inside, iterations=margin_px)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """(H // f, W // f) means of f x f blocks (trailing rows and columns dropped)."""
    if factor == 1:
        return np.asarray(image, dtype=np.float32)
    h, w = (n - n % factor for n in image.shape)
    return (
        image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    ).astype(np.float32)


def block_all(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H // f, W // f): True where a whole f x f block of ``mask`` is True."""
    if factor == 1:
        return np.asarray(mask, dtype=bool)
    h, w = (n - n % factor for n in mask.shape)
    return mask[:h, :w].reshape(h // factor, factor, w // factor, factor).all(axis=(1, 3))
