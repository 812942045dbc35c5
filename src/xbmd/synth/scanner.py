"""Simulated QCT scan of a virtual patient: calibration phantom, table, HU scale, blur and noise.

The scanner turns an :class:`~xbmd.synth.model.Anatomy` (mineral in mg/cm3 and mineral-free HU)
into the CT a hospital would have:

    HU = water_hu + soft(kVp) + hu_per_mg_cm3 * mineral,   then PSF blur and correlated noise.

The HU per mg/cm3 of hydroxyapatite and the soft-tissue HU change with tube voltage exactly as the
reference values of the phantom-less calibration (``calibration.REFERENCE_TISSUES_MG_CM3``)
say; each simulated scanner also has its own gain error and water offset, so calibration has real
work to do. A B-MAS200-like phantom (five hydroxyapatite rods in a water-equivalent resin block)
lies under the patient on a carbon-fibre table, unless the case is phantom-less.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from xbmd.ct.calibration import REFERENCE_TISSUES_MG_CM3
from xbmd.synth.model import Anatomy
from xbmd.volume import Volume

#: Rod label id -> nominal hydroxyapatite density, mg/cm3 (as the bundled bmas200 phantom).
ROD_DENSITIES_MG_CM3 = {101: 0.0, 102: 50.0, 103: 100.0, 104: 150.0, 105: 200.0}
#: Phantom block: width (x), thickness (y), rod diameter and spacing, mm.
PHANTOM_WIDTH_MM, PHANTOM_THICKNESS_MM = 250.0, 28.0
ROD_DIAMETER_MM, ROD_PITCH_MM = 16.0, 42.0
#: HU of the phantom's water-equivalent resin at 120 kVp.
RESIN_HU = 8.0
#: Table below the phantom: carbon-fibre skin around a foam core, mm and HU.
TABLE_THICKNESS_MM, TABLE_SKIN_MM, TABLE_SKIN_HU, TABLE_CORE_HU = 14.0, 1.5, 250.0, -880.0
#: Tube voltages the simulated scanners use, and how often.
KVP_CHOICES, KVP_WEIGHTS = (100.0, 120.0, 135.0, 140.0), (0.15, 0.6, 0.1, 0.15)


@dataclass(frozen=True)
class Scanner:
    """One simulated CT scanner and protocol.

    hu_per_mg_cm3 : HU added per mg/cm3 of hydroxyapatite (true slope of this scan).
    water_hu : HU that water reads (offset).
    noise_hu : standard deviation of the image noise in water, HU.
    psf_sigma_mm : Gaussian sigma of the in-plane/through-plane point-spread function, mm.
    """

    name: str
    kvp: float
    hu_per_mg_cm3: float
    water_hu: float
    noise_hu: float
    psf_sigma_mm: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def mineral_mg_cm3(self, hu):
        """The true calibration line: mg/cm3 of hydroxyapatite from HU (water-based)."""
        return (np.asarray(hu, dtype=np.float64) - self.water_hu) / self.hu_per_mg_cm3


def _reference(kvp: float, tissue: str) -> float:
    grid = sorted(REFERENCE_TISSUES_MG_CM3)
    return float(np.interp(kvp, grid, [REFERENCE_TISSUES_MG_CM3[k][tissue] for k in grid]))


def ideal_hu_per_mg_cm3(kvp: float) -> float:
    """HU per mg/cm3 hydroxyapatite of an ideal scanner: air (-1000 HU) = its HA equivalent."""
    return -1000.0 / _reference(kvp, "air")


def soft_tissue_at_kvp(soft_hu_120: np.ndarray, kvp: float) -> np.ndarray:
    """Mineral-free HU given at 120 kVp, converted to ``kvp`` (fat and muscle contrast change)."""
    if kvp == 120.0:
        return soft_hu_120
    points = []
    for kv in (120.0, kvp):
        s = ideal_hu_per_mg_cm3(kv)
        points.append([-1000.0, _reference(kv, "fat") * s, 0.0, _reference(kv, "muscle") * s])
    src, dst = np.array(points[0]), np.array(points[1])
    out = np.interp(soft_hu_120, src, dst).astype(np.float32)
    high = soft_hu_120 > src[-1]  # beyond muscle: keep the muscle gain
    out[high] = soft_hu_120[high] * np.float32(dst[-1] / src[-1])
    return out


def sample_scanner(rng: np.random.Generator) -> Scanner:
    """Draw a scanner: tube voltage, its HU scale with a gain error and offset, noise, PSF."""
    kvp = float(rng.choice(KVP_CHOICES, p=KVP_WEIGHTS))
    vendor = str(rng.choice(["Aquilion-like", "SOMATOM-like", "Revolution-like", "Ingenuity-like"]))
    return Scanner(
        name=f"{vendor} {kvp:.0f} kVp",
        kvp=kvp,
        hu_per_mg_cm3=ideal_hu_per_mg_cm3(kvp) * float(rng.normal(1.0, 0.04)),
        water_hu=float(rng.normal(0.0, 4.0)),
        noise_hu=float(rng.uniform(10.0, 22.0)),
        psf_sigma_mm=float(rng.uniform(0.45, 0.75)),
    )


@dataclass
class ScanResult:
    """The simulated scan: CT in HU and labels (bones 1-4, rods 101-105), same grid."""

    ct: Volume
    labels: Volume
    scanner: Scanner
    has_phantom: bool
    vessels: np.ndarray | None = None  # contrast-filled vessels drawn (synth.contrast ids)


def _pad_posterior(anatomy: Anatomy, pad_mm: float) -> tuple[np.ndarray, ...]:
    """Extend the grid posteriorly (+y, larger j) by ``pad_mm`` of air for phantom and table."""
    dy = float(np.linalg.norm(anatomy.affine[:3, 1]))
    n = int(np.ceil(pad_mm / dy))
    width = ((0, 0), (0, n), (0, 0))
    soft = np.pad(anatomy.soft_tissue_hu, width, constant_values=-1000.0)
    mineral = np.pad(anatomy.mineral_mg_cm3, width)
    labels = np.pad(anatomy.labels, width)
    return soft, mineral, labels


def _place_phantom_and_table(
    soft: np.ndarray,
    mineral: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    phantom: bool,
    center_x_mm: float,
) -> None:
    """Write resin block, rods (mineral + labels) and table into the arrays, in place."""
    _, j_n, i_n = soft.shape
    x = affine[0, 3] + affine[0, 0] * np.arange(i_n)
    y = affine[1, 3] + affine[1, 1] * np.arange(j_n)
    body_rows = np.nonzero((soft > -500).any(axis=(0, 2)))[0]
    y_back = y[body_rows.max()] + 0.5 * affine[1, 1] if body_rows.size else y[j_n // 2]
    yy, xx = np.meshgrid(y, x, indexing="ij")  # (J, I)
    table_top = y_back
    if phantom:
        in_block = (
            (np.abs(xx - center_x_mm) <= PHANTOM_WIDTH_MM / 2)
            & (yy > y_back)
            & (yy <= y_back + PHANTOM_THICKNESS_MM)
        )
        soft[:, in_block] = RESIN_HU
        rod_y = y_back + PHANTOM_THICKNESS_MM / 2
        for n, (label, density) in enumerate(sorted(ROD_DENSITIES_MG_CM3.items())):
            rod_x = center_x_mm + (n - 2) * ROD_PITCH_MM
            rod = (xx - rod_x) ** 2 + (yy - rod_y) ** 2 <= (ROD_DIAMETER_MM / 2) ** 2
            soft[:, rod] = 0.0  # rods are water-equivalent + HA: the maker's certified scale
            mineral[:, rod] = density
            labels[:, rod] = label
        table_top = y_back + PHANTOM_THICKNESS_MM
    depth = yy - table_top
    table = (depth > 0) & (depth <= TABLE_THICKNESS_MM)
    skin = table & ((depth <= TABLE_SKIN_MM) | (depth > TABLE_THICKNESS_MM - TABLE_SKIN_MM))
    soft[:, table & ~skin] = TABLE_CORE_HU
    soft[:, skin] = TABLE_SKIN_HU


def scan(
    anatomy: Anatomy,
    scanner: Scanner,
    rng: np.random.Generator,
    *,
    phantom: bool = True,
    contrast=None,
) -> ScanResult:
    """Simulate the QCT scan of ``anatomy`` on ``scanner``.

    Returns the CT (HU, rounded to integers as scanners store them, clipped to -1024..3071, so
    an implant's metal reads 3071) and the label map (bones as in the anatomy, an implant's
    metal as in the anatomy, rods 101-105 when ``phantom``), on the anatomy's grid extended
    posteriorly. ``contrast`` (a ``xbmd.synth.contrast.ContrastPhase``) adds contrast-filled
    vessels and enhancement; it draws nothing from ``rng``.
    """
    soft, mineral, labels = _pad_posterior(anatomy, PHANTOM_THICKNESS_MM + TABLE_THICKNESS_MM + 6.0)
    _place_phantom_and_table(
        soft, mineral, labels, anatomy.affine, phantom, float(anatomy.pelvis_center_mm[0])
    )
    soft_kvp = soft_tissue_at_kvp(soft, scanner.kvp)
    vessels = None
    if contrast is not None:
        from xbmd.synth.contrast import enhance

        vessels = enhance(soft_kvp, mineral, labels, anatomy, anatomy.affine, contrast)
    hu = scanner.water_hu + soft_kvp
    hu += np.float32(scanner.hu_per_mg_cm3) * mineral
    if anatomy.metal is not None:  # an implant (xbmd.synth.metal): metal HU, then its streaks
        anatomy.metal.add_to_ct(hu, scanner.kvp)
    spacing = np.linalg.norm(anatomy.affine[:3, :3], axis=0)  # (x, y, z) mm
    sigma_vox = scanner.psf_sigma_mm / spacing[::-1]  # array order (z, y, x)
    hu = ndimage.gaussian_filter(hu, sigma_vox, mode="nearest")
    if anatomy.metal is not None:
        anatomy.metal.add_ct_artefacts(hu, spacing)
    hu += _correlated_noise(hu.shape, scanner.noise_hu, rng) * (hu > -950)
    hu += rng.normal(0.0, 3.0, hu.shape).astype(np.float32) * (hu <= -950)  # quieter in air
    ct = Volume(
        np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
        anatomy.affine.copy(),
        unit="HU",
        source="synthetic CT",
        meta={"kvp": scanner.kvp},
    )
    labels_vol = ct.with_data(labels.astype(np.uint8), unit="label")
    labels_vol.source = "synthetic labels"
    return ScanResult(ct, labels_vol, scanner, phantom, vessels)


def _correlated_noise(shape: tuple[int, ...], sd: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with the fine-grained in-plane correlation of a CT kernel, SD ``sd``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, (0.3, 0.7, 0.7), mode="wrap")
    return smooth * np.float32(sd / max(float(smooth.std()), 1e-6))
