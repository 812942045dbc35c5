"""The figures of ``xbmd estimate`` (8-bit happens only here), made to be read by a clinician:

- ``overlay.png`` per hip: the radiograph around the hip with the region the number refers to
  (the total hip: the proximal femur without its head, outlined; the head dotted), beside the
  virtual X-ray of that hip in g/cm2, both as the radiograph shows the hip (a left hip is not
  mirrored here), under a title with the BMD, its 95 % interval, the T-score and the category
  statement;
- ``virtual_xray.png`` per hip: the virtual X-ray alone, with its colour bar;
- ``overview.png`` per image: the whole radiograph, each hip's box and its BMD and T-score.

Every figure carries the notice "research use only, not for diagnosis", and says so in red
when the estimate is not confident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xbmd.estimation.result import (
    RESEARCH_USE,
    HipResult,
    crop_box_px,
    warp_to_image,
)

#: Colour scale of the virtual X-ray figures, g/cm2 (the training DRRs peak at about 3.3).
DISPLAY_MAX_G_CM2 = 3.5
#: Longest side of the overview and of the overlay's radiograph panel, pixels.
OVERVIEW_MAX_PX = 800
OVERLAY_MAX_PX = 420
#: Figures larger than this as true-colour PNG are written with 256 colours.
MAX_PNG_BYTES = 150_000
#: Colour map of the virtual X-ray.
COLOUR_MAP = "inferno"
#: Outline colours: the region measured, the head left out.
REGION_COLOUR, HEAD_COLOUR = "cyan", "white"


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


def bmd_text(r: HipResult) -> str:
    """'0.812 g/cm2 (95 %: 0.74-0.89)', or '-'."""
    if r.bmd_g_cm2 is None:
        return "-"
    text = f"{r.bmd_g_cm2:.3f} g/cm2"
    if r.bmd_interval_g_cm2 is not None:
        lo, hi = r.bmd_interval_g_cm2
        text += f" (95 %: {lo:.2f}-{hi:.2f})"
    return text


def t_text(r: HipResult) -> str:
    if r.t_score is None:
        return "no T-score"
    text = f"T {r.t_score:+.1f}"
    if r.t_score_interval is not None:
        lo, hi = sorted(r.t_score_interval)
        text += f" ({lo:+.1f} to {hi:+.1f})"
    return text


def _title(r: HipResult) -> str:
    lines = [f"{r.side} hip: BMD {bmd_text(r)}, {t_text(r)}"]
    if r.category_statement:
        lines.append(r.category_statement)
    return "\n".join(lines)


def _notice(fig, r: HipResult | None = None) -> None:
    """The research-use notice at the foot of a figure, and NOT CONFIDENT in red."""
    confident = r is None or r.confident
    text = RESEARCH_USE.upper() + ("" if confident else "  -  NOT CONFIDENT: see warnings")
    fig.text(
        0.5, 0.005, text, ha="center", va="bottom", fontsize=8,
        color="black" if confident else "red", weight="bold",
    )  # fmt: skip


def _as_on_image(r: HipResult, image: np.ndarray) -> np.ndarray:
    """A canonical-orientation model map shown as the radiograph shows the hip."""
    return np.ascontiguousarray(image[:, ::-1]) if r.crop.mirrored else image


def write_virtual_xray_png(r: HipResult, path: str | Path) -> Path:
    """The virtual X-ray as the radiograph shows the hip, region outlined, colour bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    drr = _as_on_image(r, r.virtual_xray_g_cm2)
    shown = ax.imshow(drr, cmap=COLOUR_MAP, vmin=0, vmax=DISPLAY_MAX_G_CM2)
    region = _as_on_image(r, r.total_hip_region)
    if region.any():
        ax.contour(region.astype(float), levels=[0.5], colors=REGION_COLOUR, linewidths=0.9)
    ax.set_axis_off()
    ax.set_title(_title(r), fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="virtual X-ray, g/cm2")
    _notice(fig, r)
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
    """Left: the radiograph around the hip, the measured region (total hip, head excluded)
    outlined over the virtual X-ray in colour, the head dotted. Right: the virtual X-ray alone,
    as the radiograph shows the hip, with its colour bar. Title: BMD, interval, T, statement."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    pixels = r.xray.pixels
    origin, step, size = _display_grid(crop_box_px(r.crop), pixels.shape, OVERLAY_MAX_PX)
    grey = _grey(pixels, origin, step, size)
    centre = (origin[0] + (step - 1) / 2, origin[1] + (step - 1) / 2)
    affine = r.model_to_image
    warp = lambda m: warp_to_image(m, affine, grey.shape, centre, step)  # noqa: E731
    drr = warp(r.virtual_xray_g_cm2)
    region = warp(r.total_hip_region.astype(np.float32))
    head = warp(r.head_region.astype(np.float32))
    norm = Normalize(0, DISPLAY_MAX_G_CM2)
    colour = plt.get_cmap(COLOUR_MAP)(norm(drr))
    colour[..., 3] = 0.55 * np.clip(region, 0, 1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.6, 5.4), width_ratios=(1.15, 1))
    fig.subplots_adjust(top=0.78, bottom=0.06, wspace=0.08)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    ax.imshow(colour)
    if region.max() > 0.5:
        ax.contour(region, levels=[0.5], colors=REGION_COLOUR, linewidths=0.9)
    if head.max() > 0.5:
        ax.contour(head, levels=[0.5], colors=HEAD_COLOUR, linewidths=0.8, linestyles="dotted")
    to_display = lambda rc: (np.asarray(rc) - centre) / step  # noqa: E731
    box = to_display(np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]))
    ax.plot(box[:, 1], box[:, 0], color="yellow", lw=0.6, ls="--")
    ax.set_axis_off()
    ax.set_title(
        "radiograph: total hip region (cyan) measured,\nfemoral head (dotted) left out", fontsize=8
    )
    shown = ax2.imshow(
        _as_on_image(r, r.virtual_xray_g_cm2), cmap=COLOUR_MAP, vmin=0, vmax=DISPLAY_MAX_G_CM2
    )
    ax2.contour(
        _as_on_image(r, r.total_hip_region).astype(float), levels=[0.5], colors=REGION_COLOUR,
        linewidths=0.8,
    )  # fmt: skip
    ax2.set_axis_off()
    ax2.set_title("virtual X-ray of the proximal femur", fontsize=8)
    fig.colorbar(shown, ax=ax2, fraction=0.046, pad=0.02, label="g/cm2")
    fig.suptitle(f"{Path(r.image).name}\n{_title(r)}", fontsize=9, y=0.98)
    _notice(fig, r)
    return _save(fig, Path(path))


def write_overview_png(results: list[HipResult], path: str | Path) -> Path:
    """The whole radiograph with each hip's crop box and its BMD, interval and T-score."""
    plt = _pyplot()
    pixels = results[0].xray.pixels
    full = np.array([[0, 0], [pixels.shape[0] - 1, pixels.shape[1] - 1]], dtype=float)
    origin, step, size = _display_grid(full, pixels.shape, OVERVIEW_MAX_PX, margin=0.0)
    grey = _grey(pixels, origin, step, size)
    centre = np.array([(step - 1) / 2, (step - 1) / 2])
    width = 8.0
    fig, ax = plt.subplots(figsize=(width, width * grey.shape[0] / grey.shape[1] + 0.6))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    for r in results:
        colour = "lime" if r.confident else "orange"
        box = (np.vstack([crop_box_px(r.crop), crop_box_px(r.crop)[:1]]) - centre) / step
        ax.plot(box[:, 1], box[:, 0], color=colour, lw=1.2)
        head = (np.asarray(r.head_px) - centre) / step
        ax.plot(head[1], head[0], "+", color=colour, ms=12)
        lines = [f"{r.side} hip", f"BMD {bmd_text(r)}", t_text(r)]
        if r.who_category:
            lines.append(r.who_category)
        if not r.confident:
            lines.append("NOT CONFIDENT")
        ax.text(
            box[:, 1].min() + 4, box[:, 0].min() + 4, "\n".join(lines), color=colour, fontsize=10,
            va="top", bbox={"facecolor": "black", "alpha": 0.6, "pad": 3, "lw": 0},
        )  # fmt: skip
    ax.text(0.01, 0.02, "R", color="yellow", transform=ax.transAxes, fontsize=13, va="bottom")
    ax.text(0.97, 0.02, "L", color="yellow", transform=ax.transAxes, fontsize=13, va="bottom")
    ax.set_axis_off()
    ax.set_title(Path(results[0].image).name, fontsize=10)
    _notice(fig, None if all(r.confident for r in results) else results[0])
    return _save(fig, Path(path))
