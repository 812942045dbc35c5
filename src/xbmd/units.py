"""Units of volumes and the conversions between them.

Volumes carry one of the units below. Line integrals (DRRs) convert to areal units:
    density     mg/cm3 x mm  ->  g/cm2   (factor 1e-4)
    attenuation 1/cm   x mm  ->  dimensionless  (factor 0.1)
"""

from __future__ import annotations

import numpy as np

HU = "HU"
MG_CM3 = "mg/cm3"
PER_CM = "1/cm"
LABEL = "label"
VOLUME_UNITS = (HU, MG_CM3, PER_CM, LABEL)

#: g/cm2 per (mg/cm3 x mm): 1 mg = 1e-3 g, 1 mm = 0.1 cm.
G_CM2_PER_MG_CM3_MM = 1e-4
#: dimensionless per (1/cm x mm).
PER_CM_MM_TO_ONE = 0.1

#: Linear attenuation of water at the default effective energy (about 60 keV), 1/cm.
#: NIST XCOM: water 0.2059 cm2/g at 60 keV, density 1 g/cm3.
MU_WATER_PER_CM = 0.2059


def check_unit(unit: str) -> str:
    """Return ``unit`` if it is a known volume unit, else raise ValueError naming the valid ones."""
    if unit not in VOLUME_UNITS:
        raise ValueError(f"unit must be one of {', '.join(VOLUME_UNITS)}, not {unit!r}")
    return unit


def hu_to_attenuation(hu: np.ndarray, mu_water_per_cm: float = MU_WATER_PER_CM) -> np.ndarray:
    """Linear attenuation (1/cm) from Hounsfield units, clipped at 0 (air and below).

    mu = mu_water * (1 + HU / 1000): water 0 HU -> mu_water, air -1000 HU -> 0.
    """
    mu = mu_water_per_cm * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)
    return np.maximum(mu, 0.0).astype(np.float32)
