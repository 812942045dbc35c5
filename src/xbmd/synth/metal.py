"""Metal of the virtual patients' implants in the CT and in the radiographs.

:class:`MetalVoxels` holds an implant's metal on the anatomy's grid (sparse: the voxels, their
metal volume fraction, material and the body they move with), as ``xbmd.synth.implants`` makes
it. The scanner (``xbmd.synth.scanner.scan``) asks it for the metal's HU (:meth:`add_to_ct`,
before the PSF, so the metal blooms) and for the streaks of the reconstruction
(:meth:`add_ct_artefacts`); the radiographs add the metal's line integral at each device's energy
(:class:`MetalBodies`), posed with the bone that carries it.

Streaks, cheaply: per axial slice, on a 2 mm grid, the metal's projections p (cm of metal,
weighted by its attenuation relative to titanium) over 90 parallel views; beam hardening and
photon starvation make the measured line integrals fall short by ``a g(p)`` with a noise of
``b g(p)`` (``g`` quadratic for thin metal, saturating for thick: ``STREAK_*``); filtered
back-projection of that error is the artefact: dark bands along the rays through most metal
(between two metal parts, along a stem), bright and dark streaks radiating from it. Every
second slice, linearly interpolated between; the clinical reconstruction's detail (fan beam,
helical, metal artefact reduction) is not modelled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from xbmd import units
from xbmd.drr import prepare_volume, render
from xbmd.geometry import BodyPose, PerspectiveGeometry
from xbmd.synth.physics import mu_linear_per_cm
from xbmd.synth.xray_scene import BODIES, BONE_FACTOR, _upsample
from xbmd.volume import Volume, box_affine

#: Material codes of MetalVoxels.material -> the attenuation table's names.
METALS = ("ti6al4v", "cocrmo", "ss316l")
#: The artefact's streak strength: line-integral shortfall a g(p) and its noise b g(p), with
#: g(p) = p^2 / (1 + (p / p_s)^2) (p in cm of titanium-equivalent metal: quadratic for thin
#: metal, saturating for thick); chosen by eye so that a hip replacement's streaks reach a few
#: hundred HU near the metal and fade with distance, as on clinical CT without metal artefact
#: reduction.
STREAK_BH, STREAK_NOISE, STREAK_SATURATION_CM = 0.08, 0.03, 2.5
STREAK_VIEWS = 90
#: Reference energy (keV) at which the metals' relative weights for the streaks are taken.
STREAK_KEV = 70.0


def ct_effective_energy_kev(kvp: float) -> float:
    """Mean energy of a CT beam behind the patient, keV (the radiographs' rule: 0.45 kVp + 19)."""
    return 0.45 * float(kvp) + 19.0


@dataclass
class MetalVoxels:
    """An implant's metal on the anatomy grid, as flat arrays of its voxels.

    index : (k, j, i) grid indices; fraction : metal volume fraction (0, 1], float32;
    material : index into METALS, uint8; owner : the BONE_LABELS id of the bone it moves with
    (the femur for a stem, a nail or screws; a hemipelvis for a cup), uint8; seed : for the
    noise of the CT's streaks.
    """

    index: tuple[np.ndarray, np.ndarray, np.ndarray]
    fraction: np.ndarray
    material: np.ndarray
    owner: np.ndarray
    seed: int

    def add_to_ct(self, hu: np.ndarray, kvp: float) -> None:
        """Add the metal's HU to ``hu`` (K, J, I; the anatomy grid, maybe padded after its
        last row), in place. The anatomy holds air (-1000 HU) where the metal is, so a voxel
        becomes ``(1 - f) tissue + f metal``, with the metal's HU on the extended scale
        (about 10 000 for titanium, 40 000 for cobalt-chromium at 120 kVp)."""
        water = mu_linear_per_cm("water", ct_effective_energy_kev(kvp))
        metal_hu = np.array(
            [1000.0 * (mu_linear_per_cm(m, ct_effective_energy_kev(kvp)) / water - 1.0) + 1000.0
             for m in METALS],
            np.float32,
        )  # fmt: skip
        hu[self.index] += self.fraction * metal_hu[self.material]

    def add_ct_artefacts(self, hu: np.ndarray, spacing_mm) -> None:
        """Add the metal's streak artefacts (HU, module docstring) to ``hu`` (K, J, I; float32;
        the grid of :meth:`add_to_ct`), in place, slice by slice through the metal."""
        spacing = np.asarray(spacing_mm, float)  # (x, y, z)
        shape = hu.shape
        k = self.index[0]
        k0, k1 = int(k.min()), int(k.max()) + 1
        f_xy = max(1, round(2.0 / float(spacing[:2].mean())))
        f_z = max(1, round(2.0 / float(spacing[2])))
        weight = np.array(
            [mu_linear_per_cm(m, STREAK_KEV) / mu_linear_per_cm("ti6al4v", STREAK_KEV)
             for m in METALS]
        )  # fmt: skip
        # metal path length (cm, titanium-equivalent) per coarse in-plane pixel
        jj, ii = self.index[1] // f_xy, self.index[2] // f_xy
        ny, nx = -(-shape[1] // f_xy), -(-shape[2] // f_xy)
        pixel_cm = 0.1 * float(spacing[:2].mean()) * f_xy
        cm = self.fraction * weight[self.material] * (0.1 * float(spacing[:2].mean())) ** 2
        rng = np.random.default_rng(self.seed)
        mu_water = mu_linear_per_cm("water", STREAK_KEV)
        planes = list(range(k0, k1, f_z))
        if planes[-1] != k1 - 1:
            planes.append(k1 - 1)
        slabs = {}
        for kk in planes:
            sel = k == kk
            if not sel.any():
                slabs[kk] = np.zeros((ny, nx), np.float32)
                continue
            area = np.zeros((ny, nx))
            np.add.at(area, (jj[sel], ii[sel]), cm[sel])
            # area / pixel side: the metal's mean chord through the coarse pixel, cm
            slabs[kk] = _streaks(area / pixel_cm, pixel_cm, rng) * np.float32(1000.0 / mu_water)
        done = set()
        for a, b in itertools.pairwise(planes):
            for kk in range(a, b + 1):
                if kk in done:
                    continue
                w = (kk - a) / max(b - a, 1)
                coarse = (1 - w) * slabs[a] + w * slabs[b]
                hu[kk] += _upsample_plane(coarse, f_xy, shape[1:])
                done.add(kk)
        if len(planes) == 1:
            hu[planes[0]] += _upsample_plane(slabs[planes[0]], f_xy, shape[1:])


def _upsample_plane(coarse: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    if factor == 1:
        return coarse[: shape[0], : shape[1]].astype(np.float32)
    fine = ndimage.zoom(coarse, factor, order=1, mode="nearest", grid_mode=True)
    return fine[: shape[0], : shape[1]].astype(np.float32)


def _streaks(metal_cm: np.ndarray, pixel_cm: float, rng: np.random.Generator) -> np.ndarray:
    """Reconstruction error (1/cm) of one slice whose metal chord per pixel is ``metal_cm``:
    parallel projections of the metal p (cm), error -a g(p) + b g(p) N(0, 1), filtered
    back-projection."""
    sino = project(metal_cm)
    g = sino**2 / (1.0 + (sino / STREAK_SATURATION_CM) ** 2)
    error = -STREAK_BH * g + STREAK_NOISE * g * rng.standard_normal(sino.shape)
    return backproject(error, metal_cm.shape, pixel_cm)


def _detector(shape: tuple[int, int]):
    ny, nx = shape
    n_bins = int(np.ceil(np.hypot(ny, nx))) + 3
    theta = np.linspace(0.0, np.pi, STREAK_VIEWS, endpoint=False)
    return n_bins, (n_bins - 1) / 2.0, np.cos(theta), np.sin(theta)


def project(values: np.ndarray) -> np.ndarray:
    """Parallel projections (STREAK_VIEWS views over 180 degrees, bins of one pixel) of a 2D
    image: the sum of the pixel values along each ray, (views, bins). Hand-written (linear
    splatting of each non-zero pixel): a slice holds a few hundred metal pixels, so this is
    much faster than rotating the whole image per view (skimage's radon)."""
    n_bins, centre, cos, sin = _detector(values.shape)
    r, c = np.nonzero(values)
    sino = np.zeros((STREAK_VIEWS, n_bins))
    if r.size == 0:
        return sino
    v = values[r, c]
    y, x = r - (values.shape[0] - 1) / 2.0, c - (values.shape[1] - 1) / 2.0
    for view in range(STREAK_VIEWS):
        s = x * cos[view] + y * sin[view] + centre
        lo = np.floor(s).astype(int)
        w = s - lo
        sino[view] = np.bincount(lo, v * (1 - w), n_bins) + np.bincount(lo + 1, v * w, n_bins)
    return sino


def backproject(sino: np.ndarray, shape: tuple[int, int], pixel_cm: float) -> np.ndarray:
    """Filtered back-projection (Ram-Lak ramp) of ``sino`` from :func:`project` onto an image
    of ``shape`` whose pixels are ``pixel_cm`` wide: a line-integral sinogram (dimensionless)
    gives attenuation in 1/cm. float32."""
    n_bins, centre, cos, sin = _detector(shape)
    pad = 2 ** int(np.ceil(np.log2(2 * n_bins)))
    ramp = np.abs(np.fft.fftfreq(pad))
    filtered = np.real(np.fft.ifft(np.fft.fft(sino, pad, axis=1) * ramp, axis=1))[:, :n_bins]
    ny, nx = shape
    yy = (np.arange(ny) - (ny - 1) / 2.0)[:, None]
    xx = (np.arange(nx) - (nx - 1) / 2.0)[None, :]
    image = np.zeros(shape)
    bins = np.arange(n_bins)
    for view in range(STREAK_VIEWS):
        image += np.interp(xx * cos[view] + yy * sin[view] + centre, bins, filtered[view])
    return (image * np.pi / STREAK_VIEWS / pixel_cm).astype(np.float32)


class MetalBodies:
    """The implant's metal of one patient, ready to render: per material, one body per bone
    that carries metal (volume fraction rendered as path length, cm)."""

    def __init__(self, metal: MetalVoxels, affine: np.ndarray, shape: tuple[int, int, int]):
        owner_body = {ident: name for name, ids in BODIES.items() for ident in ids}
        self.groups: dict[str, list] = {}
        for m_code, material in enumerate(METALS):
            for owner in np.unique(metal.owner[metal.material == m_code]):
                sel = (metal.material == m_code) & (metal.owner == owner)
                idx = tuple(a[sel] for a in metal.index)
                box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in idx)
                data = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
                data[tuple(a - s.start for a, s in zip(idx, box, strict=True))] = metal.fraction[
                    sel
                ]
                volume = Volume(data, box_affine(affine, box), units.PER_CM, f"metal {material}")
                body = prepare_volume(volume, "attenuation")
                self.groups.setdefault(material, []).append((owner_body[int(owner)], body))

    def line_integral(
        self, poses: dict[str, BodyPose], geometry: PerspectiveGeometry, energy_kev: float
    ) -> np.ndarray:
        """The metal's dimensionless line integral (rows, cols) at ``energy_kev``."""
        out = None
        with torch.no_grad():
            for material, group in self.groups.items():
                bodies, vectors = [], []
                for name, body in group:
                    body.isocenter_mm = poses[name].isocenter_mm
                    bodies.append(body)
                    vectors.append(
                        torch.as_tensor(poses[name].transform.as_vector(), dtype=torch.float64)
                    )
                path_cm = render(bodies, vectors, geometry.binned(BONE_FACTOR))
                li = mu_linear_per_cm(material, energy_kev) * _upsample(path_cm, BONE_FACTOR)[0]
                out = li if out is None else out + li
        return out
