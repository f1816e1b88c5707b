"""The U-Net of Noise2Void (CSBDeep flavour) and its exact receptive field.

Two convolutions per level, batch norm before each activation, nearest
up-sampling, a linear 1x1 output layer.  The N2V2 variant (Hoeck et al. 2022)
drops the top-level skip connection and replaces max-pooling with max-blur-
pooling, which removes the checkerboard artefacts of plain N2V.

The receptive field is computed analytically by propagating index intervals
backwards through the same structure :class:`UNet` builds, so chunked
prediction can size its halo exactly (``tests/test_model.py`` proves it with
autograd).
"""

from __future__ import annotations

import dataclasses

from .architecture import N2VUNet
from .config import ModelConfig


# Bytes of activations per input pixel and feature of the top level, measured
# for the depth-2 U-Net in float32 inference (peak, with cuDNN/oneDNN workspaces):
# the unit of inference.pixel_budget and of the prediction plan's block size.
BYTES_PER_PIXEL_FEATURE = 48


def size_multiple(cfg: ModelConfig) -> int:
    """Spatial sizes the network accepts without padding are multiples of this."""
    return 2**cfg.depth


def _pool_interval(lo: int, hi: int, n2v2: bool) -> tuple[int, int]:
    """Input interval (level i) of the pooled interval ``[lo, hi]`` (level i+1)."""
    if n2v2:  # max-pool(2, stride 1, right pad) then blur(3, stride 2, pad 1)
        return 2 * lo - 1, 2 * hi + 2
    return 2 * lo, 2 * hi + 1


def _input_interval(o: int, cfg: ModelConfig) -> tuple[int, int]:
    """Interval of input indices (one axis) that output index ``o`` depends on."""
    r2 = 2 * ((cfg.kernel_size - 1) // 2)  # two convolutions per block

    def encoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        # [lo, hi] at the output of encoder block ``level`` -> level-0 input
        lo, hi = lo - r2, hi + r2
        if level == 0:
            return lo, hi
        return encoder(level - 1, *_pool_interval(lo, hi, cfg.n2v2))

    def decoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        # [lo, hi] at the output of decoder block ``level`` -> level-0 input
        lo, hi = lo - r2, hi + r2
        below_lo, below_hi = lo // 2, hi // 2  # nearest up-sampling
        if level + 1 == cfg.depth:  # the bottleneck block, fed by the last pool
            below_lo, below_hi = below_lo - r2, below_hi + r2
            spans = [encoder(level, *_pool_interval(below_lo, below_hi, cfg.n2v2))]
        else:
            spans = [decoder(level + 1, below_lo, below_hi)]
        if not (cfg.n2v2 and level == 0):
            spans.append(encoder(level, lo, hi))  # skip connection
        return min(s[0] for s in spans), max(s[1] for s in spans)

    if cfg.depth == 0:
        return o - r2, o + r2
    return decoder(0, o, o)


def receptive_field(cfg: ModelConfig) -> tuple[int, ...]:
    """Exact half-width of the receptive field along each spatial axis.

    An output pixel depends on input pixels at most this far away (on either
    side), for every position relative to the pooling grid.

    Parameters
    ----------
    cfg : ModelConfig
        The architecture.

    Returns
    -------
    tuple of int
        One half-width per spatial axis (the network is isotropic).
    """
    half = 0
    for o in range(size_multiple(cfg)):  # the dependency pattern has this period
        lo, hi = _input_interval(o, cfg)
        half = max(half, o - lo, hi - o)
    return (half,) * cfg.dims


def halo_width(cfg: ModelConfig) -> tuple[int, ...]:
    """The halo of chunked prediction: :func:`receptive_field` rounded up to a multiple of ``2**depth``.

    A block extended by this much on each side holds all the input its output
    pixels depend on, and its extended extent starts on the pooling grid of
    the padded whole image, so chunked prediction equals whole-image
    prediction.

    Parameters
    ----------
    cfg : ModelConfig
        The architecture.

    Returns
    -------
    tuple of int
        One halo width per spatial axis.

    Examples
    --------
    >>> from n2v_chunked.model.config import ModelConfig
    >>> cfg = ModelConfig(dims=2, depth=2, kernel_size=3)
    >>> receptive_field(cfg), halo_width(cfg)
    ((23, 23), (24, 24))
    """
    m = size_multiple(cfg)
    return tuple(-(-r // m) * m for r in receptive_field(cfg))


class UNet(N2VUNet):
    """U-Net for 2D or 3D N2V (:class:`n2v_chunked.model.architecture.N2VUNet` built from a config).

    Parameters
    ----------
    cfg : ModelConfig
        Architecture; ``cfg.dims`` picks 2D or 3D layers.

    Notes
    -----
    Inputs are ``(N, C, *spatial)`` with every spatial size a multiple of
    ``size_multiple(cfg)``; :func:`n2v_chunked.engine.inference.run_network` pads
    arbitrary sizes.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(**dataclasses.asdict(cfg))
        self.cfg = cfg
