"""The simulated radiography systems: device families and their settings draws.

:class:`XrayDevice` holds everything about one system that shapes its radiographs (acquisition,
detector, vendor processing); :data:`DEVICE_FAMILIES` are six vendor-like families (names
fictional) with the ranges their settings are drawn from, :data:`DETECTOR_KINDS` the detector
blur and noise by scintillator; :func:`sample_device` draws one system from a generator. The
physics (``xbmd.synth.physics``) and processing (``xbmd.synth.processing``) read the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from xbmd.errors import InputError

PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
#: What a vendor puts outside the collimated field: black or white electronic shutter, or the
#: processed signal itself (mostly white, with the scatter glow near the edge).
OUTSIDE_FIELD = ("black", "white", "natural")
LUTS = ("sigmoid", "gamma")


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
    Randomised processing
        processing_graph: None for the family's own processing (above); else the randomised
        processing graph that replaces it (``xbmd.synth.processing_graph``; its steps and their
        parameters, JSON-serialisable); the family's processing fields are then unused, except
        bits_stored, photometric, output_range and outside_field, which the graph sets.
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
    processing_graph: dict | None = None

    def __post_init__(self) -> None:
        _check_choice("photometric", self.photometric, PHOTOMETRICS)
        _check_choice("outside_field", self.outside_field, OUTSIDE_FIELD)
        _check_choice("lut", self.lut, LUTS)
        if not (isinstance(self.bits_stored, int) and 8 <= self.bits_stored <= 16):
            raise InputError(f"bits_stored must be an integer from 8 to 16, not {self.bits_stored}")
        if len(self.band_gains) != len(self.band_scales_mm):
            raise InputError("band_gains needs one gain per band scale")

    def to_dict(self) -> dict:
        """JSON-serialisable fields (tuples become lists); ``processing_graph`` only when set."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if out["processing_graph"] is None:  # as devices were recorded before the graphs
            del out["processing_graph"]
        return out


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


def _draw(rng: np.random.Generator, value):
    """A (low, high) range -> uniform draw; a fixed value -> itself."""
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], tuple):
        return float(rng.uniform(*value))
    return value


def check_families(families: Sequence[str]) -> tuple[str, ...]:
    """``families`` as a sorted tuple of known family names; InputError naming an unknown one."""
    names = tuple(sorted(set(families)))
    if not names:
        raise InputError("device families: give at least one of " + ", ".join(DEVICE_FAMILIES))
    for name in names:
        _check_choice("device family", name, tuple(DEVICE_FAMILIES))
    return names


def sample_device(
    rng: np.random.Generator,
    family: str | None = None,
    families: Sequence[str] | None = None,
) -> XrayDevice:
    """Draw a radiography system: a vendor-like family and its settings.

    The family is ``family``, else drawn uniformly from ``families`` (default: all of
    ``DEVICE_FAMILIES``). Families differ visibly (contrast equalisation, edge enhancement,
    noise grain, shutter, bit depth, grid); see ``DEVICE_FAMILIES``.
    """
    if family is None:
        choices = sorted(DEVICE_FAMILIES) if families is None else list(check_families(families))
        family = str(rng.choice(choices))
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
