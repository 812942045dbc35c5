"""Training configuration: defaults, YAML files and their validation.

A config is a nested dict. :data:`DEFAULTS` holds every key with its default; a YAML file
(``configs/*.yaml``) overrides any subset, and an unknown key is an error (a typo must not be
silently ignored). The resolved config is written into every checkpoint and the model bundle.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from xbmd.errors import InputError
from xbmd.learn.processing import PROCESSING_DEFAULTS
from xbmd.model.networks import BACKBONES

#: Regression targets stage 3 can learn: index.csv columns.
TARGETS = (
    "ct_abmd_g_cm2",
    "qct_vbmd_mg_cm3",
    "neck_abmd_g_cm2",
    "dxa_total_hip_g_cm2",
    "dxa_neck_g_cm2",
)
STAGES = ("1", "2", "3", "loc")
#: 'none': hierarchical learning; 'no_stage1': stage 2 from scratch; 'direct': stage 3 alone,
#: regression straight from the X-ray with the same encoder.
ABLATIONS = ("none", "no_stage1", "direct")

DEFAULTS: dict = {
    "seed": 0,
    # model input and output: the 256 x 256 hip crop (0.75 detector mm) area-averaged to this size
    "image_size": 128,
    "val_fraction": 0.15,
    "batch_size": 8,
    "ablation": "none",
    "generator": {"backbone": "unet", "channels": [16, 32, 64, 128, 256], "res_units": 1},
    "discriminator": {"scales": 2, "layers": 3, "channels": 32},
    # generator loss weights (the published 1 / 10 / 100 / 1) and the region mask's BCE weight
    "losses": {"gan": 1.0, "feature_matching": 10.0, "l1": 100.0, "gc": 1.0, "mask": 10.0},
    "optimizer": {"lr": 2.0e-4, "betas": [0.5, 0.999], "weight_decay": 0.0},
    "augment": {
        "enabled": True,
        "rotate_deg": 5.0,
        "scale": 0.06,
        "translate_px": 6.0,
        "exposure": 0.3,
        "gamma": 0.35,
        "noise": 0.03,
        "blur_sigma": 1.0,
        "jpeg_probability": 0.3,
        "jpeg_quality": [20, 95],
        # a random vendor-like processing chain on this share of the inputs (0: off)
        **PROCESSING_DEFAULTS,
    },
    # stage 3's regression head: `kvp` gives it the tube voltage (DICOM KVP) when known, with a
    # known flag; in training the kVp is hidden with probability `kvp_dropout` (docs/training.md)
    "regression": {"kvp": False, "kvp_dropout": 0.3},
    "stages": {
        "1": {"epochs": 20, "target": "bone_drr_g_cm2"},
        "2": {"epochs": 20, "target": "pf_drr_g_cm2"},
        "3": {
            "epochs": 20,
            "targets": ["ct_abmd_g_cm2", "qct_vbmd_mg_cm3"],
            "lr": 5.0e-4,
            "encoder_lr": 1.0e-4,
            # L1 weight that keeps the decoder's proximal-femur DRR while the encoder is fine-tuned
            "keep_decomposition": 10.0,
            # batches of `hip_group` radiographs of the same hip (1: plain shuffled batches) and
            # the weight of the loss on the spread of the standardised targets within each hip
            # group (`consistency`) and of BMD_drr of the virtual X-ray (`consistency_drr`)
            "hip_group": 1,
            "consistency": 0.0,
            "consistency_drr": 0.0,
        },
        "loc": {"epochs": 30},
    },
    # a pixel of the predicted DRR belongs to the proximal-femur region when its mask prob > this
    "region_probability": 0.5,
}


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        key = str(key)
        if key not in base:
            raise InputError(f"{where}: unknown config key {key!r} (known: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InputError(f"{where}: {key!r} must be a mapping")
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def resolve(override: dict | None = None, where: str = "config") -> dict:
    """DEFAULTS with ``override`` merged in, validated."""
    config = _merge(DEFAULTS, override or {}, where)
    _validate(config, where)
    return config


def load_config(path: str | Path | None) -> dict:
    """The resolved config of a YAML file (None: the defaults)."""
    if path is None:
        return resolve()
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; a config is a YAML file") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        raise InputError(
            f"{path}: the config file is empty; leave out --config for the defaults "
            "(docs/training.md)"
        )
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of keys to values")
    return resolve(data, str(path))


def _validate(config: dict, where: str) -> None:
    def fail(message: str) -> None:
        raise InputError(f"{where}: {message}")

    if config["ablation"] not in ABLATIONS:
        fail(f"ablation must be one of {', '.join(ABLATIONS)}, not {config['ablation']!r}")
    if config["generator"]["backbone"] not in BACKBONES:
        fail(f"generator.backbone must be one of {', '.join(BACKBONES)}")
    size = config["image_size"]
    if not isinstance(size, int) or size < 32 or 256 % size:
        fail(f"image_size must divide 256 (32, 64, 128 or 256), not {size!r}")
    depth = len(config["generator"]["channels"]) - 1
    if size % (2**depth):
        fail(f"image_size {size} is not divisible by 2^{depth} (generator depth)")
    if not 0.0 <= float(config["val_fraction"]) < 1.0:
        fail("val_fraction must be in [0, 1)")
    targets = config["stages"]["3"]["targets"]
    if not targets or any(t not in TARGETS for t in targets):
        fail(f"stages.3.targets must be a non-empty list of {', '.join(TARGETS)}")
    for stage in ("1", "2", "3", "loc"):
        epochs = config["stages"][stage]["epochs"]
        if not isinstance(epochs, int) or epochs < 0:
            fail(f"stages.{stage}.epochs must be a whole number >= 0")
    _validate_levers(config, fail)


def _number_in(value, lo: float, hi: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi


def _range_in(value, lo: float, hi: float) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(_number_in(v, lo, hi) for v in value)
        and value[0] <= value[1]
    )


def _validate_levers(config: dict, fail) -> None:
    """The keys of processing augmentation, hip-group consistency and the kVp input."""
    a = config["augment"]
    for key in ("processing_probability", "processing_quantise_probability"):
        if not _number_in(a[key], 0.0, 1.0):
            fail(f"augment.{key} must be a probability in [0, 1], not {a[key]!r}")
    ranges = {
        "processing_smooth_sigma_px": (0.0, 8.0),
        "processing_enhance_gain": (-1.0, 5.0),
        "processing_enhance_radius_px": (0.1, 64.0),
        "processing_lut_slope": (0.0, 50.0),
    }
    for key, (lo, hi) in ranges.items():
        if not _range_in(a[key], lo, hi):
            fail(f"augment.{key} must be a range [low, high] within [{lo:g}, {hi:g}]")
    if not _number_in(a["processing_window_percentile"], 0.0, 20.0):
        fail("augment.processing_window_percentile must be a percentile in [0, 20]")
    s3 = config["stages"]["3"]
    group = s3["hip_group"]
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        fail(f"stages.3.hip_group must be a whole number >= 1, not {group!r}")
    for key in ("consistency", "consistency_drr"):
        if not _number_in(s3[key], 0.0, math.inf):
            fail(f"stages.3.{key} must be a weight >= 0, not {s3[key]!r}")
        if s3[key] > 0 and group < 2:
            fail(f"stages.3.{key} needs stages.3.hip_group >= 2 (radiographs of one hip)")
    if s3["hip_group"] > config["batch_size"]:
        fail(f"stages.3.hip_group ({group}) must not exceed batch_size ({config['batch_size']})")
    if s3["consistency_drr"] > 0 and config["ablation"] == "direct":
        fail("stages.3.consistency_drr needs the virtual X-ray, which ablation 'direct' has not")
    r = config["regression"]
    if not isinstance(r["kvp"], bool):
        fail(f"regression.kvp must be true or false, not {r['kvp']!r}")
    if not _number_in(r["kvp_dropout"], 0.0, 1.0):
        fail(f"regression.kvp_dropout must be a probability in [0, 1], not {r['kvp_dropout']!r}")


def parse_stages(text: str) -> list[str]:
    """'1,2,3' -> ['1', '2', '3']; also 'loc' (the hip localiser)."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise InputError(f"--stages takes a comma list of {', '.join(STAGES)}, not {text!r}")
    return [s for s in STAGES if s in stages]


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
