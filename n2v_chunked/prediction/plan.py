"""The halo plan: how an array is cut into blocks for prediction.

:func:`plan` is pure: from the model's contract
(:class:`~n2v_chunked.model.contract.ModelContract`: its exact halo and the
size step of its grid) and the data's shape and stored chunks it chooses
working chunks and the dask block grid.  Nothing is read or computed here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any, Iterator, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import ConfigError, IncompatibleModelError
from ..model.unet import BYTES_PER_PIXEL_FEATURE

log = logging.getLogger(__name__)

# Default working chunk: the extended block's activations, estimated at
# model.BYTES_PER_PIXEL_FEATURE, stay below this.  For the paper's 2D U-Net
# (32 features) that is 1024^2 blocks (1072^2 with the halo, 91% useful pixels),
# about 1.2 GB measured peak per block on CPU.
BLOCK_ACTIVATION_BYTES = 2.5 * 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """How an array is cut into blocks for prediction.

    Attributes
    ----------
    dims : tuple of str
        Axis names of the data (canonical order, a subset of ``tczyx``).
    shape : tuple of int
        Data shape.
    spatial : tuple of str
        The model's spatial axes (``("y", "x")`` or ``("z", "y", "x")``); other
        axes except ``c`` are sample axes (``t``, and ``z`` for a 2D model).
    halo : tuple of int
        Halo per axis: the contract's halo (a multiple of the grid step) on
        spatial axes, 0 elsewhere.
    chunks : tuple of int
        Working chunk per axis, also the output's Zarr chunk shape.
    grid : tuple of tuple of int
        The dask chunks of the working array: regular ``chunks``, except that a
        last chunk smaller than the halo is merged into the one before it (a
        block must supply a whole halo to its neighbour).  Every block is a
        union of whole output chunks.
    rechunked : bool
        Whether ``grid`` differs from the input's dask chunks.
    multiple : int
        The largest grid step of the model (``2**depth`` of our U-Net).
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    spatial: tuple[str, ...]
    halo: tuple[int, ...]
    chunks: tuple[int, ...]
    grid: tuple[tuple[int, ...], ...]
    rechunked: bool
    multiple: int

    @property
    def numblocks(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.grid)

    @property
    def nblocks(self) -> int:
        return math.prod(self.numblocks)

    def bounds(self, axis: int) -> np.ndarray:
        """Block boundaries along ``axis`` (``numblocks[axis] + 1`` offsets)."""
        return np.concatenate([[0], np.cumsum(self.grid[axis])]).astype(int)


def model_spatial_dims(trained: Any) -> tuple[str, ...]:
    """The spatial axes a model works on: ``yx`` (2D) or ``zyx`` (3D)."""
    return trained.contract.spatial


def check_compatible(trained: Any, dims: Sequence[str], shape: Sequence[int]) -> tuple[str, ...]:
    """Raise :class:`N2VError` unless the model can predict data of these dims and shape.

    Returns the model's spatial axes.
    """
    con = trained.contract
    sizes = dict(zip(dims, shape))
    spatial = con.spatial
    missing = [d for d in spatial if d not in sizes]
    if missing:
        have = "".join(dims)
        raise IncompatibleModelError(
            f"model is {con.dims}D (axes {''.join(spatial)}) but the input has axes {have}: "
            f"no {''.join(missing)} axis (n2v-chunked info shows the input's axes)"
        )
    channels = sizes.get("c", 1)
    if channels != con.in_channels:
        raise IncompatibleModelError(f"model was trained for {con.in_channels} channel(s) but the input has {channels}")
    small = [f"{d}={sizes[d]}" for d, m in zip(spatial, con.grid) if sizes[d] < m]
    if small:
        raise IncompatibleModelError(
            f"input axis {', '.join(small)} is smaller than 2**depth = {max(con.grid)} of the model (its grid step); "
            "such an image is too small for this network"
        )
    return spatial


def _chunk_list(chunks: Any, dims: Sequence[str], spatial: Sequence[str]) -> dict[str, int]:
    """User chunks (one per axis, one per spatial axis, or a dict) as ``{dim: size}``."""
    if chunks is None:
        return {}
    if isinstance(chunks, dict):
        out = {str(k).lower(): v for k, v in chunks.items()}
        bad = sorted(set(out) - set(dims))
        if bad:
            raise ConfigError(f"chunks name axes {bad} that the input (axes {''.join(dims)}) lacks")
    else:
        values = list(chunks)
        if len(values) == len(dims):
            out = dict(zip(dims, values))
        elif len(values) == len(spatial):
            out = dict(zip(spatial, values))
        else:
            also = f" or {len(spatial)} (axes {''.join(spatial)})" if len(spatial) != len(dims) else ""
            raise ConfigError(f"chunks {values} must give {len(dims)} sizes, one per axis {''.join(dims)}{also}")
    try:
        out = {k: int(v) for k, v in out.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"chunks must be integers, got {chunks}") from None
    if any(v < 1 for v in out.values()):
        raise ConfigError(f"chunks must be positive, got {chunks}")
    return out


def _default_spatial_chunks(
    sizes: Sequence[int], halo: Sequence[int], grid: Sequence[int], features: int, store: Sequence[int | None]
) -> list[int]:
    """Near-cubic working chunks whose extended block fits the activation budget.

    Axes that fit in one block (with the budget left by the others) take their
    whole size; the rest share the budget equally.  Where the stored chunk is a
    multiple of the axis's ``grid`` step and fits, a block is a whole number of
    stored chunks (no chunk is read twice); otherwise the axis is split into
    equal blocks on the grid, so no thin last block wastes a halo.

    Examples
    --------
    A 3001 x 3001 image, depth-2 U-Net (grid 4, halo 24): blocks on the grid.

    >>> _default_spatial_chunks([3001, 3001], [24, 24], [4, 4], 32, [None, None])
    [1004, 1004]
    """
    m = math.lcm(*grid)
    budget = BLOCK_ACTIVATION_BYTES / (BYTES_PER_PIXEL_FEATURE * features)
    n = len(sizes)
    whole: set[int] = set()
    side = 0
    while True:
        free = [i for i in range(n) if i not in whole]
        if not free:
            break
        fixed = math.prod(sizes[i] + 2 * halo[i] for i in whole)
        ext = (budget / fixed) ** (1.0 / len(free))
        side = max(m, int((ext - 2 * max(halo[i] for i in free)) // m) * m)
        fits = {i for i in free if sizes[i] <= side}
        if not fits:
            break
        whole |= fits
    out = []
    for i in range(n):
        if i in whole:
            out.append(sizes[i])
            continue
        g = grid[i]
        c = max(side, halo[i])
        s = store[i]
        if s and s % g == 0 and halo[i] <= s <= c:
            c = (c // s) * s
        else:
            k = math.ceil(sizes[i] / c)
            c = max(halo[i], -(-math.ceil(sizes[i] / k) // g) * g)
        out.append(min(c, sizes[i]))
    return out


def _samples_per_block(
    trained: Any, dims: Sequence[str], shape: Sequence[int], spatial: Sequence[str],
    sp_chunks: Sequence[int], halo: Sequence[int],
) -> int:
    """Samples (t, or z for a 2D model) per block so one block's activations fit the budget."""
    per = math.prod(
        min(c, shape[dims.index(d)]) + 2 * halo[dims.index(d)] for d, c in zip(spatial, sp_chunks)
    )
    per *= shape[dims.index("c")] if "c" in dims else 1
    budget = BLOCK_ACTIVATION_BYTES / (BYTES_PER_PIXEL_FEATURE * trained.contract.features)
    return max(1, int(budget // per))


def _grid(size: int, chunk: int, halo: int) -> tuple[int, ...]:
    """Regular chunks along one axis; a tail shorter than the halo joins the block before it.

    Examples
    --------
    >>> _grid(1000, 256, 24)
    (256, 256, 256, 232)
    >>> _grid(530, 256, 24)
    (256, 274)
    """
    full, tail = divmod(size, chunk)
    blocks = [chunk] * full
    if tail:
        if blocks and tail < halo:
            blocks[-1] += tail
        else:
            blocks.append(tail)
    return tuple(blocks)


def plan(trained: Any, data_array: xr.DataArray, chunks: Any = None) -> Plan:
    """Halo and working chunks for predicting ``data_array`` with ``trained``.

    Parameters
    ----------
    trained : checkpoint.Trained
        The loaded model.
    data_array : xarray.DataArray
        Input with canonical dims (as from :func:`~n2v_chunked.io.sources.open_image`).
    chunks : sequence of int or dict, optional
        Working (and output) chunks: one size per axis of the data, one per
        spatial axis of the model, or ``{dim: size}``.  Spatial sizes are
        rounded up to a multiple of the model's grid step and to at least the halo;
        ``c`` is always one chunk.  Default: sized so one block's activations
        take about :data:`BLOCK_ACTIVATION_BYTES`, aligned to the stored chunks.

    Returns
    -------
    Plan

    Examples
    --------
    A 2D model of depth 2 (halo 24) on three 1000 x 700 frames stored in
    256 x 256 chunks: blocks of 256 x 256, all three frames per block.

    >>> import types, dask.array as da, xarray as xr
    >>> from n2v_chunked.model.config import ModelConfig
    >>> from n2v_chunked.model.contract import unet_contract
    >>> trained = types.SimpleNamespace(contract=unet_contract(ModelConfig(dims=2, depth=2), [0.0], [1.0]))
    >>> x = xr.DataArray(da.zeros((3, 1000, 700), chunks=(1, 256, 256)), dims=("t", "y", "x"))
    >>> p = plan(trained, x, chunks=(256, 256))
    >>> p.halo, p.chunks, p.nblocks
    ((0, 24, 24), (3, 256, 256), 12)
    >>> p.grid
    ((3,), (256, 256, 256, 232), (256, 256, 188))
    """
    dims = tuple(str(d) for d in data_array.dims)
    shape = tuple(int(s) for s in data_array.shape)
    spatial = check_compatible(trained, dims, shape)
    con = trained.contract
    step = dict(zip(spatial, con.grid))
    hw = dict(zip(spatial, con.halo))
    halo = tuple(hw.get(d, 0) for d in dims)
    user = _chunk_list(chunks, dims, spatial)
    data = data_array.data
    src = tuple(c[0] for c in data.chunks) if isinstance(data, da.Array) else shape
    sp_idx = [dims.index(d) for d in spatial]
    if all(d in user for d in spatial):
        sp_chunks = [user[d] for d in spatial]
    else:
        sp_chunks = _default_spatial_chunks(
            [shape[i] for i in sp_idx], [halo[i] for i in sp_idx], con.grid, con.features, [src[i] for i in sp_idx]
        )
        sp_chunks = [user.get(d, c) for d, c in zip(spatial, sp_chunks)]
    work: list[int] = []
    for ax, d in enumerate(dims):
        n = shape[ax]
        if d in spatial:
            asked = sp_chunks[spatial.index(d)]
            m = step[d]
            c = max(-(-asked // m) * m, halo[ax])
            if c >= n:
                c = n  # one block spans the axis: no halo exchange, any size
            elif d in user and c != asked:
                log.warning("chunk %d along %s rounded up to %d (a multiple of the model's grid step %d, at least "
                            "the halo %d)", asked, d, c, m, halo[ax])
        elif d == "c":
            if d in user and user[d] != n:
                log.warning("chunk %d along c ignored: every block holds all %d channel(s)", user[d], n)
            c = n
        else:  # sample axes: as asked, else as many as the activation budget allows
            c = user.get(d) or _samples_per_block(trained, dims, shape, spatial, sp_chunks, halo)
            c = min(c, n)
        work.append(c)
    grid = tuple(_grid(n, c, h) for n, c, h in zip(shape, work, halo))
    current = tuple(tuple(int(v) for v in c) for c in data.chunks) if isinstance(data, da.Array) else None
    return Plan(dims, shape, spatial, halo, tuple(work), grid, current != grid, max(con.grid))


def batches(numblocks: Sequence[int], batch_blocks: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Hyper-rectangles of at most ``batch_blocks`` blocks covering the grid, outer axes split first."""
    tile = list(numblocks)
    for ax in range(len(tile)):
        if math.prod(tile) <= batch_blocks:
            break
        tile[ax] = max(1, batch_blocks // math.prod(tile[ax + 1 :]))
    for starts in itertools.product(*(range(0, n, t) for n, t in zip(numblocks, tile))):
        yield starts, tuple(min(s + t, n) for s, t, n in zip(starts, tile, numblocks))

