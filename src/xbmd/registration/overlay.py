"""Registration overlays: the registered bodies' DRR edges drawn over the radiograph.

A person checks a registration at a glance: each bone's outline (edges of its DRR in the registered
pose, Canny on a smoothed DRR) in its own colour over the radiograph, with each body's similarity
and quality flag written on the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xbmd.drr import render

#: Outline colours (RGB) per body.
COLOURS = {
    "pelvis": (0, 220, 255),
    "femur_right": (255, 210, 0),
    "femur_left": (255, 60, 200),
}
#: Longest side of the written overlay, px.
MAX_SIDE_PX = 1400


def _display(pixels: np.ndarray) -> np.ndarray:
    """0-255 grey from the 1st-99th percentile of the radiograph."""
    lo, hi = np.percentile(pixels, [1, 99])
    return np.clip((pixels - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)


def body_outlines(scene, registration, binning: int) -> dict[str, np.ndarray]:
    """Bool edge maps (rows // binning, cols // binning) of each registered body's DRR."""
    from skimage.feature import canny

    geometry = registration.geometry.binned(binning)
    out = {}
    for name, result in registration.bodies.items():
        with torch.no_grad():
            drr = render(scene.bodies[name], torch.as_tensor(result.pose.vector), geometry)[0]
        drr = drr.numpy()
        scale = float(np.percentile(drr[drr > 0], 95)) if np.any(drr > 0) else 1.0
        out[name] = canny(drr / scale, sigma=1.5, low_threshold=0.08, high_threshold=0.2)
    return out


def write_registration_overlay(
    pixels: np.ndarray, scene, registration, path: str | Path, title: str | None = None
) -> Path:
    """Write a PNG of the radiograph with the registered bodies' outlines; returns the path."""
    from PIL import Image, ImageDraw

    rows, cols = pixels.shape
    binning = max(1, int(np.ceil(max(rows, cols) / MAX_SIDE_PX)))
    h, w = rows // binning, cols // binning
    grey = _display(
        pixels[: h * binning, : w * binning].reshape(h, binning, w, binning).mean((1, 3))
    )
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for name, edges in body_outlines(scene, registration, binning).items():
        edges = edges[:h, :w]
        rgb[edges] = COLOURS.get(name, (255, 0, 0))
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    lines = [title] if title else []
    for name, result in registration.bodies.items():
        state = "FLAGGED: " + "; ".join(result.reasons) if result.flagged else "good"
        lines.append(f"{name}: similarity {result.similarity:.3f}, {state}")
    y = 6
    for n, text in enumerate(lines):
        name = (
            list(registration.bodies)[n - (1 if title else 0)] if n >= (1 if title else 0) else ""
        )
        colour = COLOURS.get(name, (255, 255, 255))
        draw.text((8, y), text, fill=colour)
        y += 14
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
