"""The generator of hierarchical learning (with its regression head): what inference runs.

- :class:`Generator`: an encoder-decoder from the model input (normalised X-ray crop + valid
  mask, 2 channels) to 2 channels: the DRR in g/cm2 (linear output) and the logit of the DRR's
  region. Its encoder's deepest features also feed :class:`RegressionHead` (stage 3). The backbone
  is pluggable: ``'unet'`` (default, built here from MONAI-identical blocks,
  :mod:`xbmd.model.blocks`, small enough to train on two CPU cores) or any MONAI
  ``FlexibleUNet`` encoder (``'resnet18'``, ``'resnet34'``, ``'efficientnet-b0'``, ..., for a GPU;
  these need MONAI at inference too).

The discriminator and the losses are training-only: ``xbmd.learn.losses``.
"""

from __future__ import annotations

import torch
from torch import nn

from xbmd.errors import InputError
from xbmd.model.blocks import Convolution, ResidualUnit, UpSample

#: Model input channels: the normalised X-ray and its valid-pixel mask.
IN_CHANNELS = 2
#: Generator output channels: the DRR (g/cm2) and the logit of its region.
OUT_CHANNELS = 2
#: Extra inputs of the regression head of a model with the kVp input: the normalised kVp and
#: its known flag (:func:`xbmd.model.inputs.kvp_features`).
KVP_INPUTS = 2
FLEXIBLE_BACKBONES = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
)
BACKBONES = ("unet", *FLEXIBLE_BACKBONES)


class _UNetBackbone(nn.Module):
    """A small U-Net from MONAI residual units: ``encode`` -> feature list, ``decode`` -> map."""

    def __init__(self, channels: list[int], res_units: int) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        previous = IN_CHANNELS
        for i, ch in enumerate(channels):
            self.down.append(ResidualUnit(previous, ch, 1 if i == 0 else 2, max(1, res_units)))
            previous = ch
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for ch_low, ch_skip in zip(channels[:0:-1], channels[-2::-1], strict=True):
            self.up.append(UpSample(ch_low, ch_skip))
            self.fuse.append(Convolution(2 * ch_skip, ch_skip))
        self.out_features = channels[-1]
        self.head = nn.Conv2d(channels[0], OUT_CHANNELS, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.down:
            x = block(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, fuse, skip in zip(self.up, self.fuse, features[-2::-1], strict=True):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class _FlexibleBackbone(nn.Module):
    """MONAI FlexibleUNet (ResNet / EfficientNet encoder, U-Net decoder), randomly initialised."""

    def __init__(self, backbone: str) -> None:
        from monai.networks.nets import FlexibleUNet  # MONAI takes seconds to import

        super().__init__()
        self.net = FlexibleUNet(
            IN_CHANNELS, OUT_CHANNELS, backbone, pretrained=False, spatial_dims=2
        )
        with torch.no_grad():
            features = self.net.encoder(torch.zeros(1, IN_CHANNELS, 64, 64))
        self.out_features = int(features[-1].shape[1])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net.encoder(x))

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.net.segmentation_head(self.net.decoder(features, self.net.skip_connect))


class RegressionHead(nn.Module):
    """Stage 3: the deepest encoder features average-pooled to a 4 x 4 grid, then a small MLP.

    The grid keeps where things are: the backbone's instance normalisation makes each channel's
    global mean nearly constant, so a global average pool alone carries almost no signal.

    ``extra_inputs`` (0 or ``KVP_INPUTS``) are appended to the pooled features: the kVp input
    (:func:`xbmd.model.inputs.kvp_features`). Without them the head, its parameter names and
    its outputs are those of a head without the option.
    """

    GRID = 4

    def __init__(
        self, in_features: int, n_targets: int, hidden: int = 64, extra_inputs: int = 0
    ) -> None:
        super().__init__()
        self.extra_inputs = extra_inputs
        self.pool = nn.AdaptiveAvgPool2d(self.GRID)
        self.mlp = nn.Sequential(
            nn.Linear(in_features * self.GRID**2 + extra_inputs, hidden),
            nn.PReLU(),
            nn.Linear(hidden, n_targets),
        )

    def forward(self, deepest: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """deepest (B, C, h, w) -> (B, n_targets); extra (B, extra_inputs), None: all zero
        (for the kVp input: unknown)."""
        pooled = self.pool(deepest).flatten(1)
        if not self.extra_inputs:
            return self.mlp(pooled)
        if extra is None:
            extra = pooled.new_zeros(pooled.shape[0], self.extra_inputs)
        return self.mlp(torch.cat([pooled, extra.to(pooled)], dim=1))


class Generator(nn.Module):
    """X-ray crop -> (DRR g/cm2, region logit), and the standardised targets of stage 3.

    Parameters
    ----------
    backbone : one of ``BACKBONES``.
    channels, res_units : the ``'unet'`` backbone's channels per level and residual subunits.
    n_targets : regression outputs (0: no head).
    kvp : the head also takes the kVp input (``KVP_INPUTS`` values,
        :func:`xbmd.model.inputs.kvp_features`).
    """

    def __init__(
        self,
        backbone: str = "unet",
        channels: list[int] | tuple[int, ...] = (16, 32, 64, 128, 256),
        res_units: int = 1,
        n_targets: int = 0,
        kvp: bool = False,
    ) -> None:
        super().__init__()
        if backbone == "unet":
            self.backbone = _UNetBackbone(list(channels), res_units)
        elif backbone in FLEXIBLE_BACKBONES:
            self.backbone = _FlexibleBackbone(backbone)
        else:
            raise InputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.kvp = bool(kvp)
        self.head = (
            RegressionHead(
                self.backbone.out_features, n_targets, extra_inputs=KVP_INPUTS if kvp else 0
            )
            if n_targets
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        decode: bool = True,
        regress: bool = True,
        kvp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(maps (B, 2, H, W) or None, targets (B, n_targets) or None).

        ``kvp``: (B, 2) kVp input of a model with ``kvp`` (None: unknown); ignored otherwise.
        """
        features = self.backbone.encode(x)
        maps = self.backbone.decode(features) if decode else None
        targets = None
        if regress and self.head is not None:
            targets = self.head(features[-1], kvp) if self.kvp else self.head(features[-1])
        return maps, targets


def build_generator(config: dict) -> Generator:
    """The generator a resolved training config describes (``xbmd.learn.config``)."""
    g = config["generator"]
    return Generator(
        g["backbone"],
        g["channels"],
        g["res_units"],
        n_targets=len(config["stages"]["3"]["targets"]),
        # configs older than the kVp input have no "regression" section
        kvp=bool(config.get("regression", {}).get("kvp", False)),
    )
