"""Radiograph physics and vendor processing: a line-integral image -> a processed AP hip X-ray.

The chain, each step a function of its own so it can be tested and swapped:

1. attenuation (:func:`attenuation_at`): mono-energetic coefficients at the device's effective
   energy, from the bundled table ``xbmd/data/attenuation.json`` (written by
   ``scripts/make_attenuation_table.py`` from xraydb / Elam data).
2. primary fluence (:func:`relative_fluence`, :func:`field_weight`, :func:`marker_attenuation`):
   heel effect along the rows (the anode-cathode axis runs head-foot, as for a pelvis on a
   table), cos^3 obliquity of the ray, the collimated field with a penumbra, a lead side marker,
   Beer-Lambert ``exp(-line_integral)``.
3. scatter (:func:`scatter_field`): a broad kernel applied to a scatter source proportional to
   ``primary x line integral``, scaled to the device's scatter-to-primary ratio (SPR).
4. exposure (:func:`incident_quanta_per_pixel`): automatic exposure control (AEC) chambers set
   the dose so that the field centre receives a target number of detected quanta, or a fixed
   manual technique.
5. detection (:func:`detect`): Poisson quantum noise, scintillator / phosphor blur with a long
   tail, additive electronic noise. All in detected quanta per pixel.
6. vendor processing (:func:`process`): log, histogram analysis of the collimated field,
   multi-scale contrast equalisation (band-pass gains with a power law, latitude compression,
   noise coring), an S-shaped LUT with gamma, quantisation to ``bits_stored``, shutter.

Pixel convention (``xbmd.io.xray.XRay``): bone BRIGHT in the returned values, whatever the
device's photometric interpretation; ``write_xray_dicom`` inverts for MONOCHROME1 itself.
Geometry: rows grow towards the patient's feet, columns towards the patient's left, so the
patient's right (and the 'R' marker) is on the image left (``xbmd.geometry``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry

#: Crystal density of hydroxyapatite, g/cm3: mineral replacing water displaces its own volume.
HA_DENSITY_G_CM3 = 3.16
MARKER_LETTERS = ("R", "L")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
#: What a vendor puts outside the collimated field: black or white electronic shutter, or the
#: processed signal itself (mostly white, with the scatter glow near the edge).
OUTSIDE_FIELD = ("black", "white", "natural")
LUTS = ("sigmoid", "gamma")


# ---- attenuation ---------------------------------------------------------------------------


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


# ---- the device ----------------------------------------------------------------------------


@dataclass(frozen=True)
class XrayDevice:
    """One simulated radiography system and its vendor image processing.

    Acquisition
        kvp; effective_energy_kev (mean energy behind the patient, at which line integrals are
        computed); aec (automatic exposure control on); aec_quanta_per_mm2 (detected quanta per
        mm2 the AEC aims at in the field centre, behind the patient); photons_per_mm2 (detected
        quanta per mm2 without patient, used when aec is off); grid; scatter_to_primary (SPR
        behind the patient); scatter_kernel_mm (sigma of the broad scatter kernel); sdd_mm (used
        for the heel effect when expose gets no geometry); anode_angle_deg, heel_strength
        (self-absorption of the target, dimensionless mu x depth), anode_top (anode towards the
        patient's head); penumbra_mm (focal-spot blur of the collimator edge); leakage (fraction
        of the primary outside the field).
    Detector
        detector ('csi', 'gos' or 'cr'); detector_blur_mm (sigma of the sharp core);
        detector_tail_fraction, detector_tail_mm (light-spread / glare halo);
        electronic_noise_quanta (additive noise sigma, detected quanta per pixel).
    Processing
        window_percentiles (low, high) of the log signal over the anatomy (the field without
        direct exposure): the log image is normalised by them, and after enhancement the high
        one (bone) goes near the top of the LUT, the low one (thin tissue) near its toe;
        band_scales_mm (sigma of the Gaussians splitting the image into bands, fine -> coarse);
        band_gains (one per band); band_power (power law on band amplitudes, < 1 equalises
        contrast); latitude_compression (0-1, how much of the thickness-driven trend, coarser
        than ``LATITUDE_SCALE_MM``, is removed); noise_reduction (0-1, coring of the finest
        band); lut ('sigmoid' or 'gamma'), lut_contrast, lut_center, lut_gamma; output_range
        (fractions of full scale used by the LUT output); bits_stored; photometric;
        outside_field ('black', 'white', 'natural').
    """

    name: str
    manufacturer: str
    model: str
    family: str
    kvp: float
    effective_energy_kev: float
    aec: bool
    aec_quanta_per_mm2: float
    photons_per_mm2: float
    grid: bool
    scatter_to_primary: float
    scatter_kernel_mm: float
    sdd_mm: float
    anode_angle_deg: float
    heel_strength: float
    anode_top: bool
    penumbra_mm: float
    leakage: float
    detector: str
    detector_blur_mm: float
    detector_tail_fraction: float
    detector_tail_mm: float
    electronic_noise_quanta: float
    window_percentiles: tuple[float, float]
    band_scales_mm: tuple[float, ...]
    band_gains: tuple[float, ...]
    band_power: float
    latitude_compression: float
    noise_reduction: float
    lut: str
    lut_contrast: float
    lut_center: float
    lut_gamma: float
    output_range: tuple[float, float]
    bits_stored: int
    photometric: str
    outside_field: str

    def __post_init__(self) -> None:
        _check_choice("photometric", self.photometric, PHOTOMETRICS)
        _check_choice("outside_field", self.outside_field, OUTSIDE_FIELD)
        _check_choice("lut", self.lut, LUTS)
        if not (isinstance(self.bits_stored, int) and 8 <= self.bits_stored <= 16):
            raise InputError(f"bits_stored must be an integer from 8 to 16, not {self.bits_stored}")
        if len(self.band_gains) != len(self.band_scales_mm):
            raise InputError("band_gains needs one gain per band scale")

    def to_dict(self) -> dict:
        """JSON-serialisable fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


#: Vendor-like families. Names are fictional; each is styled after a kind of system seen in
#: clinical hip radiographs. Values are (low, high) ranges drawn uniformly, or fixed.
DEVICE_FAMILIES: dict[str, dict] = {
    # flat panel, strong multi-scale contrast equalisation, black shutter, MONOCHROME1
    "equalised-dr": {
        "manufacturer": "Aurora Medical",
        "model": "Aurora DR 5",
        "detector": "csi",
        "kvp": (72, 85),
        "aec": True,
        "grid": True,
        "aec_quanta_per_mm2": (25000, 50000),
        "spr": (0.35, 0.6),
        "band_gains": ((1.0, 1.2), (1.4, 1.9), (1.5, 2.0), (1.2, 1.6)),
        "band_power": (0.6, 0.75),
        "latitude_compression": (0.7, 0.85),
        "noise_reduction": (0.4, 0.7),
        "lut": "sigmoid",
        "lut_contrast": (5.0, 7.0),
        "bits_stored": 12,
        "photometric": "MONOCHROME1",
        "outside_field": "black",
    },
    # flat panel, moderate unsharp masking, white outside, MONOCHROME2
    "balanced-dr": {
        "manufacturer": "Helix Imaging",
        "model": "Helix DigitalDiagnost",
        "detector": "csi",
        "kvp": (70, 81),
        "aec": True,
        "grid": True,
        "aec_quanta_per_mm2": (20000, 40000),
        "spr": (0.3, 0.5),
        "band_gains": ((1.1, 1.4), (1.2, 1.5), (1.1, 1.3), (1.0, 1.2)),
        "band_power": (0.8, 0.92),
        "latitude_compression": (0.55, 0.7),
        "noise_reduction": (0.2, 0.5),
        "lut": "sigmoid",
        "lut_contrast": (5.0, 7.0),
        "bits_stored": 12,
        "photometric": "MONOCHROME2",
        "outside_field": "white",
    },
    # storage-phosphor CR: blurrier, noisier, film-like contrast, 10 bit, scatter glow outside
    "phosphor-cr": {
        "manufacturer": "Kestrel Radiography",
        "model": "Kestrel CR-IP",
        "detector": "cr",
        "kvp": (70, 80),
        "aec": True,
        "grid": True,
        "aec_quanta_per_mm2": (12000, 25000),
        "spr": (0.4, 0.7),
        "band_gains": ((1.3, 1.7), (1.2, 1.5), (1.0, 1.2), (1.0, 1.1)),
        "band_power": (0.85, 1.0),
        "latitude_compression": (0.5, 0.65),
        "noise_reduction": (0.0, 0.3),
        "lut": "sigmoid",
        "lut_contrast": (6.0, 8.0),
        "bits_stored": 10,
        "photometric": "MONOCHROME1",
        "outside_field": "natural",
    },
    # flat panel, tissue equalisation and crisp edges, 14 bit
    "crisp-dr": {
        "manufacturer": "Tern Healthcare",
        "model": "Tern Definium",
        "detector": "csi",
        "kvp": (75, 85),
        "aec": True,
        "grid": True,
        "aec_quanta_per_mm2": (25000, 45000),
        "spr": (0.3, 0.5),
        "band_gains": ((1.3, 1.6), (1.6, 2.0), (1.2, 1.5), (1.0, 1.2)),
        "band_power": (0.7, 0.85),
        "latitude_compression": (0.6, 0.75),
        "noise_reduction": (0.5, 0.8),
        "lut": "gamma",
        "lut_contrast": (1.0, 1.0),
        "bits_stored": 14,
        "photometric": "MONOCHROME1",
        "outside_field": "black",
    },
    # gadolinium-oxysulfide panel, soft processing, white outside
    "soft-dr": {
        "manufacturer": "Ridge Systems",
        "model": "Ridge Ysio",
        "detector": "gos",
        "kvp": (70, 80),
        "aec": True,
        "grid": True,
        "aec_quanta_per_mm2": (15000, 30000),
        "spr": (0.4, 0.6),
        "band_gains": ((1.0, 1.2), (1.1, 1.3), (1.1, 1.3), (1.0, 1.1)),
        "band_power": (0.85, 1.0),
        "latitude_compression": (0.5, 0.65),
        "noise_reduction": (0.3, 0.6),
        "lut": "sigmoid",
        "lut_contrast": (4.5, 6.0),
        "bits_stored": 12,
        "photometric": "MONOCHROME2",
        "outside_field": "white",
    },
    # mobile / bedside: no grid (high scatter), manual technique, 16 bit
    "mobile-nogrid": {
        "manufacturer": "Wren Mobile",
        "model": "Wren Carejet",
        "detector": "gos",
        "kvp": (75, 85),
        "aec": False,
        "grid": False,
        "photons_per_mm2": (0.8e6, 2.5e6),
        "spr": (1.2, 2.5),
        "band_gains": ((1.1, 1.3), (1.4, 1.8), (1.4, 1.8), (1.1, 1.3)),
        "band_power": (0.7, 0.85),
        "latitude_compression": (0.55, 0.7),
        "noise_reduction": (0.3, 0.6),
        "lut": "sigmoid",
        "lut_contrast": (5.0, 7.0),
        "bits_stored": 16,
        "photometric": "MONOCHROME2",
        "outside_field": "natural",
    },
}

#: Detector blur (sigma of the core, mm), glare tail (fraction, sigma mm), electronic noise
#: (quanta per pixel) by detector kind: CsI needles keep light together; GOS powder and CR
#: plates (read by a laser) spread it.
DETECTOR_KINDS = {
    "csi": {"blur": (0.08, 0.14), "tail": (0.04, 0.08), "tail_mm": (0.8, 1.5), "e_noise": (2, 6)},
    "gos": {"blur": (0.13, 0.2), "tail": (0.06, 0.12), "tail_mm": (1.0, 2.0), "e_noise": (3, 8)},
    "cr": {"blur": (0.2, 0.3), "tail": (0.08, 0.15), "tail_mm": (1.5, 3.0), "e_noise": (5, 15)},
}
#: Band split of the multi-scale processing: Gaussian sigmas (mm), fine -> coarse.
BAND_SCALES_MM = (0.5, 1.5, 4.5, 13.5)
#: Gaussian sigma (mm) of the thickness trend that latitude compression acts on: coarser than
#: the bones, so that equalising the body's thickness does not flatten the bones' contrast.
LATITUDE_SCALE_MM = 40.0
#: Where the anatomy's median goes on the LUT's input axis, below ``lut_center``.
BODY_BELOW_CENTER = 0.1
#: LUT input of the bright (bone) and dark (thin tissue) window percentiles of the anatomy.
BONE_LEVEL, THIN_LEVEL = 0.9, 0.0
#: Largest span of the LUT input the anatomy window may be stretched to.
MAX_SPAN = 2.0


def _draw(rng: np.random.Generator, value):
    """A (low, high) range -> uniform draw; a fixed value -> itself."""
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], tuple):
        return float(rng.uniform(*value))
    return value


def sample_device(rng: np.random.Generator, family: str | None = None) -> XrayDevice:
    """Draw a radiography system: a vendor-like family (uniform, or ``family``) and its settings.

    Families differ visibly (contrast equalisation, edge enhancement, noise grain, shutter,
    bit depth, grid); see ``DEVICE_FAMILIES``.
    """
    if family is None:
        family = str(rng.choice(sorted(DEVICE_FAMILIES)))
    _check_choice("family", family, tuple(DEVICE_FAMILIES))
    spec = DEVICE_FAMILIES[family]
    det = DETECTOR_KINDS[spec["detector"]]
    kvp = round(_draw(rng, spec["kvp"]))
    serial = int(rng.integers(1000, 9999))
    return XrayDevice(
        name=f"{family}-{serial}",
        manufacturer=spec["manufacturer"],
        model=spec["model"],
        family=family,
        kvp=float(kvp),
        # a patient-hardened spectrum: mean energy about 0.45 kVp + 19 keV (50-58 keV at 70-85)
        effective_energy_kev=round(0.45 * kvp + 19.0 + rng.uniform(-1.5, 1.5), 2),
        aec=bool(spec["aec"]),
        aec_quanta_per_mm2=_draw(rng, spec.get("aec_quanta_per_mm2", (25000, 25000))),
        photons_per_mm2=_draw(rng, spec.get("photons_per_mm2", (3e6, 3e6))),
        grid=bool(spec["grid"]),
        scatter_to_primary=_draw(rng, spec["spr"]),
        scatter_kernel_mm=_draw(rng, (35.0, 70.0)),
        sdd_mm=_draw(rng, (1000.0, 1150.0)),
        anode_angle_deg=_draw(rng, (12.0, 16.0)),
        heel_strength=_draw(rng, (0.01, 0.035)),
        anode_top=bool(rng.random() < 0.5),
        penumbra_mm=_draw(rng, (0.5, 1.5)),
        leakage=_draw(rng, (0.002, 0.01)),
        detector=spec["detector"],
        detector_blur_mm=_draw(rng, det["blur"]),
        detector_tail_fraction=_draw(rng, det["tail"]),
        detector_tail_mm=_draw(rng, det["tail_mm"]),
        electronic_noise_quanta=_draw(rng, det["e_noise"]),
        window_percentiles=(_draw(rng, (0.2, 1.5)), _draw(rng, (98.5, 99.8))),
        band_scales_mm=BAND_SCALES_MM,
        band_gains=tuple(_draw(rng, g) for g in spec["band_gains"]),
        band_power=_draw(rng, spec["band_power"]),
        latitude_compression=_draw(rng, spec["latitude_compression"]),
        noise_reduction=_draw(rng, spec["noise_reduction"]),
        lut=spec["lut"],
        lut_contrast=_draw(rng, spec["lut_contrast"]),
        lut_center=_draw(rng, (0.45, 0.55)),
        lut_gamma=_draw(rng, (0.85, 1.2)),
        output_range=(_draw(rng, (0.0, 0.04)), _draw(rng, (0.94, 1.0))),
        bits_stored=int(spec["bits_stored"]),
        photometric=spec["photometric"],
        outside_field=spec["outside_field"],
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
    """Poisson-distributed detected quanta with the given means (rows, cols); float32."""
    lam = np.clip(np.asarray(expected_quanta, dtype=np.float64), 0.0, None)
    return rng.poisson(lam).astype(np.float32)


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


# ---- vendor processing ----------------------------------------------------------------------


def log_signal(signal: np.ndarray, n0_quanta: float) -> np.ndarray:
    """Attenuation estimate ``ln(N0 / signal)`` (float32), signal clamped at 0.5 quanta."""
    return (math.log(n0_quanta) - np.log(np.maximum(signal, 0.5))).astype(np.float32)


def anatomy_region(log_image: np.ndarray, field_mask: np.ndarray) -> np.ndarray:
    """Where a vendor's histogram analysis looks, on every second pixel (bool, half size):
    the collimated field 4 px in from its edge, without direct exposure (log < 0.3, less than
    about 1.5 cm of water) unless that is most of the field."""
    field = field_mask[::2, ::2]
    inner = ndimage.binary_erosion(field, iterations=2)
    region = inner if inner.any() else field
    anatomy = region & (log_image[::2, ::2] >= 0.3)
    return anatomy if anatomy.sum() >= 0.05 * region.sum() else region


def window_levels(
    image: np.ndarray, region: np.ndarray, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The (low, high) percentiles of ``image`` over ``region`` (bool on ``image[::2, ::2]``,
    from :func:`anatomy_region`); high > low."""
    values = image[::2, ::2][region]
    if values.size == 0:
        values = image.ravel()
    low, high = np.percentile(values, percentiles)
    return float(low), float(max(high, low + 1e-3))


def fill_outside(image: np.ndarray, field_mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Replace pixels outside the field by a smooth extrapolation of the inside (normalised
    convolution), so that band filters do not ring at the collimator edge."""
    if field_mask.all() or not field_mask.any():
        return image
    num = gaussian_px(np.where(field_mask, image, 0.0), sigma_px)
    den = gaussian_px(field_mask.astype(np.float32), sigma_px)
    fill = num / np.maximum(den, 1e-3)
    fill = np.where(den > 1e-3, fill, float(np.median(image[field_mask])))
    return np.where(field_mask, image, fill).astype(np.float32)


def multiscale_enhance(
    image: np.ndarray, field_mask: np.ndarray, pixel_spacing_mm, device: XrayDevice
) -> tuple[np.ndarray, dict]:
    """Multi-scale contrast equalisation of a normalised log image (anatomy in about [0, 1]).

    The image is split into band-pass details (differences of Gaussians at
    ``device.band_scales_mm``), an intermediate band between the last scale and
    ``LATITUDE_SCALE_MM`` (kept as it is: femoral heads, iliac wings) and a coarse base, the
    body's thickness trend. The base is pulled towards its median by
    ``latitude_compression`` (thick and thin regions closer in grey level), each band is
    shaped ``sign(b) m (|b|/m)**band_power`` (small details amplified more than large ones,
    linear below the band's median amplitude so noise is not boosted most) with m its 99th
    amplitude percentile, multiplied by its gain; the finest band is cored (noise reduction)
    below twice its noise level.

    Returns the enhanced image (float32, same shape) and a dict of the levels used.
    """
    px = float(np.mean(_spacing_pair(pixel_spacing_mm)))
    scales = (*device.band_scales_mm, max(LATITUDE_SCALE_MM, device.band_scales_mm[-1]))
    levels = [image] + [gaussian_px(image, s / px) for s in scales]
    sample = field_mask[::3, ::3]
    base = levels[-1]
    centre = float(np.median(base[::3, ::3][sample])) if sample.any() else float(base.mean())
    # the thickness trend (coarser than the last band) is compressed; between the last band
    # and it, structures as large as a femoral head or the iliac wing keep their contrast
    out = centre + (1.0 - device.latitude_compression) * (base - centre)
    out += levels[-2] - base
    amplitudes, noise = [], 0.0
    for k, gain in enumerate(device.band_gains):
        band = levels[k] - levels[k + 1]
        values = np.abs(band[::3, ::3][sample]) if sample.any() else np.abs(band)
        if k == 0:
            noise = 1.4826 * float(np.median(values))
            band = _core(band, noise, device.noise_reduction)
        m = max(float(np.percentile(values, 99)), 1e-6)
        out += gain * band * _power_gain(band, m, 1.4826 * float(np.median(values)), device)
        amplitudes.append(round(m, 5))
    return out.astype(np.float32), {
        "band_amplitudes": amplitudes,
        "fine_noise_sigma": round(noise, 5),
        "base_median": round(centre, 5),
    }


def _power_gain(band: np.ndarray, amplitude: float, floor: float, device: XrayDevice):
    """Gain ``(|b| / m)**(p - 1)`` of the power law, held constant below ``floor`` (the band's
    typical, mostly noise, amplitude) so that noise is not amplified more than fine detail."""
    level = np.maximum(np.abs(band), max(floor, 1e-6 * amplitude))
    return (level / amplitude) ** np.float32(device.band_power - 1.0)


def _core(band: np.ndarray, noise_sigma: float, strength: float) -> np.ndarray:
    """Attenuate band values near the noise level by up to ``strength`` (soft coring)."""
    if strength <= 0 or noise_sigma <= 0:
        return band
    return band * (1.0 - strength * np.exp(-((band / (2.0 * noise_sigma)) ** 2)))


def apply_lut(image: np.ndarray, device: XrayDevice) -> np.ndarray:
    """Tone curve: normalised log image -> [0, 1] display value (float32), monotonic.

    'sigmoid': a film-like S-curve of slope ``lut_contrast`` around ``lut_center`` with soft
    toe and shoulder (values a little outside [0, 1] still differ); 'gamma': a clipped power
    law. Both then raised to ``lut_gamma``.
    """
    x = np.asarray(image, dtype=np.float32)
    if device.lut == "sigmoid":
        c, m = device.lut_contrast, device.lut_center

        def s(v):
            return 1.0 / (1.0 + np.exp(-c * (v - m)))

        lo, hi = s(-0.15), s(1.15)
        y = np.clip((s(x) - lo) / (hi - lo), 0.0, 1.0)
    else:
        y = np.clip(x, 0.0, 1.0)
    return (y ** np.float32(device.lut_gamma)).astype(np.float32)


def process(
    signal: np.ndarray,
    field_mask: np.ndarray,
    pixel_spacing_mm,
    device: XrayDevice,
    n0_quanta: float,
) -> tuple[np.ndarray, dict]:
    """Vendor processing of the detector signal (quanta) into display values in [0, 1]
    (float32, bone bright).

    Log; histogram windowing of the anatomy in the field; multi-scale enhancement; a second
    windowing of the enhanced image, anchored on the anatomy's histogram: its median (mostly
    soft tissue) goes to ``lut_center - BODY_BELOW_CENTER`` (mid-to-dark grey), its high
    percentile (bone) to ``BONE_LEVEL`` (white), its low percentile no lower than
    ``THIN_LEVEL`` (thin tissue dark grey, air in the field black); LUT. Outside the field the
    un-enhanced image is kept (the shutter, if any, is applied when storing).
    """
    log_image = log_signal(signal, n0_quanta)
    region = anatomy_region(log_image, field_mask)
    low, high = window_levels(log_image, region, device.window_percentiles)
    norm = np.clip((log_image - low) / (high - low), -0.3, 1.6)
    px = float(np.mean(_spacing_pair(pixel_spacing_mm)))
    filled = fill_outside(norm, field_mask, 10.0 / px)
    enhanced, levels = multiscale_enhance(filled, field_mask, pixel_spacing_mm, device)
    enhanced = np.where(field_mask, enhanced, norm)
    low2, high2 = window_levels(enhanced, region, device.window_percentiles)
    median = window_levels(enhanced, region, (50.0, 50.0))[0]
    # the anatomy's median (mostly soft tissue) a little below the LUT centre, the bright end
    # of the histogram (bone) at the top: soft tissue mid grey, bone white, thin tissue dark
    body = device.lut_center - BODY_BELOW_CENTER
    scale = (BONE_LEVEL - body) / max(high2 - median, 1e-3)
    # a thick, little-equalised trunk leaves the bright tail short: cap the slope so that the
    # whole window spans at most MAX_SPAN of the LUT input (no large white plateaus)
    scale = min(scale, MAX_SPAN / max(high2 - low2, 1e-3))
    # below the median a gentler slope if needed, so that thin tissue at the flanks stays a
    # dark grey above the black of air (latitude): the skin line remains visible
    scale_low = min(scale, (body - THIN_LEVEL) / max(median - low2, 1e-3))
    offset = enhanced - median
    x = body + np.where(offset > 0, offset * np.float32(scale), offset * np.float32(scale_low))
    display = apply_lut(x, device)
    windows = {"log_window": [round(low, 4), round(high, 4)]}
    windows["enhanced_window"] = [round(low2, 4), round(median, 4), round(high2, 4)]
    return display, {**windows, **levels}


def to_stored(display: np.ndarray, field_mask: np.ndarray, device: XrayDevice) -> np.ndarray:
    """Display values [0, 1] -> uint16 stored values in [0, 2**bits_stored - 1], bone bright,
    with the vendor's shutter outside the field."""
    full = 2**device.bits_stored - 1
    low, high = device.output_range
    values = (low + (high - low) * np.clip(display, 0.0, 1.0)) * full
    if device.outside_field == "black":
        values = np.where(field_mask, values, 0.0)
    elif device.outside_field == "white":
        values = np.where(field_mask, values, full)
    return np.clip(np.rint(values), 0, full).astype(np.uint16)


# ---- the whole chain ------------------------------------------------------------------------


def expose(
    line_integral: np.ndarray,
    *,
    pixel_spacing_mm,
    device: XrayDevice,
    rng: np.random.Generator,
    field_mask: np.ndarray | None = None,
    marker: str | None = None,
    geometry: PerspectiveGeometry | None = None,
) -> tuple[np.ndarray, dict]:
    """Simulate the acquisition and vendor processing of one radiograph.

    Parameters
    ----------
    line_integral : ndarray of shape (rows, cols)
        Dimensionless total attenuation ∫mu dl through the patient at
        ``device.effective_energy_kev`` (soft tissue + ``bone_excess_cm2_g`` x mineral g/cm2).
    pixel_spacing_mm : float or (row, col), at the detector, mm.
    device : XrayDevice (e.g. from :func:`sample_device`).
    rng : numpy Generator: quantum and electronic noise, marker jitter.
    field_mask : bool (rows, cols), True inside the collimated field; None = whole detector.
    marker : 'R', 'L' or None: lead side marker near the upper outer corner of that side.
    geometry : PerspectiveGeometry of the image, for the cos^3 fall-off and the heel effect.

    Returns
    -------
    pixels : ndarray of uint16, shape (rows, cols), in [0, 2**device.bits_stored - 1], bone
        bright (``write_xray_dicom`` stores MONOCHROME1 inverted itself).
    info : dict, JSON-serialisable: the device, exposure (N0, quanta, SPR), marker, windowing.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> device = sample_device(rng)
    >>> li = np.full((64, 80), 4.0, np.float32)
    >>> li[20:40, 30:50] += 0.3  # a bone
    >>> pixels, info = expose(li, pixel_spacing_mm=0.3, device=device, rng=rng)
    >>> bool(pixels[30, 40] > pixels[30, 10])
    True
    """
    li = _check_line_integral(line_integral)
    spacing = _spacing_pair(pixel_spacing_mm)
    field = _check_field(field_mask, li.shape)
    total, marker_info = li, None
    if marker is not None:
        marker_li, marker_info = marker_attenuation(
            li.shape,
            spacing,
            marker,
            field_mask=field,
            rng=rng,
            energy_kev=device.effective_energy_kev,
        )
        total = li + marker_li
    weight = field_weight(field, spacing, device.penumbra_mm, device.leakage)
    primary = relative_fluence(li.shape, spacing, device, geometry) * weight * np.exp(-total)
    reference = behind_patient(li, field)
    scatter = scatter_field(
        primary,
        li,
        scatter_to_primary=device.scatter_to_primary,
        kernel_sigma_mm=device.scatter_kernel_mm,
        pixel_spacing_mm=spacing,
        reference=reference,
    )
    n0 = incident_quanta_per_pixel(device, primary + scatter, field, spacing)
    expected = (primary + scatter) * np.float32(n0)
    signal = detector_response(
        quantum_noise(expected, rng),
        rng,
        pixel_spacing_mm=spacing,
        blur_mm=device.detector_blur_mm,
        tail_fraction=device.detector_tail_fraction,
        tail_mm=device.detector_tail_mm,
        electronic_noise=device.electronic_noise_quanta,
    )
    display, proc_info = process(signal, field, spacing, device, n0)
    pixels = to_stored(display, field, device)
    info = _exposure_info(device, n0, expected, primary, scatter, field, reference, spacing)
    info.update(marker=marker_info, processing=proc_info)
    return pixels, info


def _check_line_integral(line_integral) -> np.ndarray:
    li = np.asarray(line_integral, dtype=np.float32)
    if li.ndim != 2 or li.size == 0:
        raise InputError(f"line_integral must be a non-empty 2D array, got shape {li.shape}")
    if not np.all(np.isfinite(li)) or float(li.min()) < -1e-3:
        raise InputError("line_integral must be finite and non-negative (dimensionless ∫mu dl)")
    return np.maximum(li, 0.0)


def _check_field(field_mask, shape) -> np.ndarray:
    if field_mask is None:
        return np.ones(shape, dtype=bool)
    field = np.asarray(field_mask, dtype=bool)
    if field.shape != tuple(shape):
        raise InputError(f"field_mask has shape {field.shape}, the image {tuple(shape)}")
    if not field.any():
        raise InputError("field_mask is empty: nothing would be exposed")
    return field


def _exposure_info(device, n0, expected, primary, scatter, field, reference, spacing) -> dict:
    area = float(np.prod(spacing))
    ok = reference & (primary > 0)
    spr = float(np.median(scatter[ok] / primary[ok])) if ok.any() else 0.0
    return {
        "device": device.to_dict(),
        "n0_quanta_per_pixel": round(float(n0), 2),
        "n0_quanta_per_mm2": round(float(n0) / area, 1),
        "mean_quanta_in_field": round(float(expected[field].mean()), 2),
        "median_quanta_behind_patient": round(float(np.median(expected[reference])), 2),
        "scatter_to_primary_behind_patient": round(spr, 4),
        "field_fraction": round(float(field.mean()), 4),
        "pixel_spacing_mm": list(spacing),
    }
