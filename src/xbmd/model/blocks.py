"""The network building blocks of xbmd's models, in plain PyTorch.

Why not MONAI's own blocks: ``import monai`` loads the whole library at once (its transforms,
data, handlers, ignite and tensorboardX: 5.7 s of a 6.2 s cold start of ``xbmd estimate``
measured on 2 cores), and inference needs none of it. These classes reproduce the MONAI 1.x
blocks the models were built from (``Convolution``, ``ResidualUnit``, ``UpSample`` in 'deconv'
mode, ``UNet`` with residual units) *exactly*: the same layers, in the same order, under the same
parameter names, created in the same order (so a seed gives the same initial weights). A model
trained with MONAI's blocks loads here unchanged, and ``tests/test_blocks.py`` checks outputs,
state-dict keys and seeded initialisation against MONAI itself. Only the options xbmd uses are
supported: 2D, kernel 3, PReLU, instance or batch normalisation, no dropout.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("instance", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # MONAI's 'INSTANCE': affine=False, no running stats
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be one of {NORMS}, not {kind!r}")


class ADN(nn.Sequential):
    """Normalisation then PReLU (MONAI ``ADN`` with ordering 'NDA' and no dropout)."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.add_module("N", _norm(norm, channels))
        self.add_module("A", nn.PReLU())


class Convolution(nn.Sequential):
    """A 3 x 3 convolution (or a transposed one), then :class:`ADN` unless ``conv_only``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        strides: int = 1,
        norm: str = "instance",
        conv_only: bool = False,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        if transposed:  # output_padding = stride - 1 doubles the size exactly (MONAI's choice)
            conv = nn.ConvTranspose2d(
                in_channels, out_channels, 3, stride=strides, padding=1, output_padding=strides - 1
            )
        else:
            conv = nn.Conv2d(in_channels, out_channels, 3, stride=strides, padding=1)
        self.add_module("conv", conv)
        if not conv_only:
            self.add_module("adn", ADN(out_channels, norm))


class ResidualUnit(nn.Module):
    """``subunits`` :class:`Convolution` s (the first strided) plus a residual path: a strided
    3 x 3 convolution when the size changes, 1 x 1 when only the channels do, else identity."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        strides: int = 1,
        subunits: int = 2,
        norm: str = "instance",
        last_conv_only: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        channels, stride = in_channels, strides
        subunits = max(1, subunits)
        for su in range(subunits):
            only = last_conv_only and su == subunits - 1
            self.conv.add_module(
                f"unit{su:d}", Convolution(channels, out_channels, stride, norm, conv_only=only)
            )
            channels, stride = out_channels, 1
        if strides != 1:
            self.residual = nn.Conv2d(in_channels, out_channels, 3, strides, 1)
        elif in_channels != out_channels:
            self.residual = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        return self.conv(x) + res


class UpSample(nn.Sequential):
    """A 2 x 2 transposed convolution of stride 2 (MONAI ``UpSample``, mode 'deconv')."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.add_module("deconv", nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2))


class SkipConnection(nn.Module):
    """``cat([x, submodule(x)])`` along the channels."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """MONAI's ``UNet`` (2D, kernel 3, PReLU, ``res_units`` >= 1 residual units per level).

    Parameters
    ----------
    in_channels, out_channels : input and output channels.
    channels : feature channels per level, top first; every level (the top included) starts
        with a stride-2 residual unit, as MONAI's with strides of 2.
    res_units : residual subunits per down block.
    norm : 'instance' or 'batch'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...],
        res_units: int = 1,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if res_units < 1 or len(channels) < 2:
            raise ValueError("UNet needs res_units >= 1 and at least 2 levels")
        self.res_units, self.norm = res_units, norm
        self.model = self._block(in_channels, out_channels, tuple(channels), True)

    def _block(self, inc: int, outc: int, channels: tuple[int, ...], is_top: bool) -> nn.Module:
        c = channels[0]
        # MONAI builds the level below first: the same order keeps seeded initialisations equal
        if len(channels) > 2:
            sub = self._block(c, c, channels[1:], False)
            upc = 2 * c
        else:
            sub = ResidualUnit(c, channels[1], 1, self.res_units, self.norm)
            upc = c + channels[1]
        down = ResidualUnit(inc, c, 2, self.res_units, self.norm)  # every level halves the size
        up = nn.Sequential(
            Convolution(upc, outc, 2, self.norm, transposed=True),
            ResidualUnit(outc, outc, 1, 1, self.norm, last_conv_only=is_top),
        )
        return nn.Sequential(down, SkipConnection(sub), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
