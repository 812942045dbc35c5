"""Write ``src/xbmd/data/attenuation.json``: mass attenuation coefficients for the radiograph model.

Run once when the table should change (needs ``xraydb``, a bench extra, not a runtime
dependency; the table it writes is committed package data)::

    .venv/bin/python scripts/make_attenuation_table.py

Coefficients are total mass attenuation (coherent scattering included) from the Elam et al.
tables in xraydb, which agree with NIST XCOM to about 1 % at 30-100 keV. Mixtures are
mass-fraction weighted sums of the elements. Tissue compositions: ICRU-44 skeletal muscle and
ICRU-46 adipose tissue 3 (Woodard & White 1986); hydroxyapatite Ca10(PO4)6(OH)2, crystal
density 3.16 g/cm3. Lead is for the side marker; the metals (titanium alloy Ti-6Al-4V,
cobalt-chromium-molybdenum, stainless steel 316L) for the implants of the virtual cohort.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xraydb

from xbmd.ct.materials import (
    ADIPOSE_3,
    COCRMO,
    HYDROXYAPATITE,
    LEAD,
    METAL_DENSITIES_G_CM3,
    MUSCLE,
    SS316L,
    TI6AL4V,
    WATER,
)

OUT = Path(__file__).resolve().parents[1] / "src" / "xbmd" / "data" / "attenuation.json"
ENERGIES_KEV = np.arange(30.0, 100.01, 1.0)

#: Mass fractions (%) per material (xbmd.ct.materials, shared with benchmarks/bench_calibration.py).
COMPOSITIONS = {
    "water": WATER,
    "adipose": ADIPOSE_3,
    "muscle": MUSCLE,
    "lead": LEAD,
    "hydroxyapatite": HYDROXYAPATITE,
    "ti6al4v": TI6AL4V,
    "cocrmo": COCRMO,
    "ss316l": SS316L,
}
DENSITIES_G_CM3 = {
    "water": 1.0,
    "adipose": 0.95,
    "muscle": 1.05,
    "lead": 11.35,
    "hydroxyapatite": 3.16,
    **METAL_DENSITIES_G_CM3,
}


def mass_attenuation_cm2_g(composition: dict[str, float], energy_kev: np.ndarray) -> np.ndarray:
    """Total mass attenuation (cm2/g) of a mixture given by mass fractions, at ``energy_kev``."""
    total = sum(composition.values())
    mu = np.zeros_like(energy_kev)
    for element, fraction in composition.items():
        mu += fraction / total * np.asarray(xraydb.mu_elam(element, energy_kev * 1000.0))
    return mu


def main() -> None:
    table = {
        "description": "total mass attenuation coefficients (cm2/g), coherent scattering included",
        "source": f"xraydb {xraydb.__version__} (Elam, Ravel & Sieber 2002), "
        "mixtures by mass fraction; scripts/make_attenuation_table.py",
        "energies_kev": [round(float(e), 3) for e in ENERGIES_KEV],
        "densities_g_cm3": DENSITIES_G_CM3,
        "compositions_mass_percent": {
            k: {el: round(v, 4) for el, v in c.items()} for k, c in COMPOSITIONS.items()
        },
        "mass_attenuation_cm2_g": {
            name: [float(f"{v:.6g}") for v in mass_attenuation_cm2_g(comp, ENERGIES_KEV)]
            for name, comp in COMPOSITIONS.items()
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(ENERGIES_KEV)} energies, {len(COMPOSITIONS)} materials)")


if __name__ == "__main__":
    main()
