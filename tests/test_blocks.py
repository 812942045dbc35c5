"""xbmd.model.blocks against the MONAI blocks they reproduce: same parameter names, same seeded
initialisation, same outputs (so bundles trained with either load in both)."""

from __future__ import annotations

import pytest
import torch

from xbmd.model import blocks

monai_blocks = pytest.importorskip("monai.networks.blocks")
monai_nets = pytest.importorskip("monai.networks.nets")


def _same(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # seeded construction: bit-identical weights
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        # same weights, same layers; summation order may differ between code paths
        assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(2, 16, 1), (16, 32, 2), (8, 8, 1)])
def test_residual_unit_matches_monai(norm, cin, cout, stride):
    torch.manual_seed(0)
    theirs = monai_blocks.ResidualUnit(
        2, cin, cout, strides=stride, subunits=1, norm=norm.upper(), act="PRELU"
    )
    torch.manual_seed(0)
    ours = blocks.ResidualUnit(cin, cout, stride, subunits=1, norm=norm)
    _same(ours, theirs, torch.rand(2, cin, 16, 16))


def test_convolution_and_upsample_match_monai():
    torch.manual_seed(1)
    theirs = monai_blocks.Convolution(2, 32, 16, kernel_size=3, norm="INSTANCE", act="PRELU")
    torch.manual_seed(1)
    ours = blocks.Convolution(32, 16)
    _same(ours, theirs, torch.rand(2, 32, 8, 8))
    torch.manual_seed(2)
    theirs = monai_blocks.UpSample(2, 32, 16, scale_factor=2, mode="deconv")
    torch.manual_seed(2)
    ours = blocks.UpSample(32, 16)
    _same(ours, theirs, torch.rand(2, 32, 8, 8))


def test_unet_matches_monai():
    channels = (8, 16, 32, 64)
    torch.manual_seed(3)
    theirs = monai_nets.UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="batch",
    )
    torch.manual_seed(3)
    ours = blocks.UNet(1, 3, channels, res_units=1, norm="batch")
    x = torch.rand(2, 1, 32, 32)
    theirs.train()  # move the batch-norm statistics away from their initial values first
    with torch.no_grad():
        theirs(x)
    ours.load_state_dict(theirs.state_dict())
    torch.manual_seed(3)
    fresh = blocks.UNet(1, 3, channels, res_units=1, norm="batch")
    torch.manual_seed(3)
    fresh_theirs = monai_nets.UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="batch",
    )
    _same(fresh, fresh_theirs, x)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
