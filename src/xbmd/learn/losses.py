"""Training-only networks and losses of hierarchical learning.

- :class:`MultiScaleDiscriminator`: pix2pixHD's multi-scale PatchGAN, i.e. MONAI
  ``PatchDiscriminator`` s applied to the (X-ray, DRR) pair at full and average-pooled scales
  (MONAI's own ``MultiScalePatchDiscriminator`` deepens each scale instead of pooling the input,
  which is 45 M parameters at 3 layers and not the published design).
- Losses: LSGAN through MONAI's ``PatchAdversarialLoss``; discriminator feature matching (L1
  between the discriminator's intermediate features of real and fake, as pix2pixHD); L1; and the
  gradient-correlation loss 1 - GC (:func:`xbmd.similarity.paired_gradient_correlation`); the
  hip-group consistency loss :func:`group_variance` (radiographs of one hip, one answer).
"""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.nn import functional as F

from xbmd.similarity import paired_gradient_correlation


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD multi-scale PatchGAN from MONAI ``PatchDiscriminator`` s.

    Scale k sees the (X-ray, DRR) pair average-pooled k times (3x3, stride 2). ``forward`` returns,
    per scale, the list of intermediate features with the patch logits last (MONAI's convention).
    """

    def __init__(self, in_channels: int, scales: int = 2, layers: int = 3, channels: int = 32):
        super().__init__()
        self.scales = nn.ModuleList(
            PatchDiscriminator(
                spatial_dims=2,
                channels=channels,
                in_channels=in_channels,
                out_channels=1,
                num_layers_d=layers,
                norm="INSTANCE",
            )
            for _ in range(scales)
        )

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        for i, disc in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(disc(x))
        return outputs


_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares", reduction="mean")


def adversarial_loss(outputs: list[list[torch.Tensor]], real: bool, for_discriminator: bool):
    """LSGAN loss over the scales' patch logits (the last entry of each scale's list)."""
    logits = [scale[-1] for scale in outputs]
    return _ADVERSARIAL(logits, target_is_real=real, for_discriminator=for_discriminator)


def feature_matching_loss(
    fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]
) -> torch.Tensor:
    """Mean L1 between the discriminator's intermediate features of fake and real (detached)."""
    terms = [
        F.l1_loss(f, r.detach())
        for fake_scale, real_scale in zip(fake, real, strict=True)
        for f, r in zip(fake_scale[:-1], real_scale[:-1], strict=True)
    ]
    return torch.stack(terms).mean()


def gradient_correlation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - gradient correlation of each (pred, target) pair, averaged over the batch.
    pred, target (B, H, W)."""
    return 1.0 - paired_gradient_correlation(pred, target).mean()


def group_variance(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean within-group variance: the consistency loss of radiographs of one hip.

    values (B,) or (B, K) (K outputs, each on its own), NaN = missing; groups (B,) integer
    labels (samples with the same label belong together). For each group and output with at
    least 2 finite values, the mean squared deviation from their mean; the result is the mean
    of those (0, still differentiable, when there is none). Zero when a group's values agree.
    """
    v = values.reshape(values.shape[0], -1)
    finite = torch.isfinite(v)
    v0 = torch.where(finite, v, torch.zeros_like(v))  # NaN stays out of the gradient
    _, number = torch.unique(groups, return_inverse=True)
    member = F.one_hot(number).to(v.dtype)[:, :, None] * finite[:, None, :].to(v.dtype)
    n = member.sum(0)  # (G, K)
    mean = (member * v0[:, None, :]).sum(0) / n.clamp_min(1)
    var = (member * (v0[:, None, :] - mean[None]) ** 2).sum(0) / n.clamp_min(1)
    used = n >= 2
    return var[used].mean() if used.any() else v0.sum() * 0
