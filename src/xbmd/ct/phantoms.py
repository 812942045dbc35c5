"""A hip-like test CT with a calibration phantom: for the demo, benchmarks and tests.

This is a simple analytic object (ellipses, cylinders, spheres), not the realistic virtual cohort
(``xbmd synth``, a later issue). It has what the foundation needs: a body with fat and muscle, two
proximal femurs with a cortical shell and trabecular interior, a crude pelvis, a patient table, and
five hydroxyapatite rods under the patient, in HU on a per-scan scale, with known mineral density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from xbmd.volume import Volume

#: Label ids of the test CT (the virtual cohort keeps the same ids).
LABELS = {"pelvis_right": 1, "pelvis_left": 2, "femur_right": 3, "femur_left": 4}
#: Rod label id -> hydroxyapatite density, mg/cm3 (B-MAS200-like).
ROD_DENSITIES_MG_CM3 = {201: 0.0, 202: 50.0, 203: 100.0, 204: 150.0, 205: 200.0}


@dataclass
class TestCT:
    """The test CT and what is known about it."""

    ct: Volume  # HU
    labels: Volume  # label ids, see LABELS and ROD_DENSITIES_MG_CM3
    mineral: Volume  # true mineral density, mg/cm3 (0 outside bone and rods)
    hu_per_mg_cm3: float  # scanner's HU per mg/cm3 of hydroxyapatite
    water_hu: float  # HU of water on this scanner (offset)
    femoral_heads_mm: dict  # side -> femoral head centre, LPS mm


def hip_test_ct(
    shape: tuple[int, int, int] = (133, 512, 512),
    spacing_mm: tuple[float, float, float] = (0.8, 0.8, 2.0),
    seed: int = 0,
    noise_hu: float = 12.0,
    hu_per_mg_cm3: float = 1.2,
    water_hu: float = 5.0,
    psf_sigma_mm: float = 0.6,
    marrow_hu: float = -30.0,
) -> TestCT:
    """Build the test CT.

    Parameters
    ----------
    shape : (K, J, I) voxels: axial slices (S-I), rows (A-P), columns (L-R).
    spacing_mm : (i, j, k) spacing in mm (ITK order).
    seed : noise seed; the object itself is deterministic.
    noise_hu : standard deviation of the CT noise, HU.
    hu_per_mg_cm3, water_hu : the scanner's HU scale for hydroxyapatite and its water offset.
    psf_sigma_mm : Gaussian blur of the scanner's point-spread function (0.6 mm: FWHM 1.4 mm, a
        clinical CT); 0 keeps perfectly sharp edges.
    marrow_hu : water-equivalent HU of the marrow around trabeculae. Fatty marrow (< 0) reads as
        negative mineral: the known fat error of single-energy QCT (about -25 mg/cm3 here).
    """
    k_n, j_n, i_n = shape
    sx, sy, sz = spacing_mm
    origin = np.array([-(i_n - 1) / 2 * sx, -(j_n - 1) / 2 * sy, -(k_n - 1) / 2 * sz])
    x = (origin[0] + np.arange(i_n, dtype=np.float32) * sx)[None, None, :]
    y = (origin[1] + np.arange(j_n, dtype=np.float32) * sy)[None, :, None]
    z = (origin[2] + np.arange(k_n, dtype=np.float32) * sz)[:, None, None]
    fov_x = i_n * sx

    # soft tissue in water-equivalent HU (before the scanner offset)
    a_body, b_body = 0.42 * fov_x, 0.28 * fov_x
    body = (x / a_body) ** 2 + (y / b_body) ** 2 <= 1.0
    muscle = (x / (a_body - 25)) ** 2 + (y / (b_body - 20)) ** 2 <= 1.0
    hu = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), -1000.0, np.float32)
    hu[np.broadcast_to(body, hu.shape)] = -100.0  # fat
    hu[np.broadcast_to(muscle, hu.shape)] = 50.0
    labels = np.zeros(hu.shape, np.uint8)
    mineral = np.zeros(hu.shape, np.float32)

    heads = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        cx = sign * 0.22 * fov_x  # patient's right is -x (LPS)
        heads[side] = _femur(x, y, z, cx, mineral, labels, LABELS[f"femur_{side}"])
        _hemipelvis(x, y, z, cx, mineral, labels, LABELS[f"pelvis_{side}"])

    # table under the patient (posterior) and the rods lying on it
    table_y = b_body + 12.0
    table = (np.abs(y - table_y) <= 8.0) & (np.abs(x) <= 0.45 * fov_x)
    hu[np.broadcast_to(table, hu.shape)] = -300.0
    for n, (lab, dens) in enumerate(sorted(ROD_DENSITIES_MG_CM3.items())):
        rx = (n - 2) * 0.11 * fov_x
        rod = ((x - rx) ** 2 + (y - (b_body + 2.0)) ** 2 <= 6.0**2) & np.ones_like(z, bool)
        labels[rod] = lab
        hu[rod] = 0.0
        mineral[rod] = dens

    bone = mineral > 0
    hu[bone] = np.where(labels[bone] >= 201, 0.0, marrow_hu)  # rods: water-equivalent resin
    hu = hu + hu_per_mg_cm3 * mineral
    hu[hu > -1000] += water_hu
    if psf_sigma_mm > 0:
        hu = gaussian_filter(hu, psf_sigma_mm / np.array([sz, sy, sx]), mode="nearest")
    rng = np.random.default_rng(seed)
    hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    np.clip(hu, -1024, None, out=hu)

    def vol(data, unit):
        return Volume.from_geometry(data, spacing_mm, origin, unit=unit, source="hip_test_ct")

    return TestCT(
        ct=vol(hu, "HU"),
        labels=vol(labels, "label"),
        mineral=vol(mineral, "mg/cm3"),
        hu_per_mg_cm3=hu_per_mg_cm3,
        water_hu=water_hu,
        femoral_heads_mm=heads,
    )


def _femur(x, y, z, cx, mineral, labels, label_id) -> np.ndarray:
    """Femoral head (sphere), neck (tilted cylinder) and shaft with cortex and canal.

    Returns the head centre (LPS mm)."""
    head_c = np.array([cx, 5.0, 40.0])
    shaft_x = cx + np.sign(cx) * 40.0
    r_head = 23.0
    head = (x - head_c[0]) ** 2 + (y - head_c[1]) ** 2 + (z - head_c[2]) ** 2 <= r_head**2
    # neck axis from head centre towards the shaft top, radius 15 mm
    top = np.array([shaft_x, 5.0, 0.0])
    axis = (top - head_c) / np.linalg.norm(top - head_c)
    rel = [x - head_c[0], y - head_c[1], z - head_c[2]]
    t = rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]
    perp2 = sum(r * r for r in rel) - t * t
    neck = (perp2 <= 15.0**2) & (t >= 0) & (t <= np.linalg.norm(top - head_c) + 5)
    r_shaft = np.hypot(x - shaft_x, y - 5.0)
    shaft_outer = (r_shaft <= 15.0) & (z <= 5.0)
    trochanter = ((x - (shaft_x + np.sign(cx) * 12)) ** 2 + (y - 2) ** 2 + (z - 5) ** 2) <= 20.0**2
    femur = head | neck | shaft_outer | trochanter
    cortex_shaft = shaft_outer & (r_shaft > 10.0)
    canal = (r_shaft <= 10.0) & (z <= -30.0)
    dens = np.where(femur, 180.0, 0.0).astype(np.float32)
    dens[np.broadcast_to(cortex_shaft & (z <= -30.0), dens.shape)] = 1000.0
    dens[np.broadcast_to(canal, dens.shape)] = 0.0
    region = np.broadcast_to(femur & ~canal, mineral.shape)
    mineral[region] = np.broadcast_to(dens, mineral.shape)[region]
    labels[region] = label_id
    return head_c


def _hemipelvis(x, y, z, cx, mineral, labels, label_id) -> None:
    """A crude hemipelvis: an acetabular shell above the head and an iliac plate."""
    hx, hz = cx, 40.0
    r = np.sqrt((x - hx) ** 2 + (y - 5.0) ** 2 + (z - hz) ** 2)
    shell = (r >= 26.0) & (r <= 34.0) & (z >= hz - 5.0)
    ilium = (
        (np.abs(y - 15.0 + 0.3 * (z - hz)) <= 6.0)
        & (np.abs(x - cx * 0.8) <= 55.0)
        & (z >= hz + 20.0)
        & (z <= hz + 110.0)
    )
    region = np.broadcast_to(shell | ilium, mineral.shape) & (labels == 0)
    mineral[region] = 250.0
    labels[region] = label_id
