"""A line-integral image -> a processed AP hip X-ray: the whole chain in :func:`expose`.

The steps, each a function of its own so it can be tested and swapped, live in three modules:

- ``xbmd.synth.device``: the radiography system (:class:`~xbmd.synth.device.XrayDevice`), drawn
  from six vendor-like families by :func:`~xbmd.synth.device.sample_device`;
- ``xbmd.synth.physics``: 1. attenuation at the device's effective energy
  (:func:`~xbmd.synth.physics.attenuation_at`); 2. primary fluence: heel effect along the rows
  (the anode-cathode axis runs head-foot, as for a pelvis on a table), cos^3 obliquity of the
  ray, the collimated field with a penumbra, a lead side marker, Beer-Lambert
  ``exp(-line_integral)``; 3. scatter; 4. exposure: automatic exposure control (AEC) chambers
  set the dose so that the field centre receives a target number of detected quanta, or a
  fixed manual technique; 5. detection: Poisson quantum noise, scintillator / phosphor blur
  with a long tail, additive electronic noise, all in detected quanta per pixel;
- ``xbmd.synth.processing``: 6. vendor processing: log, histogram analysis of the collimated
  field, multi-scale contrast equalisation (band-pass gains with a power law, latitude
  compression, noise coring), an S-shaped LUT with gamma, quantisation to ``bits_stored``,
  shutter; or, for a device with a ``processing_graph``, the randomised processing of
  ``xbmd.synth.processing_graph``.

Pixel convention (``xbmd.io.xray.XRay``): bone BRIGHT in the returned values, whatever the
device's photometric interpretation; ``write_xray_dicom`` inverts for MONOCHROME1 itself.
Geometry: rows grow towards the patient's feet, columns towards the patient's left, so the
patient's right (and the 'R' marker) is on the image left (``xbmd.geometry``).
"""

from __future__ import annotations

import numpy as np

from xbmd.errors import InputError
from xbmd.geometry import PerspectiveGeometry
from xbmd.synth.device import XrayDevice
from xbmd.synth.physics import (
    _spacing_pair,
    behind_patient,
    detector_response,
    field_weight,
    incident_quanta_per_pixel,
    marker_attenuation,
    quantum_noise,
    relative_fluence,
    scatter_field,
)
from xbmd.synth.processing import process, to_stored
from xbmd.synth.processing_graph import process_graph


def expose(
    line_integral: np.ndarray,
    *,
    pixel_spacing_mm,
    device: XrayDevice,
    rng: np.random.Generator,
    field_mask: np.ndarray | None = None,
    marker: str | None = None,
    geometry: PerspectiveGeometry | None = None,
    exclude_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Simulate the acquisition and vendor processing of one radiograph.

    Parameters
    ----------
    line_integral : ndarray of shape (rows, cols)
        Dimensionless total attenuation ∫mu dl through the patient at
        ``device.effective_energy_kev`` (soft tissue + ``bone_excess_cm2_g`` x mineral g/cm2).
    pixel_spacing_mm : float or (row, col), at the detector, mm.
    device : XrayDevice (e.g. from :func:`xbmd.synth.device.sample_device`).
    rng : numpy Generator: quantum and electronic noise, marker jitter.
    field_mask : bool (rows, cols), True inside the collimated field; None = whole detector.
    marker : 'R', 'L' or None: lead side marker near the upper outer corner of that side.
    geometry : PerspectiveGeometry of the image, for the cos^3 fall-off and the heel effect.
    exclude_mask : bool (rows, cols), pixels the processing's histogram analysis leaves out
        (metal implants); None = none.

    Returns
    -------
    pixels : ndarray of uint16, shape (rows, cols), in [0, 2**device.bits_stored - 1], bone
        bright (``write_xray_dicom`` stores MONOCHROME1 inverted itself).
    info : dict, JSON-serialisable: the device, exposure (N0, quanta, SPR), marker, windowing.

    Examples
    --------
    >>> from xbmd.synth.device import sample_device
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
    if exclude_mask is not None:
        exclude_mask = _check_field(exclude_mask, li.shape, may_be_empty=True)
    if device.processing_graph is None:
        display, proc_info = process(signal, field, spacing, device, n0, exclude_mask)
    else:
        display, proc_info = process_graph(signal, field, spacing, device, n0, exclude_mask)
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


def _check_field(field_mask, shape, may_be_empty: bool = False) -> np.ndarray:
    if field_mask is None:
        return np.ones(shape, dtype=bool)
    field = np.asarray(field_mask, dtype=bool)
    if field.shape != tuple(shape):
        name = "exclude_mask" if may_be_empty else "field_mask"
        raise InputError(f"{name} has shape {field.shape}, the image {tuple(shape)}")
    if not field.any() and not may_be_empty:
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
