"""Randomised processing graphs: radiograph processing unlike any of the six device families.

A hospital's images come from processing chains the model never saw. ``xbmd synth --processing
random`` (or ``mixed``) replaces a device's family processing by a graph drawn here: a response
(log, linear or a power law of the detected signal), a histogram window, the filtering steps
noise reduction, multi-scale enhancement and unsharp masking (each present or not, in a random
order, with random strengths), a second window, a tone curve of random shape (sigmoid, gamma,
linear, exponential or a random monotone spline), and the output: bits stored (8-16),
MONOCHROME1 or 2, the output range and the shutter. Every step keeps the ordering of large
structures (more attenuation, brighter), so bone stays brighter than the soft tissue around it,
while grey levels, contrast, sharpness and noise texture vary far beyond the families.

:func:`sample_graph` draws a graph (a JSON-serialisable dict, recorded in truth.json with the
device); :func:`randomise_device` puts one on a device; :func:`process_graph` applies it to the
detector signal (it stands for ``xbmd.synth.processing.process``; ``to_stored`` then quantises).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from xbmd.synth.device import OUTSIDE_FIELD, PHOTOMETRICS, XrayDevice
from xbmd.synth.physics import _spacing_pair, gaussian_px
from xbmd.synth.processing import (
    _kept,
    anatomy_region,
    fill_outside,
    log_signal,
    multiscale_enhance,
    restore_excluded,
    window_levels,
)

RESPONSES = ("log", "linear", "power")
#: How often each response is drawn: a linear response leaves the thick trunk washed out, as
#: raw-like exports do; rarer than the log that every vendor applies.
RESPONSE_WEIGHTS = (0.5, 0.15, 0.35)
FILTERS = ("noise_reduction", "enhancement", "unsharp_mask")
LUT_SHAPES = ("sigmoid", "gamma", "linear", "exponential", "spline")
BITS_STORED = (8, 10, 12, 14, 15, 16)
#: Knots of the spline tone curve on its input axis.
SPLINE_X = (0.0, 0.25, 0.5, 0.75, 1.0)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(rng.uniform(low, high)), 4)


def sample_graph(rng: np.random.Generator) -> dict:
    """Draw a randomised processing graph (JSON-serialisable; see the module docstring)."""
    response = str(rng.choice(RESPONSES, p=RESPONSE_WEIGHTS))
    graph: dict = {"response": {"kind": response}}
    if response == "power":
        graph["response"]["exponent"] = _u(rng, 0.25, 0.75)
    graph["window"] = {"percentiles": [_u(rng, 0.0, 3.0), _u(rng, 97.0, 99.9)]}
    steps = []
    for name in (str(n) for n in rng.permutation(FILTERS)):
        if rng.random() >= 0.7:  # each filter present 70 % of the time
            continue
        if name == "noise_reduction":
            kind = str(rng.choice(["gaussian", "median"]))
            step = {"step": name, "kind": kind}
            step |= (
                {"sigma_mm": _u(rng, 0.2, 0.9)}
                if kind == "gaussian"
                else {"size_mm": _u(rng, 0.6, 1.8)}
            )
        elif name == "enhancement":
            step = {
                "step": name,
                "band_gains": [_u(rng, 0.7, 2.6) for _ in range(4)],
                "band_power": _u(rng, 0.45, 1.0),
                "latitude_compression": _u(rng, 0.0, 0.9),
                "coring": _u(rng, 0.0, 0.8),
            }
        else:
            step = {"step": name, "radius_mm": _u(rng, 0.8, 15.0), "amount": _u(rng, 0.2, 2.0)}
        steps.append(step)
    graph["steps"] = steps
    graph["window2"] = {"percentiles": [_u(rng, 0.0, 5.0), _u(rng, 95.0, 99.9)]}
    graph["lut"] = _sample_lut(rng)
    graph["output"] = {
        "bits_stored": int(rng.choice(BITS_STORED)),
        "photometric": str(rng.choice(PHOTOMETRICS)),
        "output_range": [_u(rng, 0.0, 0.1), _u(rng, 0.85, 1.0)],
        "outside_field": str(rng.choice(OUTSIDE_FIELD)),
    }
    return graph


def _sample_lut(rng: np.random.Generator) -> dict:
    shape = str(rng.choice(LUT_SHAPES))
    lut: dict = {"shape": shape}
    if shape == "sigmoid":
        lut |= {"contrast": _u(rng, 3.0, 11.0), "center": _u(rng, 0.35, 0.65)}
    elif shape == "gamma":
        lut["gamma"] = _u(rng, 0.4, 2.5)
    elif shape == "exponential":
        lut["k"] = round(float(rng.choice([-1, 1]) * rng.uniform(0.5, 4.0)), 4)
    elif shape == "spline":
        # increasing knots with random steps: a monotone, kinked tone curve
        steps = rng.uniform(0.05, 1.0, len(SPLINE_X) - 1)
        lut["y"] = [0.0, *[round(float(v), 4) for v in np.cumsum(steps) / steps.sum()]]
    return lut


def randomise_device(device: XrayDevice, rng: np.random.Generator) -> XrayDevice:
    """``device`` (its acquisition: kVp, detector, grid, exposure) with its family processing
    replaced by a randomised graph drawn from ``rng``."""
    graph = sample_graph(rng)
    out = graph["output"]
    return dataclasses.replace(
        device,
        name=f"{device.name}-random",
        model=f"{device.model} (random processing)",
        processing_graph=graph,
        bits_stored=out["bits_stored"],
        photometric=out["photometric"],
        output_range=tuple(out["output_range"]),
        outside_field=out["outside_field"],
    )


# ---- applying a graph -----------------------------------------------------------------------


def _response(signal: np.ndarray, n0_quanta: float, spec: dict) -> np.ndarray:
    """Detector signal -> an image that grows with attenuation (float32)."""
    if spec["kind"] == "log":
        return log_signal(signal, n0_quanta)
    relative = np.maximum(signal, 0.5) / np.float32(n0_quanta)
    if spec["kind"] == "linear":
        return (-relative).astype(np.float32)
    return (-(relative ** np.float32(spec["exponent"]))).astype(np.float32)


def _noise_reduction(image: np.ndarray, step: dict, px_mm: float) -> np.ndarray:
    if step["kind"] == "gaussian":
        return gaussian_px(image, step["sigma_mm"] / px_mm)
    size = max(3, 2 * round(step["size_mm"] / px_mm / 2) + 1)
    return ndimage.median_filter(image, size=size, mode="nearest")


def _unsharp(image: np.ndarray, step: dict, px_mm: float) -> np.ndarray:
    blurred = gaussian_px(image, step["radius_mm"] / px_mm)
    return (image + np.float32(step["amount"]) * (image - blurred)).astype(np.float32)


def _enhance(image, field_mask, spacing, device: XrayDevice, step: dict) -> np.ndarray:
    stand_in = dataclasses.replace(
        device,
        band_gains=tuple(step["band_gains"]),
        band_power=step["band_power"],
        latitude_compression=step["latitude_compression"],
        noise_reduction=step["coring"],
    )
    return multiscale_enhance(image, field_mask, spacing, stand_in)[0]


def apply_lut(x: np.ndarray, lut: dict) -> np.ndarray:
    """Tone curve of a graph: [0, 1] -> [0, 1], monotonic increasing (float32)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    shape = lut["shape"]
    if shape == "sigmoid":
        c, m = lut["contrast"], lut["center"]

        def s(v):
            return 1.0 / (1.0 + np.exp(-c * (v - m)))

        y = (s(x) - s(0.0)) / (s(1.0) - s(0.0))
    elif shape == "gamma":
        y = x ** np.float32(lut["gamma"])
    elif shape == "exponential":
        k = lut["k"]
        y = (1.0 - np.exp(-k * x)) / (1.0 - math.exp(-k))
    elif shape == "spline":
        y = np.interp(x, SPLINE_X, lut["y"])
    else:
        y = x
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def process_graph(
    signal: np.ndarray,
    field_mask: np.ndarray,
    pixel_spacing_mm,
    device: XrayDevice,
    n0_quanta: float,
    exclude_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Apply ``device.processing_graph`` to the detector signal (quanta): display values in
    [0, 1] (float32, bone bright) and a dict of the levels used. Outside the field the
    un-filtered, windowed image is kept (the shutter, if any, is applied when storing);
    ``exclude_mask`` (metal) is left out of the histogram analysis."""
    graph = device.processing_graph
    spacing = _spacing_pair(pixel_spacing_mm)
    px = float(np.mean(spacing))
    image = _response(signal, n0_quanta, graph["response"])
    # the anatomy region is found on the log image whatever the response (as a vendor's
    # histogram analysis runs on its own internal signal)
    region = anatomy_region(log_signal(signal, n0_quanta), field_mask, exclude_mask)
    low, high = window_levels(image, region, tuple(graph["window"]["percentiles"]))
    norm = np.clip((image - low) / (high - low), -0.3, 1.6).astype(np.float32)
    out = fill_outside(norm, _kept(field_mask, exclude_mask), 10.0 / px)
    for step in graph["steps"]:
        if step["step"] == "noise_reduction":
            out = _noise_reduction(out, step, px)
        elif step["step"] == "unsharp_mask":
            out = _unsharp(out, step, px)
        else:
            out = _enhance(out, field_mask, spacing, device, step)
    out = restore_excluded(np.where(field_mask, out, norm), norm, exclude_mask)
    low2, high2 = window_levels(out, region, tuple(graph["window2"]["percentiles"]))
    display = apply_lut((out - low2) / (high2 - low2), graph["lut"])
    levels = {
        "window": [round(low, 5), round(high, 5)],
        "window2": [round(low2, 5), round(high2, 5)],
    }
    return display, {"graph": True, **levels}
