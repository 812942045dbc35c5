"""X-ray physics of the virtual radiographs: attenuation, fluence, marker, scatter, exposure,
detection. Steps 1-5 of the chain in ``xbmd.synth.radiograph``:

1. attenuation (:func:`attenuation_at`): mono-energetic coefficients at the device's effective
   energy, from the bundled table ``xbmd/data/attenuation.json`` (written by
   ``scripts/make_attenuation_table.py`` from xraydb / Elam data).
2. primary fluence (:func:`relative_fluence`, :func:`field_weight`, :func:`marker_attenuation`):
   heel effect along the rows, cos^3 obliquity of the ray, the collimated field
   (:func:`collimation_mask`) with a penumbra, a lead side marker.
3. scatter (:func:`scatter_field`): a broad kernel applied to a scatter source proportional to
   ``primary x line integral``, scaled to the device's scatter-to-primary ratio (SPR).
4. exposure (:func:`incident_quanta_per_pixel`): automatic exposure control (AEC) or a fixed
   manual technique.
5. detection (:func:`quantum_noise`, :func:`detector_response`): Poisson quantum noise,
   scintillator / phosphor blur with a long tail, additive electronic noise.

Also the image helpers the processing shares (:func:`gaussian_px`, ``_spacing_pair``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry
from xbmd.synth.device import XrayDevice, _check_choice

#: Crystal density of hydroxyapatite, g/cm3: mineral replacing water displaces its own volume.
HA_DENSITY_G_CM3 = 3.16
MARKER_LETTERS = ("R", "L")


@dataclass(frozen=True)
class Attenuation:
    """Attenuation coefficients at one effective (mono-chromatic) energy.

    energy_kev : photon energy, keV.
    mu_water_per_cm : linear attenuation of water, 1/cm.
    ha_mass_cm2_g : mass attenuation of hydroxyapatite Ca10(PO4)6(OH)2, cm2/g.
    bone_excess_cm2_g : extra line integral per g/cm2 of mineral that replaces water,
        ``ha_mass_cm2_g - mu_water_per_cm / 3.16`` (cm2/g): total line integral = soft tissue
        line integral + bone_excess_cm2_g x mineral areal density (g/cm2).
    mu_adipose_per_cm, mu_muscle_per_cm : ICRU-46 adipose tissue 3 (0.95 g/cm3) and ICRU-44
        skeletal muscle (1.05 g/cm3), 1/cm, for reference.
    mu_lead_per_cm : lead (11.35 g/cm3), 1/cm, for the side marker.
    """

    energy_kev: float
    mu_water_per_cm: float
    ha_mass_cm2_g: float
    bone_excess_cm2_g: float
    mu_adipose_per_cm: float
    mu_muscle_per_cm: float
    mu_lead_per_cm: float


@cache
def _attenuation_table() -> dict:
    resource = resources.files("xbmd") / "data" / "attenuation.json"
    return json.loads(resource.read_text(encoding="utf-8"))


def _mu_mass_cm2_g(material: str, energy_kev: float) -> float:
    """Mass attenuation (cm2/g), interpolated linearly in log(mu) vs log(E)."""
    table = _attenuation_table()
    log_e = np.log(table["energies_kev"])
    log_mu = np.log(table["mass_attenuation_cm2_g"][material])
    return float(np.exp(np.interp(math.log(energy_kev), log_e, log_mu)))


def mu_linear_per_cm(material: str, energy_kev: float) -> float:
    """Linear attenuation (1/cm) of a material of the bundled table at its tabulated density
    (e.g. the implant metals 'ti6al4v', 'cocrmo', 'ss316l'), at ``energy_kev`` (30-100 keV).

    >>> round(mu_linear_per_cm("ti6al4v", 60.0), 2)
    3.28
    """
    table = _attenuation_table()
    _check_choice("material", material, tuple(table["mass_attenuation_cm2_g"]))
    low, high = table["energies_kev"][0], table["energies_kev"][-1]
    if not (math.isfinite(energy_kev) and low <= energy_kev <= high):
        raise InputError(f"energy_kev must be in [{low:g}, {high:g}] keV, not {energy_kev!r}")
    return _mu_mass_cm2_g(material, energy_kev) * table["densities_g_cm3"][material]


def attenuation_at(energy_kev: float) -> Attenuation:
    """Attenuation coefficients at ``energy_kev`` (30-100 keV), from the bundled table.

    >>> a = attenuation_at(60.0)
    >>> round(a.mu_water_per_cm, 3), a.bone_excess_cm2_g > 0
    (0.206, True)
    """
    table = _attenuation_table()
    low, high = table["energies_kev"][0], table["energies_kev"][-1]
    if not (math.isfinite(energy_kev) and low <= energy_kev <= high):
        raise InputError(f"energy_kev must be in [{low:g}, {high:g}] keV, not {energy_kev!r}")
    rho = table["densities_g_cm3"]
    mu = {name: _mu_mass_cm2_g(name, energy_kev) for name in table["mass_attenuation_cm2_g"]}
    mu_water = mu["water"] * rho["water"]
    return Attenuation(
        energy_kev=float(energy_kev),
        mu_water_per_cm=mu_water,
        ha_mass_cm2_g=mu["hydroxyapatite"],
        bone_excess_cm2_g=mu["hydroxyapatite"] - mu_water / HA_DENSITY_G_CM3,
        mu_adipose_per_cm=mu["adipose"] * rho["adipose"],
        mu_muscle_per_cm=mu["muscle"] * rho["muscle"],
        mu_lead_per_cm=mu["lead"] * rho["lead"],
    )


# ---- smoothing helpers ---------------------------------------------------------------------


def gaussian_px(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a 2D float image, sigma in pixels; wide kernels via a coarser grid.

    A sigma above 8 px is applied on an image block-averaged by ``f`` and linearly
    interpolated back; the box and the interpolation add variance f**2/12 + f**2/6, which the
    coarse sigma leaves out, so the result matches a direct Gaussian to about 1 %.
    """
    image = np.asarray(image, dtype=np.float32)
    if sigma_px <= 0:
        return image.copy()
    if sigma_px < 8:
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest", truncate=3.0)
    factor = max(2, int(sigma_px // 4))
    small = _block_mean(image, factor)
    coarse_sigma = math.sqrt(sigma_px**2 - factor**2 / 4.0) / factor
    small = ndimage.gaussian_filter(small, coarse_sigma, mode="nearest", truncate=3.0)
    return _upsample_linear(small, factor, image.shape)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = image.shape
    pad_r, pad_c = (-rows) % factor, (-cols) % factor
    padded = np.pad(image, ((0, pad_r), (0, pad_c)), mode="edge")
    r, c = padded.shape
    return padded.reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))


def _interp_axis(n_out: int, n_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation from block centres to pixel centres."""
    u = np.clip((np.arange(n_out) - (factor - 1) / 2.0) / factor, 0, n_in - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (u - i0).astype(np.float32)


def _upsample_linear(small: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    r0, r1, wr = _interp_axis(shape[0], small.shape[0], factor)
    c0, c1, wc = _interp_axis(shape[1], small.shape[1], factor)
    small = small.astype(np.float32)
    rows = small[r0] * (1 - wr)[:, None] + small[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def _spacing_pair(pixel_spacing_mm) -> tuple[float, float]:
    pair = (
        (float(pixel_spacing_mm),) * 2
        if np.isscalar(pixel_spacing_mm)
        else tuple(float(v) for v in pixel_spacing_mm)
    )
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise InputError(f"pixel_spacing_mm must be positive (row, col) mm, not {pixel_spacing_mm}")
    return pair


# ---- primary fluence -----------------------------------------------------------------------


def heel_profile(
    rows: int,
    row_spacing_mm: float,
    *,
    sdd_mm: float,
    anode_angle_deg: float,
    heel_strength: float,
    anode_top: bool = True,
    principal_row: float | None = None,
) -> np.ndarray:
    """Relative tube output along the anode-cathode axis (the rows), 1 on the central ray.

    X-rays made at a depth in the target cross ``1 / sin(angle to the anode face)`` of target
    material; rays towards the anode leave at a smaller angle, so output falls steeply on the
    anode side and rises a little on the cathode side.

    Parameters
    ----------
    rows : number of detector rows.
    row_spacing_mm : row pitch at the detector, mm.
    sdd_mm : source-detector distance, mm.
    anode_angle_deg : target angle, degrees (12-16 for general radiography).
    heel_strength : target self-absorption along the exit path of the central ray times
        sin(anode angle), dimensionless (0.01-0.04 gives the usual 10-25 % anode-edge drop).
    anode_top : the anode is towards row 0 (the patient's head).
    principal_row : row of the central ray; default the detector centre.

    Returns
    -------
    ndarray of shape (rows,), float32
    """
    centre = (rows - 1) / 2.0 if principal_row is None else principal_row
    offset_mm = (np.arange(rows) - centre) * row_spacing_mm
    towards_anode = np.arctan(offset_mm / sdd_mm) * (-1.0 if anode_top else 1.0)
    theta = math.radians(anode_angle_deg)
    exit_angle = np.clip(theta - towards_anode, math.radians(1.0), None)
    path = 1.0 / np.sin(exit_angle) - 1.0 / math.sin(theta)
    return np.exp(-heel_strength * path).astype(np.float32)


def relative_fluence(
    shape: tuple[int, int],
    pixel_spacing_mm: tuple[float, float],
    device: XrayDevice,
    geometry: PerspectiveGeometry | None = None,
) -> np.ndarray:
    """Unattenuated fluence relative to the central ray: heel effect x cos^3 (inverse square
    and obliquity) of the ray angle. Shape (rows, cols), float32; 1 at the principal point.

    With ``geometry`` its SDD and principal point are used, else ``device.sdd_mm`` and the
    detector centre.
    """
    rows, cols = shape
    if geometry is not None:
        if tuple(geometry.size_px) != tuple(shape):
            raise InputError(f"geometry is {geometry.size_px} pixels, the image {shape}")
        sdd = geometry.sdd_mm
        pr, pc = geometry.principal_point
    else:
        sdd, pr, pc = device.sdd_mm, (rows - 1) / 2.0, (cols - 1) / 2.0
    heel = heel_profile(
        rows,
        pixel_spacing_mm[0],
        sdd_mm=sdd,
        anode_angle_deg=device.anode_angle_deg,
        heel_strength=device.heel_strength,
        anode_top=device.anode_top,
        principal_row=pr,
    )
    dy = ((np.arange(rows) - pr) * pixel_spacing_mm[0] / sdd) ** 2
    dx = ((np.arange(cols) - pc) * pixel_spacing_mm[1] / sdd) ** 2
    cos3 = (1.0 + dy[:, None] + dx[None, :]) ** -1.5
    return (heel[:, None] * cos3).astype(np.float32)


def collimation_mask(
    shape: tuple[int, int], pixel_spacing_mm, rng: np.random.Generator
) -> np.ndarray:
    """The collimated (exposed) field: a slightly rotated, off-centre rectangle.

    Each side covers 80-96 % of the detector, or (one time in five per axis) runs past the
    detector edge; rotation about 1 degree (at most 3), centre off by about 2 % of the size.

    Returns
    -------
    ndarray of bool, shape (rows, cols): True inside the field.
    """
    sr, sc = _spacing_pair(pixel_spacing_mm)
    rows, cols = shape
    height, width = rows * sr, cols * sc
    half_h = height / 2 * (1.1 if rng.random() < 0.2 else rng.uniform(0.8, 0.96))
    half_w = width / 2 * (1.1 if rng.random() < 0.2 else rng.uniform(0.8, 0.96))
    angle = math.radians(float(np.clip(rng.normal(0.0, 1.0), -3.0, 3.0)))
    off_r = float(np.clip(rng.normal(0.0, 0.02), -0.04, 0.04)) * height
    off_c = float(np.clip(rng.normal(0.0, 0.02), -0.04, 0.04)) * width
    y = ((np.arange(rows) - (rows - 1) / 2.0) * sr - off_r)[:, None]
    x = ((np.arange(cols) - (cols - 1) / 2.0) * sc - off_c)[None, :]
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def field_weight(
    field_mask: np.ndarray, pixel_spacing_mm, penumbra_mm: float, leakage: float
) -> np.ndarray:
    """Primary fluence fraction passing the collimator: 1 inside, ``leakage`` outside, with a
    Gaussian penumbra (focal-spot size) of sigma ``penumbra_mm``. Shape of the mask, float32."""
    sigma_px = penumbra_mm / float(np.mean(_spacing_pair(pixel_spacing_mm)))
    soft = gaussian_px(field_mask.astype(np.float32), sigma_px)
    return (leakage + (1.0 - leakage) * soft).astype(np.float32)


# ---- the side marker ------------------------------------------------------------------------


@cache
def _glyph(letter: str) -> np.ndarray:
    """Ink coverage (0-1) of a bold sans-serif ``letter``, cropped to its ink, about 200 px tall."""
    try:
        font = ImageFont.load_default(size=200)
    except (TypeError, OSError):  # no FreeType: the small bitmap font, scaled later
        font = ImageFont.load_default()
    canvas = Image.new("L", (400, 400), 0)
    ImageDraw.Draw(canvas).text(
        (100, 50), letter, fill=255, font=font, stroke_width=10, stroke_fill=255
    )
    ink = np.asarray(canvas, dtype=np.float32) / 255.0
    r = np.flatnonzero(ink.any(axis=1))
    c = np.flatnonzero(ink.any(axis=0))
    return ink[r[0] : r[-1] + 1, c[0] : c[-1] + 1]


def marker_glyph(letter: str, height_px: int, angle_deg: float = 0.0) -> np.ndarray:
    """Lead coverage (0-1, float32) of the letter, ``height_px`` tall, rotated by ``angle_deg``
    (counter-clockwise on the image). Area-averaged, so edge pixels hold partial coverage."""
    _check_choice("letter", letter, MARKER_LETTERS)
    glyph = _glyph(letter)
    width_px = max(1, round(height_px * glyph.shape[1] / glyph.shape[0]))
    img = Image.fromarray(glyph * 255.0).resize((width_px, max(1, height_px)), Image.BOX)
    if angle_deg:
        img = img.rotate(angle_deg, resample=Image.BILINEAR, expand=True)
    return np.asarray(img, dtype=np.float32) / 255.0


def marker_attenuation(
    shape: tuple[int, int],
    pixel_spacing_mm,
    letter: str,
    corner: str | None = None,
    *,
    field_mask: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    energy_kev: float = 55.0,
    height_mm: float = 20.0,
    lead_mm: float = 1.0,
) -> tuple[np.ndarray, dict]:
    """Line integral (dimensionless, (rows, cols) float32) of a lead letter in an acrylic tile.

    The marker sits in the collimated field near its upper outer corner on the patient's side:
    'R' (patient right) in the upper-left of the image, 'L' upper-right, unless ``corner``
    ('upper-left' or 'upper-right') says otherwise. ``rng`` adds a size, tilt and inset jitter.

    Returns
    -------
    line_integral : ndarray (rows, cols) float32
    info : dict with 'letter', 'corner', 'center_px' (row, col), 'height_mm', 'lead_mm'
    """
    _check_choice("letter", letter, MARKER_LETTERS)
    corner = corner or ("upper-left" if letter == "R" else "upper-right")
    _check_choice("corner", corner, ("upper-left", "upper-right"))
    sr, sc = _spacing_pair(pixel_spacing_mm)
    angle, inset_mm = 0.0, (8.0, 8.0)
    if rng is not None:
        height_mm *= rng.uniform(0.8, 1.2)
        angle = rng.uniform(-8.0, 8.0)
        # an inset of up to 25-30 mm, less on a small detector
        inset_mm = (
            rng.uniform(0.2, 1.0) * min(25.0, 0.06 * shape[0] * sr),
            rng.uniform(0.2, 1.0) * min(30.0, 0.06 * shape[1] * sc),
        )
    glyph = marker_glyph(letter, round(height_mm / sr), angle)
    pad_r, pad_c = round(0.25 * height_mm / sr), round(0.25 * height_mm / sc)
    tile = np.pad(glyph, ((pad_r, pad_r), (pad_c, pad_c)))
    field = np.ones(shape, bool) if field_mask is None else np.asarray(field_mask, bool)
    top, left = _marker_position(field, tile.shape, corner, (inset_mm[0] / sr, inset_mm[1] / sc))
    att = attenuation_at(energy_kev)
    tile_li = tile * (att.mu_lead_per_cm * lead_mm / 10.0) + att.mu_water_per_cm * 1.2 * 0.6
    out = np.zeros(shape, np.float32)
    r1, c1 = min(top + tile.shape[0], shape[0]), min(left + tile.shape[1], shape[1])
    out[top:r1, left:c1] = tile_li[: r1 - top, : c1 - left]
    centre = (top + tile.shape[0] / 2.0, left + tile.shape[1] / 2.0)
    info = {"letter": letter, "corner": corner, "center_px": [round(v, 1) for v in centre]}
    info.update(height_mm=round(float(height_mm), 2), lead_mm=lead_mm)
    return out, info


def _marker_position(
    field: np.ndarray, tile_shape: tuple[int, int], corner: str, inset_px: tuple[float, float]
) -> tuple[int, int]:
    """Top-left pixel of a tile placed inside ``field`` near its upper ``corner``, moved
    ``inset_px`` (rows, cols) inwards when the tile still fits there."""
    rows, cols = field.shape
    th, tw = tile_shape
    # fits[r, c]: the tile with its top-left at (r, c) lies inside the field
    fits = ndimage.minimum_filter(field, size=(th, tw), origin=(-(th // 2), -(tw // 2)))
    fits[max(rows - th + 1, 0) :, :] = False
    fits[:, max(cols - tw + 1, 0) :] = False
    if not fits.any():
        return 0, 0 if corner == "upper-left" else max(cols - tw, 0)
    r, c = np.nonzero(fits)
    inward_c = c if corner == "upper-left" else (cols - tw - c)
    best = int(np.argmin(r + inward_c))
    top, left = int(r[best]), int(c[best])
    step = round(inset_px[1]) if corner == "upper-left" else -round(inset_px[1])
    moved = (top + round(inset_px[0]), left + step)
    if 0 <= moved[0] < rows and 0 <= moved[1] < cols and fits[moved]:
        return moved
    return top, left


# ---- scatter, exposure, detection -----------------------------------------------------------


def behind_patient(line_integral: np.ndarray, field_mask: np.ndarray) -> np.ndarray:
    """Pixels in the field behind the thick part of the patient (line integral at least half
    its 95th percentile in the field): where SPR and AEC dose are defined. Bool (rows, cols)."""
    inside = line_integral[field_mask]
    if inside.size == 0:
        return np.zeros_like(field_mask)
    level = 0.5 * float(np.percentile(inside[::7], 95))
    region = field_mask & (line_integral >= level)
    return region if region.any() else field_mask


def scatter_field(
    primary: np.ndarray,
    line_integral: np.ndarray,
    *,
    scatter_to_primary: float,
    kernel_sigma_mm: float,
    pixel_spacing_mm,
    reference: np.ndarray,
) -> np.ndarray:
    """Scatter reaching the detector, in the units of ``primary``, shape (rows, cols) float32.

    Scatter is made where the beam interacts: the source is ``primary x line_integral``
    (a scatter-kernel-superposition model with amplitude proportional to thickness), spread by
    a forward-peaked kernel (30 % at sigma/3, 70 % at ``kernel_sigma_mm``) and scaled so that
    the median scatter-to-primary ratio over ``reference`` (bool, behind the patient) equals
    ``scatter_to_primary``.
    """
    source = primary * np.clip(line_integral, 0.0, None)
    if scatter_to_primary <= 0 or not np.any(source > 0):
        return np.zeros_like(primary, dtype=np.float32)
    sigma_px = kernel_sigma_mm / float(np.mean(_spacing_pair(pixel_spacing_mm)))
    spread = 0.3 * gaussian_px(source, sigma_px / 3.0) + 0.7 * gaussian_px(source, sigma_px)
    ok = reference & (primary > 0)
    ratio = float(np.median(spread[ok] / primary[ok])) if ok.any() else 0.0
    if ratio <= 0:
        return np.zeros_like(primary, dtype=np.float32)
    return (spread * (scatter_to_primary / ratio)).astype(np.float32)


def aec_region(field_mask: np.ndarray) -> np.ndarray:
    """AEC chambers, approximated by the central 40 % x 40 % of the field's bounding box."""
    r, c = np.nonzero(field_mask)
    if r.size == 0:
        return field_mask
    region = np.zeros_like(field_mask)
    r0, r1 = np.percentile(r, [30, 70]).astype(int)
    c0, c1 = np.percentile(c, [30, 70]).astype(int)
    region[r0 : r1 + 1, c0 : c1 + 1] = True
    return region & field_mask


def incident_quanta_per_pixel(
    device: XrayDevice, detected_per_unit: np.ndarray, field_mask: np.ndarray, pixel_spacing_mm
) -> float:
    """Detected quanta per pixel without patient on the central ray (N0), set by the device.

    With AEC the exposure stops when the chambers have received ``aec_quanta_per_mm2``: N0 is
    that target over the median of ``detected_per_unit`` ((primary + scatter) / N0, shape (rows,
    cols)) in the chambers. Without AEC it is the manual technique ``photons_per_mm2``.
    """
    area_mm2 = float(np.prod(_spacing_pair(pixel_spacing_mm)))
    if not device.aec:
        return device.photons_per_mm2 * area_mm2
    level = float(np.median(detected_per_unit[aec_region(field_mask)]))
    # a floor on the chamber signal stands for the tube's mAs limit (exposure time-out)
    return device.aec_quanta_per_mm2 * area_mm2 / max(level, 1e-4)


def quantum_noise(expected_quanta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson-distributed detected quanta with the given means (rows, cols); float32.

    Drawn from a child generator seeded by one draw of ``rng``: ``Generator.poisson`` is a
    rejection sampler whose count of draws depends on the means, so a last-bit difference of a
    mean (another CPU's float path) would shift the stream of everything ``rng`` draws after it
    (the next radiograph's pose and device) and a cohort would differ between CPUs. This way
    only the noise itself can differ.
    """
    lam = np.clip(np.asarray(expected_quanta, dtype=np.float64), 0.0, None)
    child = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
    return child.poisson(lam).astype(np.float32)


def detector_response(
    quanta: np.ndarray,
    rng: np.random.Generator,
    *,
    pixel_spacing_mm,
    blur_mm: float,
    tail_fraction: float,
    tail_mm: float,
    electronic_noise: float,
) -> np.ndarray:
    """Scintillator / phosphor light spread (a sharp Gaussian core plus a wide, weak halo)
    applied to the quanta, noise included, then additive electronic noise (sigma in quanta).
    Returns float32 signal in detected-quanta units, shape of ``quanta``."""
    px = float(np.mean(_spacing_pair(pixel_spacing_mm)))
    core = gaussian_px(quanta, blur_mm / px)
    signal = (1.0 - tail_fraction) * core + tail_fraction * gaussian_px(quanta, tail_mm / px)
    noise = rng.standard_normal(quanta.shape, dtype=np.float32)
    return (signal + np.float32(electronic_noise) * noise).astype(np.float32)
