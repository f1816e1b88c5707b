"""The U-Net: shapes, variants, and the receptive field proved by perturbation."""

import numpy as np
import pytest
import torch

from n2v_chunked.model.config import ModelConfig
from n2v_chunked.errors import N2VError
from n2v_chunked.model.unet import UNet, receptive_field, size_multiple

from helpers import forward_flops


def _positive_net(cfg: ModelConfig) -> UNet:
    """All weights positive: a large positive perturbation then reaches every
    output that depends on it (ReLU passes it, max-pool selects it), so the
    changed set is exactly the dependency set."""
    torch.manual_seed(0)
    net = UNet(cfg).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 1e-3)
    return net


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(dims=2, depth=0, features=4),
        ModelConfig(dims=2, depth=1, features=4),
        ModelConfig(dims=2, depth=2, features=4),
        ModelConfig(dims=2, depth=2, features=4, n2v2=True),
        ModelConfig(dims=2, depth=3, features=2, kernel_size=5),
        ModelConfig(dims=3, depth=2, features=2),
        ModelConfig(dims=3, depth=1, features=2, n2v2=True),
    ],
    ids=lambda c: f"{c.dims}d-depth{c.depth}-k{c.kernel_size}{'-n2v2' if c.n2v2 else ''}",
)
def test_receptive_field_matches_perturbation(cfg):
    half = receptive_field(cfg)[0]
    m = size_multiple(cfg)
    size = 2 * half + 4 * m + 8
    size += (-size) % m
    if cfg.dims == 3:
        size = min(size, 2 * half + 2 * m + 4 + (-(2 * half + 2 * m + 4)) % m)
    net = _positive_net(cfg)
    shape = (1, 1) + (size,) * cfg.dims
    x = torch.zeros(shape, dtype=torch.float64)
    base = net(x)
    extents = []
    # every position of the pooling grid, far from the borders
    for off in range(m):
        p = size // 2 - (size // 2) % m + off
        xp = x.clone()
        xp[(0, 0) + (p,) * cfg.dims] = 1e3
        changed = (net(xp) - base).abs() > 1e-9
        idx = changed.nonzero()[:, 2:]
        assert len(idx) > 0
        # nothing beyond the receptive field changes, along any axis
        assert int((idx - p).abs().max()) <= half
        extents.append(int((idx - p).abs().max()))
    # and the field is attained (the function is exact, not merely an upper bound)
    assert max(extents) == half


def test_receptive_field_values_and_flops():
    assert receptive_field(ModelConfig(depth=2)) == (23, 23)
    assert receptive_field(ModelConfig(dims=3, depth=2)) == (23, 23, 23)
    # the paper's network on a 64x64 patch: about 1 GFLOP forward
    assert 0.8e9 < forward_flops(ModelConfig(), (64, 64)) < 1.2e9


@pytest.mark.parametrize("n2v2", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_and_linear_head(dims, n2v2):
    cfg = ModelConfig(dims=dims, in_channels=2, features=4, n2v2=n2v2)
    net = UNet(cfg).eval()
    x = torch.randn((3, 2) + (16,) * dims)
    y = net(x)
    assert y.shape == x.shape
    assert isinstance(net.head, (torch.nn.Conv2d, torch.nn.Conv3d))
    # batch norm sits before every activation
    names = [type(m).__name__ for m in net.encoders[0]]
    assert names == [f"Conv{dims}d", f"BatchNorm{dims}d", "ReLU"] * 2


def test_n2v2_has_no_top_skip():
    plain = UNet(ModelConfig(features=4))
    n2v2 = UNet(ModelConfig(features=4, n2v2=True))
    # the top decoder takes only the up-sampled features in N2V2
    assert n2v2.decoders[-1][0].in_channels == 8
    assert plain.decoders[-1][0].in_channels == 12


def test_independent_channels_share_one_network():
    cfg = ModelConfig(in_channels=3, features=4, independent_channels=True)
    net = UNet(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    y = net(x)
    one = net(x[:, 1:2].expand(2, 3, 16, 16).contiguous())[:, :1]
    np.testing.assert_allclose(y[:, 1:2].detach(), one.detach(), atol=1e-6)


@pytest.mark.parametrize("bad", [{"dims": 4}, {"kernel_size": 4}, {"depth": -1}])
def test_bad_model_config(bad):
    with pytest.raises(N2VError):
        ModelConfig(**bad)


def test_channel_default_is_independent_as_the_docs_say():
    import re
    from pathlib import Path

    from n2v_chunked.model.checkpoint import configs_from_meta
    from n2v_chunked.cli.commands import build_parser

    options = (Path(__file__).resolve().parents[1] / "docs" / "command_line.md").read_text()
    row = next(line for line in options.splitlines() if line.startswith("| train | `--joint-channels`"))
    assert re.search(r"Default: independent channels", row)
    assert ModelConfig().independent_channels is True
    sub = ["train", "in.tif", "--model-dir", "m"]
    assert build_parser().parse_args(sub).independent_channels is True
    assert build_parser().parse_args([*sub, "--joint-channels"]).independent_channels is False
    # a model directory written while joint was the default, without the key, stays joint
    assert configs_from_meta({"model": {"in_channels": 2}})[0].independent_channels is False
