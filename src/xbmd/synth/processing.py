"""Vendor image processing of the virtual radiographs: detector signal -> stored pixels.

Step 6 of the chain in ``xbmd.synth.radiograph`` (:func:`process`, then :func:`to_stored`): log,
histogram analysis of the collimated field, multi-scale contrast equalisation (band-pass gains
with a power law, latitude compression, noise coring), an S-shaped LUT with gamma, quantisation
to ``bits_stored``, shutter. The settings come from the device (``xbmd.synth.device``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from xbmd.synth.device import XrayDevice
from xbmd.synth.physics import _spacing_pair, gaussian_px

#: Gaussian sigma (mm) of the thickness trend that latitude compression acts on: coarser than
#: the bones, so that equalising the body's thickness does not flatten the bones' contrast.
LATITUDE_SCALE_MM = 40.0
#: Where the anatomy's median goes on the LUT's input axis, below ``lut_center``.
BODY_BELOW_CENTER = 0.1
#: LUT input of the bright (bone) and dark (thin tissue) window percentiles of the anatomy.
BONE_LEVEL, THIN_LEVEL = 0.9, 0.0
#: Largest span of the LUT input the anatomy window may be stretched to.
MAX_SPAN = 2.0


def log_signal(signal: np.ndarray, n0_quanta: float) -> np.ndarray:
    """Attenuation estimate ``ln(N0 / signal)`` (float32), signal clamped at 0.5 quanta."""
    return (math.log(n0_quanta) - np.log(np.maximum(signal, 0.5))).astype(np.float32)


def anatomy_region(
    log_image: np.ndarray, field_mask: np.ndarray, exclude_mask: np.ndarray | None = None
) -> np.ndarray:
    """Where a vendor's histogram analysis looks, on every second pixel (bool, half size):
    the collimated field 4 px in from its edge, without direct exposure (log < 0.3, less than
    about 1.5 cm of water) unless that is most of the field, and without ``exclude_mask``
    (metal, which vendors segment out of the histogram) unless that leaves nothing."""
    field = field_mask[::2, ::2]
    inner = ndimage.binary_erosion(field, iterations=2)
    region = inner if inner.any() else field
    anatomy = region & (log_image[::2, ::2] >= 0.3)
    anatomy = anatomy if anatomy.sum() >= 0.05 * region.sum() else region
    if exclude_mask is not None:
        kept = anatomy & ~exclude_mask[::2, ::2]
        anatomy = kept if kept.any() else anatomy
    return anatomy


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


def _kept(field_mask: np.ndarray, exclude_mask: np.ndarray | None) -> np.ndarray:
    """The field without the excluded (metal) pixels."""
    return field_mask if exclude_mask is None else field_mask & ~exclude_mask


def restore_excluded(
    enhanced: np.ndarray, norm: np.ndarray, exclude_mask: np.ndarray | None
) -> np.ndarray:
    """Put excluded (metal) pixels back after enhancement, at least as bright as they were.

    Vendors keep metal out of their multi-scale decomposition: the enhancement runs on an image
    whose metal is filled in from its surroundings (``fill_outside``), so a nail's huge
    contrast does not flatten the bone around it by the latitude compression, and the metal
    comes back white afterwards."""
    if exclude_mask is None:
        return enhanced
    return np.where(exclude_mask, np.maximum(enhanced, norm), enhanced).astype(np.float32)


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
    exclude_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Vendor processing of the detector signal (quanta) into display values in [0, 1]
    (float32, bone bright). ``exclude_mask`` (bool, the image's shape: metal) is left out of
    the histogram analysis.

    Log; histogram windowing of the anatomy in the field; multi-scale enhancement; a second
    windowing of the enhanced image, anchored on the anatomy's histogram: its median (mostly
    soft tissue) goes to ``lut_center - BODY_BELOW_CENTER`` (mid-to-dark grey), its high
    percentile (bone) to ``BONE_LEVEL`` (white), its low percentile no lower than
    ``THIN_LEVEL`` (thin tissue dark grey, air in the field black); LUT. Outside the field the
    un-enhanced image is kept (the shutter, if any, is applied when storing).
    """
    log_image = log_signal(signal, n0_quanta)
    region = anatomy_region(log_image, field_mask, exclude_mask)
    low, high = window_levels(log_image, region, device.window_percentiles)
    norm = np.clip((log_image - low) / (high - low), -0.3, 1.6)
    px = float(np.mean(_spacing_pair(pixel_spacing_mm)))
    filled = fill_outside(norm, _kept(field_mask, exclude_mask), 10.0 / px)
    enhanced, levels = multiscale_enhance(filled, field_mask, pixel_spacing_mm, device)
    enhanced = restore_excluded(np.where(field_mask, enhanced, norm), norm, exclude_mask)
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
