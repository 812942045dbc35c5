"""Pictures for people: previews of quantitative maps, with their unit on a colour bar.

Maps stay float32 in physical units everywhere else; 8-bit only happens here, for display.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def write_preview_png(
    image: np.ndarray,
    path: str | Path,
    *,
    unit: str = "g/cm2",
    title: str | None = None,
    vmax: float | None = None,
) -> Path:
    """Save ``image`` (rows, cols) as a grey-scale PNG with a colour bar labelled ``unit``.

    The image is shown as a radiograph is read: bright = more material, patient's right on the
    left (xbmd's detector convention already does this; no flip here).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image, dtype=np.float32)
    rows, cols = image.shape
    hi = float(np.nanmax(image)) if vmax is None else vmax
    width = 5.0
    fig, ax = plt.subplots(figsize=(width + 1.2, width * rows / cols), dpi=100)
    shown = ax.imshow(image, cmap="gray", vmin=min(0.0, float(np.nanmin(image))), vmax=hi or 1.0)
    ax.set_axis_off()
    ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=12, va="center")
    ax.text(0.96, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=12, va="center")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=unit)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """An image in [0, 1] (rows, cols) after 8-bit JPEG compression at ``quality`` (float32)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(quality)
    )
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


def to_display_uint8(
    pixels: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """An 8-bit preview: clip to the given percentiles of the finite values, then scale to 0-255.

    For looking at, never for measuring. NaN and inf become 0; a constant image becomes 0.

    Parameters
    ----------
    pixels : ndarray of shape (rows, cols)
    percentiles : (float, float)
        Lower and upper percentiles (0-100) mapped to 0 and 255.

    Returns
    -------
    ndarray of uint8, same shape
    """
    arr = np.asarray(pixels, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    low, high = np.percentile(arr[finite], percentiles)
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = np.clip((arr - low) / (high - low), 0.0, 1.0) * 255.0
    return np.where(finite, np.rint(scaled), 0).astype(np.uint8)
