"""Blind-spot masking and the masked loss (N2V paper, Section 3.5).

Per patch and channel, one pixel is chosen in every cell of a regular grid
(stratified sampling, so chosen pixels never cluster); its value is replaced
by a random *other* pixel of its neighbourhood (N2V) or by the median of the
neighbourhood without its centre (N2V2).  structN2V additionally hides a line
through each chosen pixel, replacing it with values drawn at random positions
of the same patch, so that noise correlated along that line cannot leak.  The
loss is the MSE at the chosen pixels only, against their original values.

Everything is vectorised on the batch's device with an explicit generator: no
Python loop over pixels or patches.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch

from ..errors import ConfigError
from ..model.config import MaskConfig

_AXIS_FROM_END = {"x": 1, "y": 2, "z": 3}


@dataclasses.dataclass
class MaskedBatch:
    """A masked batch and where to compute the loss.

    Attributes
    ----------
    inputs : torch.Tensor
        ``(B, C, *spatial)`` network input with the chosen pixels replaced.
    index : tuple of torch.Tensor
        Advanced index ``(b, c, *pos)`` of the chosen pixels, each of shape ``(K,)``.
    targets : torch.Tensor
        ``(K,)`` original values at the chosen pixels.
    """

    inputs: torch.Tensor
    index: tuple[torch.Tensor, ...]
    targets: torch.Tensor


def max_density(ndim: int) -> float:
    """The largest density the grid expresses: one pixel per cell of side 2 (1/4 in 2D, 1/8 in 3D)."""
    return 0.5**ndim


def grid_cell(density: float, ndim: int) -> int:
    """Side of the stratification cell: one masked pixel per ``cell**ndim`` pixels.

    For the paper's N=64 per 64x64 patch (density 1/64) this is 8 in 2D, and
    4 in 3D (again 1/64 of the voxels).  A cell of side 1 would mask every
    pixel (nothing left to predict from), so a density above
    :func:`max_density` is refused rather than rounded to 100%.
    """
    limit = max_density(ndim)
    if not 0.0 < density <= limit:
        raise ConfigError(f"mask density {density:g} is too high for {ndim}D patches: the masking grid needs a cell "
                       f"of at least 2 pixels per axis, so at most {limit:g} (1/{2**ndim}); "
                       f"the paper uses 1/64 = {1 / 64:g}")
    return max(2, round(density ** (-1.0 / ndim)))


def actual_density(density: float, ndim: int) -> float:
    """The density the grid really masks for a requested ``density`` (inside patches of whole cells)."""
    return grid_cell(density, ndim) ** -float(ndim)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small integer tensor on ``device``, built once (never modify it).

    A host-to-device copy per batch would make the host wait for a GPU's
    queue each time; these values are the same for every batch.
    """
    return torch.tensor(values, dtype=torch.long, device=device)


def _neighbour_offsets(cfg: MaskConfig, ndim: int, device: torch.device) -> torch.Tensor:
    """All neighbourhood offsets except the centre and (structN2V) the masked line."""
    r = cfg.neighbourhood // 2
    line = _struct_offsets(cfg, ndim)
    hidden = {tuple(o) for o in line}
    offsets = [
        o for o in itertools.product(range(-r, r + 1), repeat=ndim) if any(o) and o not in hidden
    ]
    return _constant(tuple(offsets), device)


def _struct_offsets(cfg: MaskConfig, ndim: int) -> list[list[int]]:
    """Offsets (without the centre) of the structN2V line(s) through a chosen pixel."""
    if not cfg.struct_span:
        return []
    h = cfg.struct_span // 2
    out = []
    for name in cfg.struct_axes:
        axis = ndim - _AXIS_FROM_END[name]
        if axis < 0:
            raise ConfigError(f"structN2V axis '{name}' does not exist in {ndim}D data")
        for t in range(-h, h + 1):
            if t:
                o = [0] * ndim
                o[axis] = t
                out.append(o)
    return out


def _stratified_positions(
    n: int, shape: tuple[int, ...], cell: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """One random position per grid cell for each of ``n`` patches: ``(n, cells, ndim)``."""
    starts = torch.cartesian_prod(
        *[torch.arange(0, s, min(cell, s), device=device) for s in shape]
    ).reshape(-1, len(shape))
    size = _constant(shape, device)
    width = torch.minimum(torch.full_like(starts, cell), size - starts)  # partial cells at the border
    u = torch.rand((n, *starts.shape), generator=generator, device=device)
    return starts + (u * width).long()


def _reflect_into(pos: torch.Tensor, offset: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``pos + offset``, mirroring the offset on axes where it leaves the patch."""
    q = pos + offset
    outside = (q < 0) | (q >= size)
    q = torch.where(outside, pos - offset, q)
    return torch.minimum(torch.clamp(q, min=0), size - 1)


def mask_batch(x: torch.Tensor, cfg: MaskConfig, generator: torch.Generator) -> MaskedBatch:
    """Choose, replace and remember the blind-spot pixels of a batch.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, *spatial)`` normalised patches (2 or 3 spatial dims).
    cfg : MaskConfig
        Density, neighbourhood, replacement and structN2V settings.
    generator : torch.Generator
        Random generator on ``x.device``; each data-loader worker and rank
        should seed its own so that masks differ.

    Returns
    -------
    MaskedBatch
        Masked inputs, the index of the chosen pixels and their original values.

    Examples
    --------
    One pixel per 8x8 cell (density 1/64) of each patch and channel is chosen
    and replaced by the median of its neighbourhood:

    >>> import torch
    >>> from n2v_chunked.model.config import MaskConfig
    >>> x = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    >>> batch = mask_batch(x, MaskConfig(), torch.Generator().manual_seed(0))
    >>> batch.inputs.shape, batch.targets.shape
    (torch.Size([2, 1, 32, 32]), torch.Size([32]))
    >>> bool((batch.targets == x[batch.index]).all())
    True
    >>> int((batch.inputs != x).sum())
    32
    """
    b, c, *spatial = x.shape
    shape = tuple(spatial)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ConfigError(f"masking needs 2 or 3 spatial dims, got shape {tuple(x.shape)}")
    if shape[-1] < 2:
        raise ConfigError(f"patches must be at least 2 pixels wide along x, got {shape}")
    device = x.device
    size = _constant(shape, device)
    n = b * c
    pos = _stratified_positions(n, shape, grid_cell(cfg.density, ndim), generator, device)
    cells = pos.shape[1]
    pos = pos.reshape(-1, ndim)  # (K, ndim), K = n * cells
    flat_patch = torch.arange(n, device=device).repeat_interleave(cells)
    bi, ci = flat_patch // c, flat_patch % c

    def at(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (bi, ci, *p.unbind(-1))

    targets = x[at(pos)]
    offsets = _neighbour_offsets(cfg, ndim, device)
    if cfg.replacement == "uniform":
        pick = torch.randint(len(offsets), (len(pos),), generator=generator, device=device)
        src = _reflect_into(pos, offsets[pick], size)
        # On tiny axes mirroring can land back on the pixel: step along x instead.
        same = (src == pos).all(-1)
        step = torch.where(pos[:, -1] + 1 < shape[-1], 1, -1)
        src[:, -1] = torch.where(same, pos[:, -1] + step, src[:, -1])
        values = x[at(src)]
    else:  # N2V2: median of the neighbourhood without its centre
        nb = _reflect_into(pos[:, None, :], offsets[None], size)  # (K, M, ndim)
        vals = x[(bi[:, None], ci[:, None], *nb.unbind(-1))]
        # a neighbour mirrored onto the centre must not vote
        centre = (nb == pos[:, None, :]).all(-1)
        vals = torch.where(centre, torch.nan, vals)
        values = torch.nanmedian(vals, dim=1).values

    inputs = x.clone()
    line = _struct_offsets(cfg, ndim)
    if line:
        lo = _constant(tuple(map(tuple, line)), device)  # (L, ndim)
        lp = pos[:, None, :] + lo[None]  # (K, L, ndim)
        inside = ((lp >= 0) & (lp < size)).all(-1)
        lb, lc = bi[:, None].expand_as(inside)[inside], ci[:, None].expand_as(inside)[inside]
        lp = lp[inside]
        # values from random positions of the same patch keep the data's distribution
        rnd = (torch.rand((len(lp), ndim), generator=generator, device=device) * size).long()
        inputs[(lb, lc, *lp.unbind(-1))] = x[(lb, lc, *rnd.unbind(-1))]
    inputs[at(pos)] = values.to(x.dtype)
    return MaskedBatch(inputs=inputs, index=at(pos), targets=targets)


def masked_mse(prediction: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
    """Mean squared error at the chosen pixels only, in float32."""
    return torch.mean((prediction[batch.index].float() - batch.targets.float()) ** 2)
