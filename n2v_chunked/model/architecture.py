"""The N2V U-Net as a self-contained PyTorch module (no n2v_chunked imports).

This file is copied verbatim into every BioImage Model Zoo package that
``n2v-chunked export`` writes, as the architecture of its
``pytorch_state_dict`` weights: a Zoo consumer (bioimageio.core, ilastik,
napari) builds the network from it without n2v_chunked installed.
:class:`n2v_chunked.model.unet.UNet` is this class built from a ``ModelConfig``,
so the two can never drift apart.

Two convolutions per level, batch norm before each activation, nearest
up-sampling, a linear 1x1 output layer.  The N2V2 variant (Hoeck et al. 2022)
drops the top-level skip connection and replaces max-pooling with max-blur-
pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ConvBlock(nn.Sequential):
    """Two convolutions, each followed by batch norm and ReLU."""

    def __init__(self, dims: int, cin: int, cout: int, k: int) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            # no conv bias: the following batch norm has its own shift
            layers += [conv(c_in, cout, k, padding=k // 2, bias=False), norm(cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class _MaxBlurPool(nn.Module):
    """Anti-aliased max-pooling (Zhang 2019), as used by N2V2."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.dims = dims
        self.channels = channels
        k1 = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kernel = k1[:, None] * k1[None, :] if dims == 2 else k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        x = pool(F.pad(x, (0, 1) * self.dims, mode="replicate"), 2, stride=1)
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=self.channels)


class N2VUNet(nn.Module):
    """U-Net for 2D or 3D N2V, built from plain keyword arguments.

    Parameters
    ----------
    dims : int
        2 or 3 spatial dimensions.
    in_channels : int
        Channels in (and out).
    depth : int
        Down-sampling steps; spatial sizes must be multiples of ``2**depth``.
    kernel_size : int
        Odd convolution size.
    features : int
        Feature maps at the top level, doubled at each level.
    n2v2 : bool
        N2V2 variant.
    independent_channels : bool
        One shared single-channel network applied to each channel.
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, depth: int = 2, kernel_size: int = 3,
                 features: int = 32, n2v2: bool = False, independent_channels: bool = False) -> None:
        super().__init__()
        self.dims, self.depth, self.n2v2 = dims, depth, n2v2
        self.independent_channels = independent_channels
        d, k, f = dims, kernel_size, features
        cin = 1 if independent_channels else in_channels
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        c = cin
        for level in range(depth):
            self.encoders.append(_ConvBlock(d, c, f * 2**level, k))
            c = f * 2**level
            self.pools.append(_MaxBlurPool(d, c) if n2v2 else (nn.MaxPool2d(2) if d == 2 else nn.MaxPool3d(2)))
        self.bottom = _ConvBlock(d, c, f * 2**depth, k)
        c = f * 2**depth
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            skip = 0 if (n2v2 and level == 0) else f * 2**level
            self.decoders.append(_ConvBlock(d, c + skip, f * 2**level, k))
            c = f * 2**level
        conv = nn.Conv2d if d == 2 else nn.Conv3d
        self.head = conv(c, cin, 1)  # linear output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.independent_channels:
            n, c = x.shape[:2]
            return self._forward(x.reshape(n * c, 1, *x.shape[2:])).reshape(x.shape)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc, pool in zip(self.encoders, self.pools):
            x = enc(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for i, dec in enumerate(self.decoders):
            level = self.depth - 1 - i
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            if not (self.n2v2 and level == 0):
                x = torch.cat([x, skips[level]], dim=1)
            x = dec(x)
        return self.head(x)
