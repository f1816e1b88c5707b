"""Per-channel normalisation statistics, computed out of core.

N2V trains on ``(x - mean) / std`` per channel.  For an in-memory array the
statistics are exact; for a chunked (dask/zarr) array they come from a dask
reduction over small regions spread evenly (stratified) over the whole array
within a byte budget, so a terabyte volume is never read in full.  When the
budget covers the array the result is exact.  Per-block moments (count, mean, sum of squared deviations) are
combined pairwise (Chan et al.), which stays accurate for large counts and
large offsets where a naive sum of squares would cancel.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import AxesError, UnreadableDataError

DEFAULT_MAX_BYTES = 256 * 2**20
# Regions of a sampled estimate: 256 strata put the mean of a linear trend within ~1/256 of its
# range, and bound the chunks decoded on a lazy terabyte volume.
DEFAULT_MAX_REGIONS = 256
_SLAB = 2**24  # elements per in-memory pass: bounds the float64 temporaries


def _moments(x: np.ndarray) -> tuple[int, float, float, int]:
    """(count, mean, M2, non-finite count) of ``x`` in float64."""
    x = np.asarray(x, dtype=np.float64).ravel()
    bad = 0 if x.dtype.kind != "f" else int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad or x.size == 0:
        return int(x.size), 0.0, 0.0, bad
    mean = float(x.mean())
    return int(x.size), mean, float(np.square(x - mean).sum()), 0


def _combine(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n


def _block_moments(block: np.ndarray, c_axis: int | None) -> np.ndarray:
    """Per-channel moments of one block: rows (count, mean, M2, non-finite)."""
    block = np.asarray(block)
    channels = [block] if c_axis is None else [np.take(block, k, axis=c_axis) for k in range(block.shape[c_axis])]
    return np.array([_moments(ch) for ch in channels], dtype=np.float64)


def _finish(rows: list[np.ndarray], where: str, note: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Combine per-block moment rows into (mean, std); check NaN/Inf and constant channels."""
    table = np.stack(rows)  # (blocks, C, 4)
    nonfinite = table[:, :, 3].sum(axis=0)
    if nonfinite.any():
        k = int(np.flatnonzero(nonfinite)[0])
        raise UnreadableDataError(
            f"{where} contains NaN or Inf values ({int(nonfinite.sum())} found{note}, "
            f"first in channel {k}); replace or mask them before training"
        )
    mean, std = [], []
    for k in range(table.shape[1]):
        acc = (0, 0.0, 0.0)
        for n, m, m2, _ in table[:, k]:
            acc = _combine(acc, (int(n), float(m), float(m2)))
        if acc[0] == 0:
            raise UnreadableDataError(f"{where} is empty: cannot compute normalisation statistics")
        mean.append(acc[1])
        std.append(math.sqrt(acc[2] / acc[0]))
    std_arr = np.array(std)
    if not (std_arr > 0).all():
        k = int(np.flatnonzero(std_arr <= 0)[0])
        raise UnreadableDataError(f"channel {k} of {where} is constant{note} (std 0): nothing to denoise, "
                       "or sample more of it (max_bytes)")
    return np.array(mean), std_arr


def stats_numpy(array: np.ndarray, channel_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std (ddof 0) of an in-memory array.

    Parameters
    ----------
    array : ndarray
        The image.
    channel_axis : int, optional
        Axis of the channels; None for a single channel.

    Returns
    -------
    mean, std : ndarray
        float64, shape ``(C,)``.
    """
    array = np.asarray(array)
    c_axis = None if channel_axis is None else channel_axis % array.ndim
    moved = array[None] if c_axis is None else np.moveaxis(array, c_axis, 0)
    flat = moved.reshape(moved.shape[0], -1)  # a view for contiguous data
    # Slabs bound the float64 temporaries; each row of the table is one slab, all channels.
    return _finish(
        [np.array([_moments(ch[i: i + _SLAB]) for ch in flat]) for i in range(0, max(flat.shape[1], 1), _SLAB)],
        "the image",
    )


def _region_sides(chunk: list[int], row_bytes: int, budget: int) -> list[int]:
    """Sides of a sampling region: the chunk shape, the longest side halved until it fits ``budget``."""
    sides = list(chunk)
    while row_bytes * math.prod(sides) > budget and max(sides) > 1:
        k = int(np.argmax(sides))
        sides[k] = (sides[k] + 1) // 2
    return sides


def _stratified_starts(
    size: int, side: int, bounds: np.ndarray, n: int, rng: np.random.Generator,
) -> np.ndarray:
    """``n`` region starts along one axis, one per stratum of ``size / n`` in random order.

    A point is drawn in each stratum and the region is the slot of a grid of
    step ``side``, laid from its chunk's start, that holds the point: every
    pixel is equally likely to be sampled (moving a region back inside its
    chunk instead would under-sample the first pixels of every chunk), and a
    region lies in one chunk unless that chunk is shorter than ``side``.
    """
    u = ((rng.permutation(n) + rng.random(n)) * size / n).astype(np.int64).clip(0, size - 1)
    k = np.searchsorted(bounds, u, side="right") - 1
    lo, hi = bounds[k], bounds[k + 1]
    starts = lo + (u - lo) // side * side
    starts = np.where(hi - lo >= side, np.minimum(starts, hi - side), starts)
    return np.minimum(starts, size - side)


def stats_dask(
    darr: Any,
    channel_axis: int | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_regions: int = DEFAULT_MAX_REGIONS,
    seed: int = 0,
    where: str = "the image",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (ddof 0), exact or from stratified small regions.

    When the whole array fits ``max_bytes`` every block is reduced (exact).
    Otherwise ``max_regions`` boxes (each spanning all channels, at most one
    chunk in size, inside one chunk where the chunk allows) are placed by
    Latin hypercube sampling: along every axis each region falls into its
    own stratum of ``1 / max_regions`` of the length.  Brightness trends in a
    volume (attenuation along z, bleaching along t) are then sampled evenly,
    where a few random whole blocks can all land at one end (a z gradient:
    0.34 sigma median error with 4 blocks of 32, < 0.05 sigma now).  The
    regions shrink so that together they hold at most ``max_bytes``; at most
    ``max_regions`` chunks per channel chunk are decoded, never every chunk.
    One ``dask.compute`` on the active scheduler reduces them.

    Parameters
    ----------
    darr : dask.array.Array
        The image.
    channel_axis : int, optional
        Axis of the channels; None for a single channel.
    max_bytes : int
        Budget of (uncompressed) bytes of the sampled regions.
    max_regions : int
        Number of regions (and bound on the chunks read per channel chunk).
    seed : int
        Seed of the region positions.
    where : str
        Name of the data, for messages.

    Returns
    -------
    mean, std : ndarray
        float64, shape ``(C,)``.
    """
    import dask

    c_axis = None if channel_axis is None else channel_axis % darr.ndim
    grid_axes = [i for i in range(darr.ndim) if i != c_axis]
    if darr.nbytes <= max_bytes:  # exact: every block
        nblocks = [len(darr.chunks[i]) for i in grid_axes]
        tasks = []
        for idx in np.ndindex(*nblocks):
            sel: list[Any] = [slice(None)] * darr.ndim
            for ax, i in zip(grid_axes, idx):
                sel[ax] = int(i)
            tasks.append(dask.delayed(_block_moments)(darr.blocks[tuple(sel)], c_axis))
        return _finish(list(dask.compute(*tasks)), where)
    n = max(1, int(max_regions))
    row_bytes = darr.dtype.itemsize * (1 if c_axis is None else darr.shape[c_axis])
    sides = _region_sides([max(darr.chunks[i]) for i in grid_axes], row_bytes, max(int(max_bytes) // n, row_bytes))
    rng = np.random.default_rng(seed)
    starts = [
        _stratified_starts(darr.shape[ax], side, np.cumsum((0, *darr.chunks[ax])), n, rng)
        for ax, side in zip(grid_axes, sides)
    ]
    tasks = []
    for r in range(n):
        sel = [slice(None)] * darr.ndim
        for ax, side, st in zip(grid_axes, sides, starts):
            sel[ax] = slice(int(st[r]), int(st[r]) + side)
        tasks.append(dask.delayed(_block_moments)(darr[tuple(sel)], c_axis))
    shape = "x".join(str(s) for s in sides)
    return _finish(list(dask.compute(*tasks)), where, f" in {n} sampled regions of {shape}")


def channel_stats(
    data: Any,
    dims: Sequence[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_regions: int = DEFAULT_MAX_REGIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of any image: DataArray, dask, zarr or numpy.

    In-memory data gives exact statistics; chunked data is sampled (see
    :func:`stats_dask`), exactly when ``max_bytes`` covers the whole array.

    Parameters
    ----------
    data : xarray.DataArray, dask array, zarr array or ndarray
        The image; the channel axis is the ``c`` dim.
    dims : sequence of str, optional
        Dim names, required unless ``data`` is a DataArray.  Without a ``c``
        dim there is one channel.
    max_bytes, max_regions, seed
        Sampling of chunked data, see :func:`stats_dask`.

    Returns
    -------
    mean, std : ndarray
        float64, shape ``(C,)``.

    Raises
    ------
    UnreadableDataError
        NaN or Inf values in the (sampled) data, or a constant channel.
    """
    import dask.array as da

    where = "the image"
    try:
        import xarray as xr

        if isinstance(data, xr.DataArray):
            dims = tuple(data.dims)
            src = data.attrs.get("source")
            where = src if isinstance(src, str) and src else where
            data = data.data
    except ImportError:  # pragma: no cover - xarray is a dependency
        pass
    if dims is None:
        raise AxesError("dims are required to find the channel axis, e.g. dims=('c', 'y', 'x')")
    dims = tuple(dims)
    if len(dims) != data.ndim:
        raise AxesError(f"dims {dims} do not match the {data.ndim}-d data")
    c_axis = dims.index("c") if "c" in dims else None
    if isinstance(data, np.ndarray):
        return stats_numpy(data, c_axis)
    if not hasattr(data, "dask"):  # zarr array (or any array-like): read through dask by chunk
        chunks = getattr(data, "chunks", "auto")
        where = f"{getattr(data, 'store', '')}/{getattr(data, 'path', '')}".strip("/") or where
        data = da.from_zarr(data) if hasattr(data, "store") else da.from_array(data, chunks=chunks)
    return stats_dask(data, c_axis, max_bytes=max_bytes, max_regions=max_regions, seed=seed, where=where)


def pooled_stats(weights: Sequence[float], means: Sequence[np.ndarray],
                 stds: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a mixture of parts (images), each given by its own mean and std.

    The variance is the weighted mean of the parts' variances plus the
    variance of their means (the law of total variance).

    Parameters
    ----------
    weights : sequence of float
        Share of each part (e.g. the regions sampled from it).
    means, stds : sequence of ndarray
        Each part's per-channel statistics, ``(C,)``.

    Returns
    -------
    mean, std : ndarray
        float64, shape ``(C,)``.

    Examples
    --------
    >>> m, s = pooled_stats([1, 1], [np.array([0.0]), np.array([2.0])], [np.array([1.0]), np.array([1.0])])
    >>> m.tolist(), s.round(4).tolist()
    ([1.0], [1.4142])
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    m, s = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    mean = w @ m
    return mean, np.sqrt(w @ (s**2 + (m - mean) ** 2))


def noise_std(patches: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation of the noise, estimated from noisy patches.

    Wavelet estimate (Donoho & Johnstone: median absolute finest-scale
    diagonal coefficient, :func:`skimage.restoration.estimate_sigma`) per
    patch and channel, combined as the root mean of the variances.  It
    assumes pixel-independent noise; it needs no clean data and no full pass:
    the training run's validation patches are enough.  On 3D patches of 32^3
    it reads about 5% low (the wavelet transform's symmetric extension damps
    the finest band near the borders), which errs towards keeping noise.

    Parameters
    ----------
    patches : numpy.ndarray
        ``(N, C, *spatial)`` noisy patches in input units.

    Returns
    -------
    numpy.ndarray
        Float32 noise standard deviation per channel, in input units, ``(C,)``.
    """
    from skimage.restoration import estimate_sigma

    x = np.asarray(patches, dtype=np.float32)
    with warnings.catch_warnings():  # a constant patch has no detail coefficients: NaN, i.e. no noise
        warnings.simplefilter("ignore", RuntimeWarning)
        var = [[estimate_sigma(x[n, c]) ** 2 for n in range(x.shape[0])] for c in range(x.shape[1])]
    return np.sqrt(np.mean(np.nan_to_num(var, nan=0.0), axis=1)).astype(np.float32)
