"""The figures of ``xbmd estimate`` (8-bit happens only here): the virtual X-ray, the overlay on
the radiograph, the overview of a whole radiograph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xbmd.estimation.result import HipResult, crop_box_px, warp_to_image

#: Colour scale of the virtual X-ray figures, g/cm2 (the training DRRs peak at about 3.3).
DISPLAY_MAX_G_CM2 = 3.5


#: Longest side of the overview and overlay images, pixels.
OVERVIEW_MAX_PX = 700


OVERLAY_MAX_PX = 420


#: Figures larger than this as true-colour PNG are written with 256 colours.
MAX_PNG_BYTES = 150_000


#: Colour map of the virtual X-ray.
COLOUR_MAP = "inferno"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG at 100 dpi; as 256 colours when true colour exceeds
    ``MAX_PNG_BYTES`` (noisy radiographs compress badly)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


def _title(r: HipResult) -> str:
    bmd = f"{r.bmd_g_cm2:.3f} g/cm2" if r.bmd_g_cm2 is not None else "-"
    t = f"T {r.t_score:+.1f} ({r.who_category})" if r.t_score is not None else "no T-score"
    flag = "" if r.confident else ", NOT CONFIDENT"
    return f"{r.side} hip: BMD {bmd}, {t}{flag}"


def write_virtual_xray_png(r: HipResult, path: str | Path) -> Path:
    """The virtual X-ray (canonical orientation) colour-mapped, region outlined, colour bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    shown = ax.imshow(r.virtual_xray_g_cm2, cmap=COLOUR_MAP, vmin=0, vmax=DISPLAY_MAX_G_CM2)
    if r.pf_region.any():
        ax.contour(r.pf_region.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_axis_off()
    mirrored = "\n(left hip mirrored: shown as a right hip)" if r.crop.mirrored else ""
    ax.set_title(_title(r) + mirrored, fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="virtual X-ray, g/cm2")
    return _save(fig, Path(path))


def _display_grid(box_rc: np.ndarray, shape: tuple[int, int], max_px: int, margin: float = 0.1):
    """A display grid over a box of the radiograph: (origin_rc (int), step, (rows, cols))."""
    lo, hi = box_rc.min(axis=0), box_rc.max(axis=0)
    pad = margin * (hi - lo)
    lo = np.maximum(np.floor(lo - pad), 0).astype(int)
    hi = np.minimum(hi + pad, np.asarray(shape) - 1)
    step = max(1, int(np.ceil((hi - lo).max() / max_px)))
    size = tuple(int(n) for n in np.maximum(np.floor((hi - lo) / step) + 1, 1))
    return lo, step, size


def _grey(pixels: np.ndarray, origin_rc, step: int, size) -> np.ndarray:
    """The radiograph on a display grid (area mean over step x step), 8-bit."""
    from xbmd.display import to_display_uint8

    r0, c0 = (int(v) for v in origin_rc)
    block = pixels[r0 : r0 + size[0] * step, c0 : c0 + size[1] * step].astype(np.float32)
    h, w = block.shape[0] // step, block.shape[1] // step
    block = block[: h * step, : w * step].reshape(h, step, w, step).mean(axis=(1, 3))
    return to_display_uint8(block)


def write_overlay_png(r: HipResult, path: str | Path) -> Path:
    """The radiograph around the hip in grey, the virtual X-ray warped back onto it in colour
    where the predicted region is, the head marked, a colour bar in g/cm2."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    pixels = r.xray.pixels
    origin, step, size = _display_grid(crop_box_px(r.crop), pixels.shape, OVERLAY_MAX_PX)
    r0, c0 = (int(v) for v in origin)
    grey = _grey(pixels, (r0, c0), step, size)
    centre = (r0 + (step - 1) / 2, c0 + (step - 1) / 2)
    affine = r.model_to_image
    drr = warp_to_image(r.virtual_xray_g_cm2, affine, grey.shape, centre, step)
    region = warp_to_image(r.pf_region.astype(np.float32), affine, grey.shape, centre, step)
    norm = Normalize(0, DISPLAY_MAX_G_CM2)
    colour = plt.get_cmap(COLOUR_MAP)(norm(drr))
    colour[..., 3] = 0.65 * np.clip(region, 0, 1)
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    ax.imshow(colour)
    to_display = lambda rc: (np.asarray(rc) - centre) / step  # noqa: E731
    box = to_display(np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]))
    ax.plot(box[:, 1], box[:, 0], color="yellow", lw=0.6, ls="--")
    head = to_display(r.head_px)
    ax.plot(head[1], head[0], "+", color="cyan", ms=12, mew=1.5)
    ax.set_axis_off()
    ax.set_title(f"{Path(r.image).name}\n{_title(r)}", fontsize=8)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=COLOUR_MAP)
    fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label="virtual X-ray, g/cm2")
    return _save(fig, Path(path))


def write_overview_png(results: list[HipResult], path: str | Path) -> Path:
    """The whole radiograph with each hip's crop box and its BMD / T-score."""
    plt = _pyplot()
    pixels = results[0].xray.pixels
    full = np.array([[0, 0], [pixels.shape[0] - 1, pixels.shape[1] - 1]], dtype=float)
    origin, step, size = _display_grid(full, pixels.shape, OVERVIEW_MAX_PX, margin=0.0)
    grey = _grey(pixels, origin, step, size)
    centre = np.array([(step - 1) / 2, (step - 1) / 2])
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * grey.shape[0] / grey.shape[1] + 0.4))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    for r in results:
        colour = "lime" if r.confident else "orange"
        box = (np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]) - centre) / step
        ax.plot(box[:, 1], box[:, 0], color=colour, lw=1.0)
        head = (np.asarray(r.head_px) - centre) / step
        ax.plot(head[1], head[0], "+", color=colour, ms=10)
        bmd = f"{r.bmd_g_cm2:.3f} g/cm2" if r.bmd_g_cm2 is not None else "-"
        t = f"T {r.t_score:+.1f}" if r.t_score is not None else "no T"
        ax.text(
            box[:, 1].min() + 3,
            box[:, 0].min() + 3,
            f"{r.side}\n{bmd}\n{t}" + ("" if r.confident else "\nnot confident"),
            color=colour,
            fontsize=8,
            va="top",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 2, "lw": 0},
        )
    ax.text(0.01, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=11, va="center")
    ax.text(0.97, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=11, va="center")
    ax.set_axis_off()
    ax.set_title(Path(results[0].image).name, fontsize=9)
    return _save(fig, Path(path))
