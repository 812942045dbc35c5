"""Training data: a prepared dataset in memory at model resolution, the patient split,
augmentation. The model input itself (:func:`xbmd.model.inputs.model_input`) is shared with
inference.

Augmentation (:func:`augment`) works on a batch in PyTorch: rotation, scale and translation
applied identically to the input and to the DRR targets (areal density is resampled, not
rescaled), then, on the input only, a smooth exposure ramp, gamma, blur, noise, a random vendor-like
processing chain (:mod:`xbmd.learn.processing`, off by default) and JPEG compression, and the
input's percentile normalisation again. It is written here rather than
taken from MONAI's per-sample dictionary transforms because it acts on whole batches on the
training device and needs JPEG, which MONAI lacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from xbmd.dataset.format import (
    LABEL_COLUMNS,
    has_implant,
    label_values,
    load_sample,
    read_index,
)
from xbmd.display import jpeg_round_trip
from xbmd.errors import InputError
from xbmd.learn.processing import random_processing
from xbmd.model.inputs import CLIP, downsample_map, kvp_features, model_input

#: DRR above this (g/cm2) is the region target of stage 1 (bone DRR).
BONE_REGION_G_CM2 = 0.02


# ------------------------------------------------------------------------------------------------
# The dataset in memory


@dataclass
class TrainingData:
    """A prepared dataset (or part of it) at model resolution, in memory.

    inputs (N, 2, S, S); bone, pf (N, S, S) g/cm2; pf_region (N, S, S) float {0, 1};
    labels {column: (N,) float64, NaN where empty}; rows: the index.csv rows;
    kvp_kv (N,) float64: the tube voltage of each radiograph (index column ``kvp``), NaN where
    unknown (None: all unknown).
    """

    inputs: np.ndarray
    bone: np.ndarray
    pf: np.ndarray
    pf_region: np.ndarray
    labels: dict[str, np.ndarray]
    rows: list[dict]
    #: samples of the index that could not be read: {sample_id, file, error}, left out
    skipped: list[dict] = field(default_factory=list)
    kvp_kv: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> TrainingData:
        idx = np.asarray(indices, dtype=int)
        return TrainingData(
            self.inputs[idx],
            self.bone[idx],
            self.pf[idx],
            self.pf_region[idx],
            {k: v[idx] for k, v in self.labels.items()},
            [self.rows[i] for i in idx],
            kvp_kv=None if self.kvp_kv is None else self.kvp_kv[idx],
        )

    @property
    def patients(self) -> list[str]:
        return [r["patient_id"] or r["case_id"] for r in self.rows]

    @property
    def hips(self) -> list[tuple[str, str]]:
        """(case, side) of each sample: its radiographs (sessions, poses) show the same hip."""
        return [(r["case_id"], r["side"]) for r in self.rows]


def load_training_data(dataset: str | Path, size: int, progress: bool = True) -> TrainingData:
    """Every readable sample of a prepared dataset at model resolution ``size`` (hips with an
    implant left out).

    A sample that cannot be read (missing, corrupt, without its DRRs) is left out and listed in
    ``skipped``; InputError when none can be read.
    """
    dataset = Path(dataset)
    rows = [r for r in read_index(dataset) if not has_implant(r)]  # their labels mean nothing
    if not rows:
        raise InputError(f"{dataset}: every sample is of a hip with an implant: nothing to learn")
    n = len(rows)
    inputs = np.zeros((n, 2, size, size), np.float32)
    bone = np.zeros((n, size, size), np.float32)
    pf = np.zeros((n, size, size), np.float32)
    region = np.zeros((n, size, size), np.float32)
    kept, skipped = [], []
    for row in tqdm(rows, desc="loading samples", unit="sample", disable=not progress):
        path = dataset / row["file"]
        try:
            sample = load_sample(path)
            if (
                sample.bone_drr_g_cm2 is None
                or sample.pf_drr_g_cm2 is None
                or sample.pf_mask is None
            ):
                raise InputError(f"{path}: a training sample needs its DRRs and mask")
        except InputError as exc:
            skipped.append({"sample_id": row["sample_id"], "file": row["file"], "error": str(exc)})
            continue
        i = len(kept)
        inputs[i] = model_input(sample.xray, sample.valid, size)
        bone[i] = downsample_map(sample.bone_drr_g_cm2, size)
        pf[i] = downsample_map(sample.pf_drr_g_cm2, size)
        region[i] = downsample_map(sample.pf_mask.astype(np.float32), size) >= 0.5
        kept.append(row)
    if not kept:
        raise InputError(
            f"{dataset}: none of the {n} samples could be read (first: {skipped[0]['error']})"
        )
    m = len(kept)
    labels = {c: label_values(kept, c) for c in LABEL_COLUMNS}
    return TrainingData(
        inputs[:m], bone[:m], pf[:m], region[:m], labels, kept, skipped, label_values(kept, "kvp")
    )


def patient_split(patients: list[str], val_fraction: float, seed: int) -> tuple[list, list]:
    """Sample indices (train, validation), no patient in both. Deterministic for a seed."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val_patients = set(order[:n_val])
    train = [i for i, p in enumerate(patients) if p not in val_patients]
    val = [i for i, p in enumerate(patients) if p in val_patients]
    return train, val


class StageDataset(torch.utils.data.Dataset):
    """One stage's samples as tensors: (input, drr target, region target, standardised labels,
    BMD_drr label, kVp input (2,) (:func:`xbmd.model.inputs.kvp_features`), hip number (samples
    of one hip, :attr:`TrainingData.hips`, share it))."""

    def __init__(self, data: TrainingData, target: str, targets: list[str], stats: dict):
        self.inputs = torch.from_numpy(data.inputs)
        if target == "bone_drr_g_cm2":
            self.drr = torch.from_numpy(data.bone)
            self.region = (self.drr > BONE_REGION_G_CM2).float()
        else:
            self.drr = torch.from_numpy(data.pf)
            self.region = torch.from_numpy(data.pf_region)
        labels = np.stack(
            [(data.labels[t] - stats[t][0]) / stats[t][1] for t in targets], axis=1
        ).astype(np.float32)
        self.labels = torch.from_numpy(labels)
        self.bmd_drr = torch.from_numpy(data.labels["bmd_drr_g_cm2"].astype(np.float32))
        self.kvp = torch.from_numpy(kvp_features(data.kvp_kv, len(data)))
        numbers = {hip: k for k, hip in enumerate(dict.fromkeys(data.hips))}
        self.hip = torch.tensor([numbers[hip] for hip in data.hips], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return (
            self.inputs[i],
            self.drr[i],
            self.region[i],
            self.labels[i],
            self.bmd_drr[i],
            self.kvp[i],
            self.hip[i],
        )


class HipGroupSampler(torch.utils.data.Sampler):
    """Batches of groups of ``group`` radiographs of one hip (stage 3's hip-group consistency).

    Every epoch, each hip's samples are shuffled and cut into groups of ``group`` (a hip with
    fewer radiographs, or the rest of one with more, gives a smaller group; a group of one adds
    nothing to the consistency loss but is still learned from), the groups are shuffled and
    packed in that order into batches of at most ``batch_size`` samples, a group never split.
    So every sample is used once per epoch. Deterministic for ``seed`` and the epoch
    (:meth:`set_epoch`, which Lightning calls). Under DDP (a process group initialised when
    iterating) each process takes every world-size-th batch, all the same number of them.

    hips : the hip of each sample (any hashable, e.g. :attr:`TrainingData.hips`).
    """

    def __init__(self, hips: list, group: int, batch_size: int, seed: int) -> None:
        if group < 1 or batch_size < group:
            raise InputError(f"hip groups of {group} need 1 <= group <= batch_size ({batch_size})")
        by_hip: dict = {}
        for i, hip in enumerate(hips):
            by_hip.setdefault(hip, []).append(i)
        self.members = list(by_hip.values())
        self.group, self.batch_size, self.seed = group, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for members in self.members:
            order = [members[k] for k in rng.permutation(len(members))]
            groups += [order[k : k + self.group] for k in range(0, len(order), self.group)]
        batches, current = [], []
        for k in rng.permutation(len(groups)):
            if len(current) + len(groups[k]) > self.batch_size:
                batches.append(current)
                current = []
            current = current + groups[k]
        if current:
            batches.append(current)
        rank, world = _rank_and_world()
        n = len(batches) // world if world > 1 else len(batches)
        return batches[rank::world][:n]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def target_stats(data: TrainingData, targets: list[str]) -> dict[str, list[float]]:
    """{target: [mean, sd]} over the samples that have it."""
    stats = {}
    for t in targets:
        values = data.labels[t][np.isfinite(data.labels[t])]
        if values.size < 2:
            raise InputError(f"the dataset has fewer than 2 values of {t!r}: cannot learn it")
        stats[t] = [float(values.mean()), float(max(values.std(), 1e-6))]
    return stats


# ------------------------------------------------------------------------------------------------
# Augmentation


def _renormalise(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Percentile normalisation of (B, H, W) inside ``valid`` (as :func:`normalise`)."""
    out = torch.zeros_like(image)
    for i in range(image.shape[0]):
        values = image[i][valid[i]]
        if values.numel() < 16:
            continue
        lo, hi = torch.quantile(values, torch.tensor([0.01, 0.99], dtype=values.dtype))
        scale = hi - lo if hi > lo else torch.tensor(1.0)
        out[i] = torch.where(valid[i], ((image[i] - lo) / scale).clamp(*CLIP), 0.0)
    return out


def augment(
    inputs: torch.Tensor,
    maps: list[torch.Tensor],
    settings: dict,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment a batch: inputs (B, 2, H, W) and maps [(B, H, W), ...] moved together.

    Maps are resampled bilinearly (masks in {0, 1} come back in [0, 1]; threshold them if needed).
    ``settings`` is the config's ``augment`` section.
    """
    b, _, h, w = inputs.shape
    dev = inputs.device

    def uniform(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator).to(dev)

    angle = uniform(-1, 1) * math.radians(settings["rotate_deg"])
    scale = 1.0 + uniform(-1, 1) * settings["scale"]
    shift = uniform(-1, 1, 2 * b).view(b, 2) * settings["translate_px"] * 2.0 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    stacked = torch.cat([inputs, *(m[:, None] for m in maps)], dim=1)
    moved = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = moved[:, 1] > 0.999
    image = moved[:, 0]
    out_maps = [moved[:, 2 + i] for i in range(len(maps))]

    # intensity, on the input only: exposure ramp, gamma, blur, noise, JPEG; then normalise again
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev), indexing="ij"
    )
    direction = uniform(0, 2 * math.pi)
    ramp = torch.cos(direction)[:, None, None] * xx + torch.sin(direction)[:, None, None] * yy
    image = image * (1.0 + settings["exposure"] * uniform(-0.5, 0.5)[:, None, None] * ramp)
    gamma = torch.exp(uniform(-1, 1) * settings["gamma"])[:, None, None]
    image = image.clamp(0, 1) ** gamma + (image - image.clamp(0, 1))
    sigma = float(uniform(0, settings["blur_sigma"], 1))
    if sigma > 0.3:
        radius = max(1, math.ceil(2 * sigma))
        x = torch.arange(-radius, radius + 1, device=dev, dtype=image.dtype)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = k / k.sum()
        image = F.conv2d(image[:, None], k.view(1, 1, 1, -1), padding=(0, radius))
        image = F.conv2d(image, k.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]
    image = image + settings["noise"] * uniform(0, 1)[:, None, None] * torch.randn(
        image.shape, generator=generator
    ).to(dev)
    # a vendor-like processing chain (xbmd.learn.processing), before storage (JPEG)
    image = random_processing(image, valid, settings, generator)
    if settings["jpeg_probability"] > 0:
        lo, hi = settings["jpeg_quality"]
        chosen = torch.rand(b, generator=generator) < settings["jpeg_probability"]
        for i in torch.nonzero(chosen).flatten().tolist():
            quality = int(torch.randint(int(lo), int(hi) + 1, (1,), generator=generator))
            jpeg = jpeg_round_trip(image[i].detach().cpu().numpy(), quality)
            image[i] = torch.from_numpy(jpeg).to(dev)
    image = _renormalise(image, valid)
    return torch.stack([image, valid.float()], dim=1), out_maps
