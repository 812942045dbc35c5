"""How sure the model is: test-time augmentation, an out-of-distribution score, and a calibrated
95 % prediction interval (split conformal, scaled per image).

- **Test-time augmentation** (:data:`TTA_VIEWS`): the model sees each hip crop a few more times,
  slightly shifted, scaled and with its contrast bent, all within what training augmented; the
  estimate is the mean over the views, and their spread (SD) says how stable the estimate is for
  this image (:func:`tta_targets`).
- **Out-of-distribution score** (:class:`FeatureModel`): the encoder's deepest features, pooled
  to the grid the regression head reads, projected on the principal components of the
  calibration images' features; the score is the root-mean-square of the components in units
  of their SD, so a typical calibration image scores about 1. An image scoring above the
  calibration images' 99th percentile (times a margin) is unlike anything the model was
  checked on: a processing chain, a device, an implant or a body part it never saw.
- **Offset** (``Interval.offset``): the median of ``reference - estimate`` on the calibration
  images, added to every estimate: a model trained on augmented images reads plain ones with a
  constant shift (measured: docs/model-card.md), which the calibration hips expose.
- **Interval** (:class:`Interval`): normalised split conformal prediction (Lei et al. 2018,
  "Distribution-free predictive inference for regression"): on held-out calibration images,
  the score ``|reference - (estimate + offset)| / (sd_tta + sd_floor)``; its
  ``ceil((n + 1) 0.95) / n`` quantile ``q``; the interval of a new estimate is
  ``estimate + offset +- q (sd_tta + sd_floor)``. If the
  calibration images are exchangeable with the new ones, the interval covers the reference in
  95 % of cases; the evaluation measures it on another held-out cohort.

``xbmd calibrate-model`` fits both and stores them in the bundle (``uncertainty``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

#: The test-time views: (row shift, col shift) in input pixels, scale, gamma. The first is the
#: image itself. All inside the training augmentation's ranges (configs: rotate 5 deg, scale
#: 0.05, translate 6 px, gamma 0.15).
TTA_VIEWS = (
    (0.0, 0.0, 1.0, 1.0),
    (3.0, 0.0, 1.0, 1.0),
    (-3.0, 0.0, 1.0, 1.0),
    (0.0, 3.0, 1.0, 1.0),
    (0.0, -3.0, 1.0, 1.0),
    (0.0, 0.0, 1.03, 1.0),
    (0.0, 0.0, 0.97, 1.0),
    (0.0, 0.0, 1.0, 0.88),
    (0.0, 0.0, 1.0, 1.12),
)
#: Coverage the interval is calibrated for.
COVERAGE = 0.95
#: An image is unfamiliar when its score exceeds the calibration images' 99th percentile times
#: this margin.
OOD_PERCENTILE = 99.0
OOD_MARGIN = 1.15
#: Principal components of the features kept for the score.
OOD_COMPONENTS = 16


def _views(inputs: torch.Tensor) -> torch.Tensor:
    """(V * N, 2, S, S): every view of every input (N, 2, S, S), view-major."""
    n, _, size, _ = inputs.shape
    out = []
    for dr, dc, scale, gamma in TTA_VIEWS:
        image, valid = inputs[:, :1], inputs[:, 1:]
        if gamma != 1.0:  # bend the contrast of the normalised image, keep its range
            clipped = image.clamp(0, 1)
            image = clipped**gamma + (image - clipped)
        x = torch.cat([image, valid], 1)
        if (dr, dc, scale) != (0.0, 0.0, 1.0):
            theta = torch.tensor(
                [[1 / scale, 0.0, -2 * dc / size], [0.0, 1 / scale, -2 * dr / size]],
                dtype=x.dtype,
            ).expand(n, 2, 3)
            grid = F.affine_grid(theta, x.shape, align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = torch.cat([torch.where(x[:, 1:] > 0.999, x[:, :1], 0.0), (x[:, 1:] > 0.999)], 1)
        out.append(x.float())
    return torch.cat(out)


@torch.no_grad()
def tta_targets(
    generator, inputs: np.ndarray, kvp: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised regression outputs over the test-time views.

    Parameters
    ----------
    generator : ``xbmd.model.networks.Generator`` with a regression head (eval mode).
    inputs : (N, 2, S, S) float32 model inputs (``xbmd.model.inputs.model_input``).
    kvp : (N, 2) kVp input (``xbmd.model.inputs.kvp_features``) of a generator with the kVp
        input, the same for every view of a crop; None: unknown. Ignored by other generators.

    Returns
    -------
    mean, sd : (N, T) over the views, in standardised target units.
    features : (N, D) the first (unaltered) view's pooled deepest features.
    """
    x = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
    n = x.shape[0]
    feats = generator.backbone.encode(_views(x))[-1]
    if getattr(generator, "kvp", False):
        extra = None if kvp is None else torch.as_tensor(kvp).repeat(len(TTA_VIEWS), 1)
        pred = generator.head(feats, extra)
    else:
        pred = generator.head(feats)
    pred = pred.reshape(len(TTA_VIEWS), n, -1)
    pooled = generator.head.pool(feats[:n]).flatten(1)
    return pred.mean(0).numpy(), pred.std(0).numpy(), pooled.numpy()


@dataclass
class FeatureModel:
    """The calibration images' features: mean, scale, principal axes and their SDs, and the
    score threshold (module docstring)."""

    mean: list[float]
    scale: list[float]
    components: list[list[float]]
    component_sd: list[float]
    threshold: float

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureModel:
        f = np.asarray(features, dtype=np.float64)
        mean, scale = f.mean(0), f.std(0) + 1e-6
        z = (f - mean) / scale
        k = min(OOD_COMPONENTS, max(1, f.shape[0] - 1), f.shape[1])
        _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        sd = s[:k] / math.sqrt(max(f.shape[0] - 1, 1))
        model = cls(
            mean.tolist(), scale.tolist(), vt[:k].tolist(), np.maximum(sd, 1e-6).tolist(), 0
        )
        scores = model.score(f)
        model.threshold = float(np.percentile(scores, OOD_PERCENTILE) * OOD_MARGIN)
        return model

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) RMS of the standardised principal components; ~1 for calibration images."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / np.asarray(self.scale)
        pcs = z @ np.asarray(self.components).T / np.asarray(self.component_sd)
        return np.sqrt(np.mean(pcs**2, axis=1))


@dataclass
class Interval:
    """Normalised split-conformal interval of one target (module docstring), in its units."""

    target: str
    coverage: float
    q: float
    sd_floor: float
    n: int
    #: Added to every estimate before the interval (target units); 0 in bundles calibrated
    #: before it existed.
    offset: float = 0.0

    @classmethod
    def fit(cls, target: str, estimate, reference, sd, min_n: int = 20) -> Interval:
        estimate, reference, sd = (
            np.asarray(v, dtype=np.float64) for v in (estimate, reference, sd)
        )
        ok = np.isfinite(estimate) & np.isfinite(reference) & np.isfinite(sd)
        estimate, reference, sd = estimate[ok], reference[ok], sd[ok]
        n = int(ok.sum())
        if n < min_n:
            raise ValueError(f"{n} calibration estimates of {target}: at least {min_n} are needed")
        floor = float(np.median(sd))
        offset = float(np.median(reference - estimate))
        scores = np.abs(reference - (estimate + offset)) / (sd + floor)
        level = min(1.0, math.ceil((n + 1) * COVERAGE) / n)
        q = float(np.quantile(scores, level, method="higher"))
        return cls(target, COVERAGE, q, floor, n, offset)

    def correct(self, estimate: float) -> float:
        """The estimate with the calibration's offset."""
        return estimate + self.offset

    def bounds(self, estimate: float, sd: float) -> tuple[float, float]:
        half = self.q * (sd + self.sd_floor)
        return estimate - half, estimate + half


def uncertainty_state(interval: Interval, features: FeatureModel, provenance: dict) -> dict:
    """Plain values to store in a bundle (``ModelBundle.uncertainty``)."""
    return {
        "method": "normalised split conformal over test-time augmentation; PCA feature score",
        "tta_views": [list(v) for v in TTA_VIEWS],
        "interval": asdict(interval),
        "features": asdict(features),
        "provenance": provenance,
    }


def from_state(state: dict | None) -> tuple[Interval, FeatureModel] | None:
    """The interval and the feature model stored in a bundle, or None."""
    if not state:
        return None
    return Interval(**state["interval"]), FeatureModel(**state["features"])
