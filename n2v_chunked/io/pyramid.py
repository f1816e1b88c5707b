"""Filling OME-Zarr levels: storing a dask array block-aligned in bounded memory
(:func:`store_blocks`), and the downsampled levels of a pyramid (:func:`build_pyramid`)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np

from ..cluster.progress import Progress
from ..cluster.scheduling import default_client
from ..errors import N2VError
from .ngff import dataset_entry, open_group, read_multiscales, write_multiscales
from .stores import grow_chunks

WRITE_BLOCK_BYTES = 8 * 2**20  # one dask task writes about this much (whole chunks)
MAX_BLOCKS_PER_PASS = 4096  # bound the dask graph (and its memory) for huge arrays
MAX_THREADS = 16  # bound memory on many-core machines: threads x a few blocks
PYRAMID_MIN_SIDE = 256  # automatic pyramids stop once y and x fit in one viewer tile


def cast_block(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast to ``dtype``: integers are rounded and clipped to the type's range, NaN -> 0."""
    dtype = np.dtype(dtype)
    x = np.asarray(x)
    if x.dtype == dtype:
        return x
    if np.issubdtype(dtype, np.integer):
        if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
            info = np.iinfo(dtype)
            return np.clip(x, info.min, info.max).astype(dtype) if not np.can_cast(x.dtype, dtype) else x.astype(dtype)
        info = np.iinfo(dtype)
        y = np.rint(x)
        np.clip(y, info.min, info.max, out=y)
        return np.nan_to_num(y, nan=0.0, copy=False).astype(dtype)
    return x.astype(dtype)


def write_block_shape(
    shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int] | None, dtype: Any
) -> tuple[int, ...]:
    """Dask chunks for writing: whole shards, else whole chunks merged to ~8 MiB.

    Blocks are aligned to the stored chunks/shards, so no two tasks ever write
    the same stored object.  Chunks are merged innermost axis first.
    """
    if shards:
        return tuple(min(s, n) for s, n in zip(shards, shape))
    return grow_chunks(shape, chunks, np.dtype(dtype).itemsize, WRITE_BLOCK_BYTES)


def _write_block_shape(arr: Any) -> tuple[int, ...]:
    return write_block_shape(arr.shape, arr.chunks, arr.shards, arr.dtype)


class _ProgressTarget:
    """``da.store`` target that advances a progress bar per written block."""

    def __init__(self, arr: Any, bar: Any) -> None:
        self.arr, self.bar = arr, bar
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.arr[key] = value
        self.bar.update(1)


def store_blocks(data: da.Array, arr: Any, progress: bool = True, desc: str = "writing") -> None:
    """Write a dask array into a Zarr array, block-aligned, in bounded memory.

    ``data`` is cast to the array's dtype and rechunked so that every task
    writes whole chunks (whole shards when sharded), so no two tasks touch the
    same stored object.  Large arrays are written in passes of at most
    :data:`MAX_BLOCKS_PER_PASS` blocks so the task graph stays small.

    Parameters
    ----------
    data : dask.array.Array
        Same shape as ``arr``.
    arr : zarr.Array
        Destination.
    progress : bool
        Show progress (a bar on a terminal, lines in a log; dask's distributed
        dashboard shows progress when a distributed client is active).
    desc : str
        Bar label.
    """
    if tuple(data.shape) != tuple(arr.shape):
        raise N2VError(f"data shape {tuple(data.shape)} does not match output shape {tuple(arr.shape)}")
    block = _write_block_shape(arr)
    narrowing = data.dtype != arr.dtype and arr.dtype.itemsize <= data.dtype.itemsize
    if narrowing:  # cast before merging pieces: fewer bytes held while they gather
        data = data.map_blocks(cast_block, arr.dtype, dtype=arr.dtype)
    data = data.rechunk(block)  # a no-op when already aligned
    if data.dtype != arr.dtype:
        data = data.map_blocks(cast_block, arr.dtype, dtype=arr.dtype)
    nblocks = math.prod(data.numblocks)
    client = default_client()
    bar = Progress(nblocks, desc, "block", enabled=progress and client is None)  # lines in a batch log too
    target = arr if client is not None else _ProgressTarget(arr, bar)
    # Pass along the outermost axis that has several blocks.
    ax = next((i for i, n in enumerate(data.numblocks) if n > 1), 0)
    per = max(1, nblocks // data.numblocks[ax])
    step = max(1, MAX_BLOCKS_PER_PASS // per)
    bounds = np.cumsum((0,) + data.chunks[ax])
    threads = dask.config.get("num_workers", None) or min(os.cpu_count() or 1, MAX_THREADS)
    try:
        with dask.config.set(num_workers=threads) if client is None else contextlib.nullcontext():
            for b0 in range(0, data.numblocks[ax], step):
                b1 = min(data.numblocks[ax], b0 + step)
                region = tuple(
                    slice(int(bounds[b0]), int(bounds[b1])) if i == ax else slice(None) for i in range(data.ndim)
                )
                da.store(data[region], target, regions=region, lock=False, compute=True)
    except OSError as exc:
        raise N2VError(f"cannot write {arr.store_path}: {exc.strerror or exc}") from None
    finally:
        bar.close()


# ----------------------------------------------------------------------------
# Pyramids.
# ----------------------------------------------------------------------------


def _pyramid_factors(
    shape: Sequence[int], dims: Sequence[str], scale: Sequence[float], levels: int | None
) -> list[dict[int, int]]:
    """Downsampling factors per new level.

    y and x are halved at every level.  z is halved too when the current z
    pixel size is at most twice the y pixel size (near-isotropic) and z has at
    least 2 planes, so anisotropic stacks keep their z until xy catches up.
    Without ``levels``, levels are added while y or x exceeds
    :data:`PYRAMID_MIN_SIDE`.  No level gets a y or x side below 1.
    """
    shape, scale = list(shape), list(scale)
    iy, ix = dims.index("y"), dims.index("x")
    iz = dims.index("z") if "z" in dims else None
    out: list[dict[int, int]] = []
    while True:
        if levels is not None and len(out) + 1 >= levels:
            break
        if levels is None and max(shape[iy], shape[ix]) <= PYRAMID_MIN_SIDE:
            break
        if min(shape[iy], shape[ix]) < 2:
            break
        f = {iy: 2, ix: 2}
        if iz is not None and shape[iz] >= 2 and scale[iz] <= 2 * scale[iy]:
            f[iz] = 2
        for i in f:
            shape[i] //= 2
            scale[i] *= 2
        out.append(f)
    return out


def build_pyramid(
    path: str | os.PathLike[str],
    levels: int | None = None,
    *,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[tuple[int, ...]]:
    """Add downsampled levels ``"1"``, ``"2"``, ... to an OME-Zarr output.

    Each level is the 2x block mean (``dask.array.coarsen`` with
    ``trim_excess``, so an odd last row/plane is dropped) of the previous
    level, read back from the store, so memory stays bounded.  y and x are
    halved at every level; z is halved too only when the level's z pixel size
    is at most twice its y pixel size (and z has 2 or more planes), so an
    anisotropic stack keeps its planes until xy has caught up.  t and c are
    never downsampled.  ``multiscales`` datasets are rewritten: the scale
    doubles along downsampled axes and the translation moves by half an old
    pixel (the centre of the averaged block).  Existing levels above 0 are
    replaced, including those a killed run wrote but did not list yet, so a
    rerun after a kill at any point succeeds.  Without ``levels``, levels are added while y or x exceeds
    :data:`PYRAMID_MIN_SIDE` (256).

    Parameters
    ----------
    path : str or Path
        An OME-Zarr written by :func:`create_ome_zarr` (level 0 filled).
    levels : int, optional
        Total number of levels including level 0; automatic if None.
    progress : bool
        Show a progress bar per level.
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    list of tuple of int
        Shape of every level, level 0 first.
    """
    group = open_group(str(path), "r+", storage_options)
    ms, version = read_multiscales(group)
    dims = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    ds0 = ms["datasets"][0]
    level0 = group[ds0["path"]]
    scale = next((t["scale"] for t in ds0["coordinateTransformations"] if t["type"] == "scale"), [1.0] * len(dims))
    trans = next(
        (t["translation"] for t in ds0["coordinateTransformations"] if t["type"] == "translation"), [0.0] * len(dims)
    )
    # Every level above 0, listed or not: a run killed while the pyramid was written leaves levels
    # that the metadata (rewritten only at the end) does not name yet.
    with warnings.catch_warnings():  # the resume markers' folder is not a Zarr node
        warnings.simplefilter("ignore")
        names = {k for k in group.keys() if k.isdigit() and k != ds0["path"]}
    stale = {d["path"] for d in ms["datasets"][1:]} | names
    for name in sorted(stale):
        if name in group:
            del group[name]
    datasets = [ds0]
    shapes = [tuple(level0.shape)]
    prev = level0
    scale, trans = [float(s) for s in scale], [float(t) for t in trans]
    for k, factors in enumerate(_pyramid_factors(level0.shape, dims, scale, levels), start=1):
        trans = [t + (factors.get(i, 1) - 1) / 2 * s for i, (t, s) in enumerate(zip(trans, scale))]
        scale = [s * factors.get(i, 1) for i, s in enumerate(scale)]
        src = da.from_zarr(prev, chunks=_write_block_shape(prev))
        work = np.float64 if prev.dtype == np.float64 else np.float32
        # mean(dtype=...) accumulates without a float copy of the whole block
        small = da.coarsen(np.mean, src, dict(factors), trim_excess=True, dtype=work)
        shape = tuple(small.shape)
        chunks = tuple(min(c, s) for c, s in zip(level0.chunks, shape))
        extra: dict[str, Any] = {}
        if version != "0.4":
            extra["dimension_names"] = list(dims)
            if level0.shards:
                # clip shards to the level, keeping them multiples of the chunks
                extra["shards"] = tuple(
                    min(sh, math.ceil(s / c) * c) for sh, s, c in zip(level0.shards, shape, chunks)
                )
        else:
            extra["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        arr = group.create_array(
            str(k), shape=shape, dtype=level0.dtype, chunks=chunks, compressors=level0.compressors,
            fill_value=0, overwrite=True, **extra,  # clears chunks a killed run left without metadata
        )
        store_blocks(small, arr, progress=progress, desc=f"pyramid level {k}")
        datasets.append(dataset_entry(str(k), scale, trans))
        shapes.append(shape)
        prev = arr
    ms = dict(ms, datasets=datasets)
    write_multiscales(group, ms, version)
    return shapes
