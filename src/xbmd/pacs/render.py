"""The overlay image of xbmd's DICOM Secondary Capture and of the worklist (numpy and PIL only).

The radiograph in grey at a fixed display size, each hip's virtual X-ray (g/cm2) in colour where
the predicted proximal-femur region is, the crop box and femoral head, each hip's numbers, and a
banner burned in above the image: "RESEARCH USE ONLY - NOT FOR DIAGNOSIS". matplotlib is not used
here: it costs about 0.2 s per figure, against a service target of 0.2 s per radiograph for
everything (docs/pacs.md).

8-bit happens only in this module (and ``xbmd.estimation.figures``), for looking at.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xbmd.display import to_display_uint8
from xbmd.estimation.figures import DISPLAY_MAX_G_CM2
from xbmd.estimation.result import crop_box_px

BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
#: Longest side of the radiograph in the overlay, pixels.
DISPLAY_PX = 1024
#: Opacity of the virtual X-ray over the radiograph.
OVERLAY_ALPHA = 0.6
#: The "inferno" colour map (matplotlib's, sampled at 9 points), interpolated to 256 entries.
_INFERNO_KNOTS = np.array(
    [
        [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
        [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
    ],
    dtype=np.float32,
)  # fmt: skip
LUT = np.stack(
    [np.interp(np.linspace(0, 8, 256), np.arange(9), _INFERNO_KNOTS[:, k]) for k in range(3)],
    axis=1,
).astype(np.uint8)
CONFIDENT_COLOUR = (80, 255, 80)
DOUBT_COLOUR = (255, 165, 0)
BANNER_COLOUR = (170, 0, 0)


def colour_map(values_g_cm2: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours of areal densities, 0 to ``DISPLAY_MAX_G_CM2``."""
    index = np.clip(np.asarray(values_g_cm2, np.float32) / DISPLAY_MAX_G_CM2, 0, 1) * 255
    return LUT[np.rint(index).astype(np.uint8)]


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in scalable font (no font files needed)."""
    return ImageFont.load_default(size=size)


def radiograph_display(pixels: np.ndarray, max_px: int = DISPLAY_PX) -> tuple[np.ndarray, float]:
    """The radiograph as 8-bit grey with its longest side ``max_px``, and the scale (display
    pixels per radiograph pixel). Block means first, so big radiographs stay fast."""
    pixels = np.asarray(pixels, dtype=np.float32)
    rows, cols = pixels.shape
    step = max(1, max(rows, cols) // max_px)
    h, w = rows // step, cols // step
    small = pixels[: h * step, : w * step].reshape(h, step, w, step).mean(axis=(1, 3))
    scale = max_px / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    grey = Image.fromarray(to_display_uint8(small)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(grey), scale


def _label(d: dict) -> list[str]:
    lines = [f"{d['side'].upper()} HIP"]
    bmd = d.get("bmd_g_cm2")
    lines.append(f"BMD {bmd:.3f} g/cm2" if bmd is not None else "BMD -")
    interval = d.get("bmd_interval_g_cm2")
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
        lines.append(f"interval {interval[0]:.3f}-{interval[1]:.3f}")
    t = d.get("t_score")
    if t is not None:
        lines.append(f"T {t:+.1f}  {d.get('who_category') or ''}".rstrip())
    if d.get("z_score") is not None:
        lines.append(f"Z {d['z_score']:+.1f}")
    if not d.get("confident", False):
        lines.append("NOT CONFIDENT")
    return lines


def render_overlay(results: list, footer: str = "") -> np.ndarray:
    """(rows, cols, 3) uint8: the annotated radiograph with the banner (module docstring).

    ``results`` are the ``HipResult`` of one radiograph, with their ``xray``.
    """
    xray = results[0].xray
    grey, scale = radiograph_display(xray.pixels)
    rows, cols = grey.shape
    canvas_img = Image.fromarray(grey).convert("RGBA")
    for r in results:
        canvas_img.alpha_composite(_hip_layer(r, scale, (rows, cols)))
    canvas_img = canvas_img.convert("RGB")
    draw = ImageDraw.Draw(canvas_img)
    text_font = font(max(13, cols // 55))
    for r in results:
        d = r.to_dict()
        colour = CONFIDENT_COLOUR if d.get("confident") else DOUBT_COLOUR
        box = crop_box_px(r.crop) * scale + (scale - 1) / 2
        draw.polygon([(float(c), float(rr)) for rr, c in box], outline=(255, 230, 0), width=1)
        hr, hc = (np.asarray(r.head_px) * scale + (scale - 1) / 2).tolist()
        arm = max(6, cols // 90)
        draw.line([(hc - arm, hr), (hc + arm, hr)], fill=(0, 255, 255), width=2)
        draw.line([(hc, hr - arm), (hc, hr + arm)], fill=(0, 255, 255), width=2)
        text = "\n".join(_label(d))
        x0 = float(np.clip(box[:, 1].min() + 4, 2, cols - 2))
        y0 = float(np.clip(box[:, 0].min() + 4, 2, rows - 2))
        bbox = draw.multiline_textbbox((x0, y0), text, font=text_font, spacing=2)
        if bbox[2] > cols - 2:  # keep the label inside the image
            x0 -= bbox[2] - (cols - 2)
            bbox = draw.multiline_textbbox((x0, y0), text, font=text_font, spacing=2)
        draw.rectangle([bbox[0] - 3, bbox[1] - 3, bbox[2] + 3, bbox[3] + 3], fill=(0, 0, 0))
        draw.multiline_text((x0, y0), text, font=text_font, fill=colour, spacing=2)
    return _with_banner(np.asarray(canvas_img), footer)


def pil_affine(model_to_image: np.ndarray, scale: float) -> tuple[float, ...]:
    """PIL's AFFINE coefficients that sample a model-grid image for each display pixel.

    ``model_to_image`` maps model (row, col) to radiograph (row, col), pixel centres at integers;
    display pixel u is radiograph point ``(u + 0.5) / scale - 0.5``. PIL maps output (x, y) to
    input (a x + b y + c, d x + e y + f) with pixel centres at +0.5 on both sides.
    """
    inverse = np.linalg.inv(model_to_image[:, :2])
    b = inverse / scale  # model (row, col) per display (row, col)
    c = inverse @ (np.full(2, 0.5 / scale - 0.5) - model_to_image[:, 2])
    return (
        b[1, 1], b[1, 0], c[1] - 0.5 * (b[1, 0] + b[1, 1]) + 0.5,
        b[0, 1], b[0, 0], c[0] - 0.5 * (b[0, 0] + b[0, 1]) + 0.5,
    )  # fmt: skip


def _hip_layer(r, scale: float, shape: tuple[int, int]) -> Image.Image:
    """RGBA layer of the display size: the hip's virtual X-ray in colour, opaque (by
    ``OVERLAY_ALPHA``) where its predicted region is; warped by PIL (bilinear)."""
    rgba = np.zeros((*r.virtual_xray_g_cm2.shape, 4), np.uint8)
    rgba[..., :3] = colour_map(r.virtual_xray_g_cm2)
    rgba[..., 3] = np.where(r.pf_region, round(255 * OVERLAY_ALPHA), 0)
    return Image.fromarray(rgba, "RGBA").transform(
        (shape[1], shape[0]),
        Image.Transform.AFFINE,
        pil_affine(r.model_to_image, scale),
        resample=Image.Resampling.BILINEAR,
    )


def _with_banner(image: np.ndarray, footer: str) -> np.ndarray:
    """The image with the research-use banner above and a footer line below."""
    rows, cols = image.shape[:2]
    banner_font = font(max(16, cols // 32))
    footer_font = font(max(11, cols // 75))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    banner_box = probe.textbbox((0, 0), BANNER, font=banner_font)
    banner_h = banner_box[3] - banner_box[1] + 16
    footer_h = (probe.textbbox((0, 0), footer or "x", font=footer_font)[3] + 10) if footer else 0
    canvas = Image.new("RGB", (cols, rows + banner_h + footer_h), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, cols - 1, banner_h - 1], fill=BANNER_COLOUR)
    x = max(2, (cols - (banner_box[2] - banner_box[0])) // 2)
    draw.text((x, 8 - banner_box[1]), BANNER, font=banner_font, fill=(255, 255, 255))
    if footer:
        draw.text((6, rows + banner_h + 4), footer, font=footer_font, fill=(220, 220, 220))
    return np.asarray(canvas)


def render_virtual_xray(result, size_px: int = 256) -> np.ndarray:
    """(size, size, 3) uint8: a hip's virtual X-ray (canonical orientation) in colour, the
    predicted proximal-femur region outlined in cyan."""
    colours = colour_map(result.virtual_xray_g_cm2)
    region = np.asarray(result.pf_region, bool)
    inner = region.copy()
    inner[1:-1, 1:-1] = (
        region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2]
        & region[1:-1, 2:]
    )  # fmt: skip
    colours[region & ~inner] = (0, 255, 255)
    return np.asarray(Image.fromarray(colours).resize((size_px, size_px), Image.Resampling.NEAREST))


def save_png(image: np.ndarray, path) -> None:
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
