"""How exact is phantom-less CT calibration? Simulated scanners, synthetic CTs, known truth.

Each simulated scan has a tube voltage (100, 120 or 140 kVp), an effective energy that varies
around the nominal one for that voltage (patient size, filtration, vendor), a small water/air
miscalibration of its HU scale, and a patient whose fat and muscle composition varies. Linear
attenuation comes from elemental mass attenuation coefficients (xraydb: Elam et al. tables,
which agree with NIST XCOM at these energies) and ICRU tissue compositions, so the HU of fat,
muscle and of hydroxyapatite (HA) rods change with energy as they do in a scanner.

A small CT of each scan (air, subcutaneous fat, muscle, a 150 and an 800 mg/cm3 HA region, a
five-rod HA phantom below the patient), blurred and noisy, is calibrated twice:
with the phantom rods (``phantom_calibration``) and without (``phantomless_calibration``, tissues
found automatically). Both lines are compared with the scan's true HA line at 150 and 800 mg/cm3.

Usage::

    pip install -c constraints.txt -e '.[bench]'     # xraydb
    python benchmarks/bench_calibration.py            # error tables (about 30 s)
    python benchmarks/bench_calibration.py --table    # derive REFERENCE_TISSUES_MG_CM3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from scipy import ndimage

from xbmd.ct.calibration import (
    REFERENCE_TISSUES_MG_CM3,
    Phantom,
    Rod,
    phantom_calibration,
    phantomless_calibration,
    region_median_hu,
)
from xbmd.ct.materials import (
    ADIPOSE_2,
    ADIPOSE_3,
    AIR,
    BLOOD,
    HA_CRYSTAL_G_CM3,
    HYDROXYAPATITE,
    MUSCLE,
    WATER,
)
from xbmd.volume import Volume

try:
    import xraydb
except ImportError:  # pragma: no cover - a hint, not a test
    sys.exit("needs xraydb: pip install -c constraints.txt -e '.[bench]'")

# Mass fractions (%) of the materials: xbmd.ct.materials (ICRU-44 / ICRU-46 tissues).
HA = HYDROXYAPATITE  # Ca10(PO4)6(OH)2
DENSITY_G_CM3 = {
    "water": 1.0,
    "air": 0.001205,
    "fat": 0.93,
    "fat2": 0.95,
    "muscle": 1.05,
    "blood": 1.06,
}

#: Nominal effective energy (keV) of a patient-filtered spectrum at each tube voltage.
EFFECTIVE_KEV = {80: 54.0, 100: 62.0, 120: 70.0, 140: 77.0}
ROD_DENSITIES = (0.0, 50.0, 100.0, 150.0, 200.0)
CHECK_DENSITIES = (150.0, 800.0)


@cache
def _element_table(element: str) -> tuple[np.ndarray, np.ndarray]:
    energy_kev = np.arange(40.0, 100.01, 0.25)
    return energy_kev, np.asarray(xraydb.mu_elam(element, energy_kev * 1000.0), dtype=np.float64)


def mass_attenuation(composition: dict[str, float], energy_kev: float) -> float:
    """Mass attenuation coefficient (cm2/g) of a mixture given by mass fractions."""
    total = sum(composition.values())
    return sum(
        w / total * float(np.interp(energy_kev, *_element_table(el)))
        for el, w in composition.items()
    )


@dataclass(frozen=True)
class Scan:
    """One simulated acquisition: scanner state and patient tissue composition."""

    kvp: int
    energy_kev: float
    water_offset_hu: float = 0.0  # HU of water on this scanner (QA tolerance about +-4)
    hu_scale: float = 1.0  # gain error of the HU scale
    fat_shift: float = 0.0  # 0 = adipose tissue 3; 1 = adipose tissue 2 (more water)
    muscle_fat_fraction: float = 0.0  # intramuscular fat, volume fraction
    muscle_density_factor: float = 1.0

    def _mu(self, composition: dict[str, float], density_g_cm3: float) -> float:
        return mass_attenuation(composition, self.energy_kev) * density_g_cm3

    def hu(self, mu_per_cm: float) -> float:
        """Measured HU of a material of linear attenuation ``mu_per_cm`` on this scanner."""
        mu_w = self._mu(WATER, DENSITY_G_CM3["water"])
        mu_air = self._mu(AIR, DENSITY_G_CM3["air"])
        return 1000.0 * (mu_per_cm - mu_w) / (mu_w - mu_air) * self.hu_scale + self.water_offset_hu

    def ha_in_water_hu(self, density_mg_cm3: float) -> float:
        rho_g = density_mg_cm3 / 1000.0
        mu = self._mu(WATER, 1.0) * (1.0 - rho_g / HA_CRYSTAL_G_CM3) + self._mu(HA, rho_g)
        return self.hu(mu)

    def true_line(self) -> tuple[float, float]:
        """(slope mg/cm3 per HU, intercept mg/cm3) of HA in water: what a perfect phantom gives."""
        h0, h1 = self.ha_in_water_hu(0.0), self.ha_in_water_hu(1000.0)
        slope = 1000.0 / (h1 - h0)
        return slope, -slope * h0

    def tissue_hu(self) -> dict[str, float]:
        fat = {
            el: ADIPOSE_3.get(el, 0)
            + self.fat_shift * (ADIPOSE_2.get(el, 0) - ADIPOSE_3.get(el, 0))
            for el in ADIPOSE_3
        }
        fat_density = DENSITY_G_CM3["fat"] + self.fat_shift * (
            DENSITY_G_CM3["fat2"] - DENSITY_G_CM3["fat"]
        )
        mu_fat = self._mu(fat, fat_density)
        mu_lean = self._mu(MUSCLE, DENSITY_G_CM3["muscle"] * self.muscle_density_factor)
        mu_fat3 = self._mu(ADIPOSE_3, DENSITY_G_CM3["fat"])
        f = self.muscle_fat_fraction
        return {
            "air": self.hu(self._mu(AIR, DENSITY_G_CM3["air"])),
            "fat": self.hu(mu_fat),
            "muscle": self.hu((1 - f) * mu_lean + f * mu_fat3),
            "blood": self.hu(self._mu(BLOOD, DENSITY_G_CM3["blood"])),
        }


def derive_reference_table() -> dict[int, dict[str, float]]:
    """HA-equivalent density of the reference tissues at each nominal kVp (ideal scanner)."""
    table = {}
    for kvp, energy in EFFECTIVE_KEV.items():
        scan = Scan(kvp=kvp, energy_kev=energy)
        slope, intercept = scan.true_line()
        table[kvp] = {t: round(slope * h + intercept, 1) for t, h in scan.tissue_hu().items()}
    return table


# ------------------------------------------------------------------------------------------------
# Synthetic CT

SHAPE = (10, 72, 72)  # (K, J, I) voxels of 1 mm
ROD_ROW, ROD_COLS, ROD_RADIUS = 63, (10, 23, 36, 49, 62), 4.5


def _ellipse(rows: np.ndarray, cols: np.ndarray, centre, radii) -> np.ndarray:
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def synthetic_ct(
    scan: Scan, rng: np.random.Generator, noise_hu: float = 15.0
) -> tuple[Volume, Volume, Volume]:
    """(ct, rod labels, bone labels: 1 = 150 mg/cm3, 2 = 800 mg/cm3) of one simulated scan."""
    rows, cols = np.mgrid[: SHAPE[1], : SHAPE[2]].astype(np.float64)
    tissue = scan.tissue_hu()
    plane = np.full(SHAPE[1:], tissue["air"])
    plane[_ellipse(rows, cols, (29, 36), (23, 30))] = tissue["fat"]
    plane[_ellipse(rows, cols, (29, 36), (18, 25))] = tissue["muscle"]
    bones = np.zeros(SHAPE[1:], dtype=np.int16)
    bones[_ellipse(rows, cols, (29, 24), (6, 6))] = 1
    bones[_ellipse(rows, cols, (29, 48), (5, 5))] = 2
    plane[bones == 1] = scan.ha_in_water_hu(CHECK_DENSITIES[0])
    plane[bones == 2] = scan.ha_in_water_hu(CHECK_DENSITIES[1])
    plane[56:71, 3:70] = scan.ha_in_water_hu(0.0)  # phantom body, water-equivalent
    rods = np.zeros(SHAPE[1:], dtype=np.int16)
    for n, (col, density) in enumerate(zip(ROD_COLS, ROD_DENSITIES, strict=True)):
        inside = _ellipse(rows, cols, (ROD_ROW, col), (ROD_RADIUS, ROD_RADIUS))
        rods[inside] = 101 + n
        plane[inside] = scan.ha_in_water_hu(density)
    plane = ndimage.gaussian_filter(plane, 0.7)  # scanner point spread: partial volume at edges
    data = np.repeat(plane[None], SHAPE[0], axis=0) + rng.normal(0.0, noise_hu, SHAPE)
    ct = Volume.from_geometry(
        data.astype(np.float32), (1.0, 1.0, 1.0), unit="HU", source=f"sim {scan.kvp} kVp"
    )

    def label_volume(a: np.ndarray) -> Volume:
        return Volume.from_geometry(
            np.repeat(a[None], SHAPE[0], axis=0), (1.0, 1.0, 1.0), unit="label"
        )

    return ct, label_volume(rods), label_volume(bones)


PHANTOM = Phantom(
    name="simulated 5-rod HA",
    rods=tuple(Rod(label=101 + n, density_mg_cm3=d) for n, d in enumerate(ROD_DENSITIES)),
)


# ------------------------------------------------------------------------------------------------
# Experiments


@dataclass(frozen=True)
class Setting:
    """Which sources of error a simulated population has."""

    name: str
    energy_sd_kev: float = 3.0
    tissue_variation: bool = True
    scanner_drift: bool = True
    assumed_kvp: float | None = None  # None: the calibration is told the scan's kVp


SETTINGS = (
    Setting("all effects, kVp known"),
    Setting("all effects, kVp unknown (120 assumed)", assumed_kvp=120.0),
    Setting("effective energy spread only", tissue_variation=False, scanner_drift=False),
    Setting("effective energy spread halved (SD 1.5 keV) only", 1.5, False, False),
    Setting("tissue composition only", energy_sd_kev=0.0, scanner_drift=False),
    Setting("none (noise, blur, segmentation)", 0.0, tissue_variation=False, scanner_drift=False),
)


def sample_scan(setting: Setting, kvp: int, rng: np.random.Generator) -> Scan:
    scan = Scan(kvp=kvp, energy_kev=EFFECTIVE_KEV[kvp] + rng.normal(0.0, setting.energy_sd_kev))
    if setting.scanner_drift:
        scan = replace(
            scan, water_offset_hu=rng.normal(0.0, 2.0), hu_scale=1.0 + rng.normal(0.0, 0.005)
        )
    if setting.tissue_variation:
        scan = replace(
            scan,
            fat_shift=rng.uniform(-0.5, 0.5),
            muscle_fat_fraction=rng.uniform(0.0, 0.10),
            muscle_density_factor=1.0 + rng.normal(0.0, 0.005),
        )
    return scan


def run_setting(
    setting: Setting, scans_per_kvp: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Errors (calibrated minus true, mg/cm3), one row per scan, columns = CHECK_DENSITIES."""
    errors: dict[str, list] = {"phantomless": [], "phantom": [], "bone_phantomless": [], "kvp": []}
    for kvp in (100, 120, 140):
        for _ in range(scans_per_kvp):
            scan = sample_scan(setting, kvp, rng)
            ct, rods, bones = synthetic_ct(scan, rng)
            slope, intercept = scan.true_line()
            true_hu = [(rho - intercept) / slope for rho in CHECK_DENSITIES]
            internal = phantomless_calibration(ct, kvp=setting.assumed_kvp or kvp)
            phantom = phantom_calibration(ct, rods, PHANTOM)
            bone_hu = [region_median_hu(ct.data, bones.data, lab)[0] for lab in (1, 2)]
            errors["phantomless"].append(
                [
                    internal.density_mg_cm3(h) - r
                    for h, r in zip(true_hu, CHECK_DENSITIES, strict=True)
                ]
            )
            errors["phantom"].append(
                [
                    phantom.density_mg_cm3(h) - r
                    for h, r in zip(true_hu, CHECK_DENSITIES, strict=True)
                ]
            )
            errors["bone_phantomless"].append(
                [
                    internal.density_mg_cm3(h) - r
                    for h, r in zip(bone_hu, CHECK_DENSITIES, strict=True)
                ]
            )
            errors["kvp"].append(kvp)
    return {k: np.asarray(v) for k, v in errors.items()}


def _stats(err: np.ndarray, density: float) -> str:
    rms = float(np.sqrt(np.mean(err**2)))
    p95 = float(np.percentile(np.abs(err), 95))
    pct = 100.0 / density
    return f"{err.mean():+6.1f} | {rms:5.1f} ({rms * pct:4.1f} %) | {p95:5.1f} ({p95 * pct:4.1f} %)"


def report(setting: Setting, errors: dict[str, np.ndarray]) -> None:
    """One markdown table per setting: bias, RMS and 95th percentile of |error|, mg/cm3 (%)."""
    print(f"\n{setting.name} ({len(errors['kvp'])} scans)\n")
    head = " | ".join(f"bias {d:g} | RMS {d:g} | 95% abs {d:g}" for d in CHECK_DENSITIES)
    print(f"| calibration | scans | {head} |")
    print("|---|---|" + "---|" * 3 * len(CHECK_DENSITIES))
    everything = np.ones(len(errors["kvp"]), dtype=bool)
    groups = [("phantom-less line", "all", everything)]
    groups += [("phantom-less line", f"{k} kVp", errors["kvp"] == k) for k in (100, 120, 140)]
    groups += [
        ("phantom-less, bone regions", "all", everything),
        ("phantom line", "all", everything),
    ]
    key = {"phantom-less line": "phantomless", "phantom-less, bone regions": "bone_phantomless"}
    for name, scans, rows in groups:
        err = errors[key.get(name, "phantom")][rows]
        cells = " | ".join(_stats(err[:, j], d) for j, d in enumerate(CHECK_DENSITIES))
        print(f"| {name} | {scans} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=100, help="scans per kVp and setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--table", action="store_true", help="print the derived reference table and exit"
    )
    args = parser.parse_args()
    table = derive_reference_table()
    if args.table:
        for kvp, row in table.items():
            slope = Scan(kvp=kvp, energy_kev=EFFECTIVE_KEV[kvp]).true_line()[0]
            print(
                f"{kvp} kVp ({EFFECTIVE_KEV[kvp]:g} keV, HA slope {slope:.4f} mg/cm3 per HU): {row}"
            )
        print(
            "matches xbmd.ct.calibration.REFERENCE_TISSUES_MG_CM3:",
            table == REFERENCE_TISSUES_MG_CM3,
        )
        return
    if table != REFERENCE_TISSUES_MG_CM3:
        print("warning: xbmd's REFERENCE_TISSUES_MG_CM3 differs from this derivation:", table)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"error = calibrated minus true density, mg/cm3 (% of the density); seed {args.seed}")
    for setting in SETTINGS:
        report(setting, run_setting(setting, args.scans, rng))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
