"""Elemental compositions (mass %) of the materials whose X-ray attenuation xbmd models.

ICRU-44 / ICRU-46 body tissues (Woodard & White 1986), water, dry air, lead and hydroxyapatite
Ca10(PO4)6(OH)2, and the implant metals of the virtual cohort (ASTM F136 titanium alloy
Ti-6Al-4V, ASTM F75 cobalt-chromium-molybdenum, ASTM F138 stainless steel 316L; nominal
compositions within the standards' ranges). Used offline with xraydb by
``scripts/make_attenuation_table.py`` (which writes ``data/attenuation.json``) and
``benchmarks/bench_calibration.py`` (which derives the phantom-less calibration's reference
values); kept here so that both use the same numbers.
"""

from __future__ import annotations

WATER = {"H": 11.19, "O": 88.81}
AIR = {"C": 0.0124, "N": 75.5268, "O": 23.1781, "Ar": 1.2827}
ADIPOSE_2 = {"H": 11.4, "C": 59.8, "N": 0.7, "O": 27.8, "Na": 0.1, "S": 0.1, "Cl": 0.1}
ADIPOSE_3 = {"H": 11.6, "C": 68.1, "N": 0.2, "O": 19.8, "Na": 0.1, "S": 0.1, "Cl": 0.1}
MUSCLE = {"H": 10.2, "C": 14.3, "N": 3.4, "O": 71.0, "Na": 0.1, "P": 0.2, "S": 0.3, "Cl": 0.1,
          "K": 0.4}  # fmt: skip
BLOOD = {"H": 10.2, "C": 11.0, "N": 3.3, "O": 74.5, "Na": 0.1, "P": 0.1, "S": 0.2, "Cl": 0.3,
         "K": 0.2, "Fe": 0.1}  # fmt: skip
LEAD = {"Pb": 100.0}
_HA_MOLAR_G = {"Ca": 10 * 40.078, "P": 6 * 30.974, "O": 26 * 15.999, "H": 2 * 1.008}
HYDROXYAPATITE = {el: 100.0 * m / sum(_HA_MOLAR_G.values()) for el, m in _HA_MOLAR_G.items()}
#: Density of hydroxyapatite crystal: a grain of mineral displaces water of its own volume.
HA_CRYSTAL_G_CM3 = 3.16
#: Implant metals (mass %, nominal compositions within the ASTM ranges) and their densities.
TI6AL4V = {"Ti": 89.8, "Al": 6.0, "V": 4.0, "Fe": 0.2}  # ASTM F136
COCRMO = {"Co": 64.3, "Cr": 28.0, "Mo": 6.0, "Ni": 0.5, "Mn": 0.6, "Si": 0.6}  # ASTM F75
SS316L = {"Fe": 64.0, "Cr": 18.0, "Ni": 14.0, "Mo": 2.5, "Mn": 1.0, "Si": 0.5}  # ASTM F138
METAL_DENSITIES_G_CM3 = {"ti6al4v": 4.43, "cocrmo": 8.3, "ss316l": 8.0}
