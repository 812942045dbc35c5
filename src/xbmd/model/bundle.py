"""The model bundle: everything ``xbmd estimate`` needs in one file (``torch.save`` of a dict).

Keys: ``format`` ('xbmd-model'), ``format_version``, ``xbmd_version``, ``created``, ``config``
(the resolved training config), ``targets`` and ``target_stats`` ({target: [mean, sd]} of the
training set, to undo the standardisation), ``crop`` (the hip crop the model was trained on:
``size_px``, ``pixel_mm``, ``head_position``; format 2 and later), ``generator`` (state dict:
encoder, decoder, regression head), ``localiser`` (:func:`xbmd.model.localiser.localiser_state`,
or None), ``training`` (the run summary) and, once calibrated by ``xbmd calibrate-model``,
``uncertainty`` (``xbmd.model.uncertainty.uncertainty_state``: the interval and the
out-of-distribution score). The bundled default lives in
``xbmd/data/models/default.pt``.

Bundles hold tensors and plain Python values only and are read with
``torch.load(weights_only=True)``: a model file from someone else cannot run code. Loading needs
neither Lightning nor the training code.
"""

from __future__ import annotations

import datetime as dt
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from xbmd import __version__
from xbmd.dataset.hip import CROP_PIXEL_MM, CROP_SIZE_PX, HEAD_POSITION
from xbmd.errors import InputError
from xbmd.model.inputs import kvp_features, model_input, region_bmd

FORMAT = "xbmd-model"
#: 2: the hip crop is recorded (``crop``). Version 1 bundles were all trained on the crop of
#: ``LEGACY_CROP``, which is assumed for them.
FORMAT_VERSION = 2
#: The hip crop of this xbmd (``xbmd.dataset.hip``), which estimate uses.
CROP = {"size_px": CROP_SIZE_PX, "pixel_mm": CROP_PIXEL_MM, "head_position": list(HEAD_POSITION)}
LEGACY_CROP = {"size_px": 256, "pixel_mm": 0.75, "head_position": [0.4, 0.5]}


def default_model_path() -> Path:
    """The bundled default model (inside the installed package)."""
    return Path(str(resources.files("xbmd") / "data" / "models" / "default.pt"))


def write_bundle(
    path: str | Path,
    config: dict,
    generator_state: dict,
    target_stats: dict,
    localiser: dict | None = None,
    training: dict | None = None,
) -> Path:
    path = Path(path)
    bundle = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xbmd_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "targets": list(config["stages"]["3"]["targets"]),
        "target_stats": target_stats,
        "crop": dict(CROP),
        "generator": {k: v.detach().cpu() for k, v in generator_state.items()},
        "localiser": localiser,
        "training": training or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)
    return path


@dataclass
class Prediction:
    """Outputs for N hip crops at model resolution S (crop pixel = 192 / S detector mm).

    pf_drr_g_cm2 (N, S, S) float32 >= 0: the virtual X-ray of the proximal femur, g/cm2;
    pf_region (N, S, S) bool: the predicted proximal-femur region;
    pf_probability (N, S, S) float32: its probability;
    bmd_drr_g_cm2 (N,): mean of the virtual X-ray inside the region (NaN if empty);
    targets {name: (N,)}: the stage-3 regression outputs in physical units (with test-time
    augmentation: their mean over the views);
    targets_sd {name: (N,)}: with test-time augmentation, their SD over the views, else None;
    features (N, D): with test-time augmentation, the pooled deepest features, else None.
    """

    pf_drr_g_cm2: np.ndarray
    pf_region: np.ndarray
    pf_probability: np.ndarray
    bmd_drr_g_cm2: np.ndarray
    targets: dict[str, np.ndarray]
    targets_sd: dict[str, np.ndarray] | None = None
    features: np.ndarray | None = None


class ModelBundle:
    """A loaded model bundle: the generator with its regression head, and the localiser."""

    def __init__(self, bundle: dict, source: str = "model") -> None:
        from xbmd.model.networks import build_generator

        self.source = source
        self.config = bundle["config"]
        self.targets = list(bundle["targets"])
        self.target_stats = bundle["target_stats"]
        self.xbmd_version = bundle.get("xbmd_version")
        self.created = bundle.get("created")
        self.training = bundle.get("training", {})
        self.image_size = int(self.config["image_size"])
        self.region_probability = float(self.config["region_probability"])
        self.crop = dict(bundle.get("crop") or LEGACY_CROP)
        self.generator = build_generator(self.config)
        self.generator.load_state_dict(bundle["generator"])
        self.generator.eval()
        self.uncertainty = bundle.get("uncertainty") or None
        self.localiser = None
        if bundle.get("localiser"):
            from xbmd.model.localiser import localiser_from_state

            self.localiser = localiser_from_state(bundle["localiser"])
            self.localiser.eval()

    @property
    def uses_kvp(self) -> bool:
        """Whether the regression head takes the tube voltage (``regression.kvp``)."""
        return self.generator.kvp

    @torch.no_grad()
    def predict(
        self, xray: np.ndarray, valid: np.ndarray, tta: bool = False, kvp=None
    ) -> Prediction:
        """Predict for hip crops: xray (N, 256, 256) raw crop values, valid (N, 256, 256) bool.

        ``tta``: the regression outputs are the mean over test-time views
        (``xbmd.model.uncertainty``), with their SD and the features of the out-of-distribution
        score; the virtual X-ray is the unaltered view's.
        ``kvp``: the tube voltage of the radiographs (kVp): one value or None for all crops, or
        one per crop, NaN = unknown (:func:`xbmd.model.inputs.kvp_features`). Only a model
        trained with the kVp input uses it; others ignore it.
        """
        xray = np.asarray(xray, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        if xray.ndim == 2:
            xray, valid = xray[None], valid[None]
        inputs = np.stack(
            [model_input(x, v, self.image_size) for x, v in zip(xray, valid, strict=True)]
        )
        kvp_in = kvp_features(kvp, len(inputs)) if self.uses_kvp else None
        maps, pred = self.generator(
            torch.from_numpy(inputs), kvp=None if kvp_in is None else torch.from_numpy(kvp_in)
        )
        drr_t = maps[:, 0].clamp_min(0)
        prob_t = torch.sigmoid(maps[:, 1])
        bmd = region_bmd(drr_t, prob_t > self.region_probability).numpy()
        drr = drr_t.numpy().astype(np.float32)
        prob = prob_t.numpy().astype(np.float32)
        region = prob > self.region_probability
        pred, pred_sd, features = pred.numpy(), None, None
        if tta:
            from xbmd.model.uncertainty import tta_targets

            pred, pred_sd, features = tta_targets(self.generator, inputs, kvp_in)
        targets, targets_sd = {}, ({} if tta else None)
        for j, t in enumerate(self.targets):
            mean, sd = self.target_stats[t]
            targets[t] = pred[:, j].astype(np.float64) * sd + mean
            if tta:
                targets_sd[t] = pred_sd[:, j].astype(np.float64) * sd
        return Prediction(drr, region, prob, bmd.astype(np.float64), targets, targets_sd, features)


def load_bundle(path: str | Path | None = None) -> ModelBundle:
    """Load a model bundle (None: the bundled default); clear errors for bad files."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a model file (give the model's .pt file)")
    if not path.is_file():
        hint = (
            " (the bundled default model is missing from this installation)"
            if path == default_model_path()
            else ""
        )
        raise InputError(f"{path}: no such model file{hint}")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a pickle at all (truncated, another format)
            raise InputError(f"{path}: not a readable model file ({exc})".split("\n")[0]) from None
        raise InputError(
            f"{path}: refused: the file holds Python objects besides tensors and plain values, "
            "which could run code when loaded (an xbmd model bundle holds none)"
        ) from None
    except Exception as exc:
        raise InputError(
            f"{path}: not a readable model file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise InputError(
            f"{path}: not an xbmd model bundle (a Lightning checkpoint? use RUN/model.pt)"
        )
    if int(bundle.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(
            f"{path}: model format {bundle['format_version']} is newer than this xbmd reads "
            f"({FORMAT_VERSION}); upgrade xbmd"
        )
    crop = bundle.get("crop") or LEGACY_CROP
    if crop != CROP:
        raise InputError(
            f"{path}: the model was trained on hip crops of {crop}, this xbmd crops {CROP}; "
            "use the xbmd version that trained it, or train it again"
        )
    try:
        return ModelBundle(bundle, str(path))
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: model bundle is incomplete or inconsistent ({exc})") from None
