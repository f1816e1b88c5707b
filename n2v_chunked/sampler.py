"""Chunk-aware streaming patch sampler.

Reading a random 64x64 patch straight from a compressed Zarr array decodes one
to four whole chunks for 16 KiB of pixels.  This sampler instead keeps a
bounded buffer of decoded *blocks* (chunk-aligned groups of chunks, each at
least twice the patch), draws many patches from each block, and replaces a
block as soon as its patch quota is spent.  Every decoded byte serves many
patches while the stream stays mixed: each patch comes from a random one of
the buffered blocks.  Blocks are decoded by a background thread pool so that
reading overlaps the consumer's compute.

Layout of this module:

1. block grid: splitting the array into blocks (:func:`make_block_grid`),
   holding out validation blocks (:func:`split_validation`), giving each
   stream its blocks (:func:`assign_blocks`);
2. patch positions: the boxes of allowed patch origins and drawing from them
   (:func:`origin_boxes`, :func:`draw_origins`);
3. data sources: zarr, dask and numpy behind one ``read(region)`` call;
4. :class:`PatchStream` (one worker's buffer and iterator),
   :class:`ZarrPatchDataset` (the ``IterableDataset``) and :func:`batches`.

Coordinates: every dim except ``c`` is a *grid dim*.  Spatial grid dims have
the patch extent; all others (``t``, ``z`` for a 2D model, extra axes) have
extent 1, so sample axes need no special case.  A block *owns* the patch
origins inside it.  With ``straddle`` (the default) a block's window also
holds ``patch - 1`` voxels of the following blocks, so patches cross block
borders and every voxel is equally likely to be sampled; training patches
never reach into held-out validation blocks or bad chunks, because those
regions are cut out of the allowed origins.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import N2VError

Box = tuple[tuple[int, int], ...]  # per grid dim: [lo, hi)

DEFAULT_BUFFER_BYTES = 256 * 2**20
# Block size and reuse set the decode cost per patch.  A block's window also
# decodes the neighbouring chunks its straddling patches reach, which is 2.25x
# the block's own chunks for 512^2 blocks of 256^2 chunks and 1.56x for 1024^2.
# Measured (benchmarks/sampler.py, 2 cores, 64x64 patches, 256^2 Blosc chunks):
# 1 MiB / reuse 8: 0.28x in-memory crops; 4 MiB / reuse 16: 0.62x, with the
# 256 MiB buffer still holding about 50 blocks to mix from.
DEFAULT_MIN_BLOCK_BYTES = 4 * 2**20
DEFAULT_REUSE = 16.0
MIN_BLOCKS = 10  # below this, chunks are split so that validation can be held out

# Tags that keep the random streams of different purposes independent.
_TAG_VAL, _TAG_PERM, _TAG_BLOCK, _TAG_SLOT, _TAG_VALDRAW = 1, 2, 3, 4, 5


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


# ----------------------------------------------------------------------------
# 1. Block grid
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Blocks of an array along its grid dims (all dims except ``c``).

    Attributes
    ----------
    dims : tuple of str
        Grid dims in array order.
    shape : tuple of int
        Array extent along each grid dim.
    patch : tuple of int
        Patch extent along each grid dim (1 on sample dims).
    edges : tuple of tuple of int
        Block boundaries per grid dim, from 0 to the extent.
    chunk_edges : tuple of tuple of int
        Storage chunk boundaries per grid dim.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    edges: tuple[tuple[int, ...], ...]
    chunk_edges: tuple[tuple[int, ...], ...]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks along each grid dim."""
        return tuple(len(e) - 1 for e in self.edges)

    @property
    def n_blocks(self) -> int:
        """Total number of blocks."""
        return math.prod(self.grid_shape)

    def bounds(self, block: int) -> Box:
        """Extent ``((lo, hi), ...)`` of flat block ``block``."""
        idx = np.unravel_index(block, self.grid_shape)
        return tuple((int(e[i]), int(e[i + 1])) for e, i in zip(self.edges, idx))

    def window(self, block: int, straddle: bool) -> Box:
        """Region read for a block: the block plus ``patch - 1`` voxels after it."""
        if not straddle:
            return self.bounds(block)
        return tuple((lo, min(hi + p - 1, n)) for (lo, hi), p, n in zip(self.bounds(block), self.patch, self.shape))

    def origin_box(self, block: int, straddle: bool) -> Box:
        """Patch origins owned by a block (before cutting out forbidden regions)."""
        b = self.bounds(block)
        if straddle:
            return tuple((lo, min(hi, n - p + 1)) for (lo, hi), p, n in zip(b, self.patch, self.shape))
        return tuple((lo, hi - p + 1) for (lo, hi), p in zip(b, self.patch))

    def blocks_overlapping(self, region: Box) -> list[int]:
        """Flat ids of the blocks that intersect ``region``."""
        ranges = []
        for (lo, hi), e in zip(region, self.edges):
            first = int(np.searchsorted(e, lo, side="right")) - 1
            last = int(np.searchsorted(e, hi, side="left"))
            ranges.append(range(max(first, 0), min(last, len(e) - 1)))
        return [int(np.ravel_multi_index(i, self.grid_shape)) for i in itertools.product(*ranges)]

    def max_window_voxels(self, straddle: bool) -> int:
        """Upper bound on the voxels of any block window (per channel)."""
        ext = [max(np.diff(e)) + (p - 1 if straddle else 0) for e, p in zip(self.edges, self.patch)]
        return math.prod(min(x, n) for x, n in zip(ext, self.shape))


def _group_edges(chunk_edges: Sequence[int], target: int, min_extent: int) -> tuple[int, ...]:
    """Group consecutive chunks into blocks of at least ``target`` voxels."""
    edges = [0]
    for e in chunk_edges[1:]:
        if e - edges[-1] >= target:
            edges.append(int(e))
    if edges[-1] != chunk_edges[-1]:
        edges.append(int(chunk_edges[-1]))
    # A short tail cannot hold a patch: merge it into its neighbour.
    if len(edges) > 2 and edges[-1] - edges[-2] < min_extent:
        del edges[-2]
    return tuple(edges)


def _split_edges(edges: Sequence[int], parts: int, min_extent: int) -> tuple[int, ...]:
    """Split each block into up to ``parts`` equal parts of at least ``min_extent`` voxels."""
    out = [0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = max(1, min(parts, (hi - lo) // min_extent))
        out.extend(int(lo + (hi - lo) * j // k) for j in range(1, k + 1))
    return tuple(out)


def make_block_grid(
    shape: Sequence[int],
    chunks: Sequence[Sequence[int]],
    dims: Sequence[str],
    patch: Sequence[int],
    *,
    voxel_bytes: int = 4,
    block_chunks: Sequence[int] | None = None,
    min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
    spatial: Sequence[bool] | None = None,
) -> BlockGrid:
    """Group storage chunks into blocks.

    Along spatial dims a block spans whole chunks and at least twice the patch
    (or ``block_chunks`` chunks), grown round-robin until it holds
    ``min_block_bytes``; along sample dims a block is one chunk.  A last block
    shorter than the patch is merged into its neighbour, so every block can
    hold a patch.  Arrays with fewer than ``MIN_BLOCKS`` chunk-aligned blocks
    are split inside chunks (small images are cheap to re-decode).

    Parameters
    ----------
    shape : sequence of int
        Extent along each grid dim.
    chunks : sequence of sequence of int
        Chunk sizes along each grid dim (dask style).
    dims : sequence of str
        Grid dim names (for messages).
    patch : sequence of int
        Patch extent per grid dim (1 on sample dims).
    voxel_bytes : int
        Bytes per grid voxel (item size times channels).
    block_chunks : sequence of int, optional
        Chunks per block along each grid dim, instead of the automatic choice.
    min_block_bytes : int
        Smallest block worth a read.
    spatial : sequence of bool, optional
        Which grid dims are spatial (default: those with patch extent > 1).

    Returns
    -------
    BlockGrid
    """
    shape = tuple(int(n) for n in shape)
    patch = tuple(int(p) for p in patch)
    spatial = tuple(spatial) if spatial is not None else tuple(p > 1 for p in patch)
    for d, n, p in zip(dims, shape, patch):
        if n < p:
            raise N2VError(f"volume is smaller than the patch along axis '{d}': size {n} < patch {p}")
    cedges = tuple(tuple(int(x) for x in np.concatenate([[0], np.cumsum(c)])) for c in chunks)
    csize = [max(c) for c in chunks]
    if block_chunks is not None:
        if len(block_chunks) != len(shape) or any(int(g) < 1 for g in block_chunks):
            raise N2VError(f"block_chunks must give a positive number of chunks for each of {tuple(dims)}")
        groups = [int(g) for g in block_chunks]
    else:
        groups = [max(1, math.ceil(2 * p / c)) if s else 1 for p, c, s in zip(patch, csize, spatial)]
        # Grow spatial dims round-robin (smallest extent first) until a block is worth a read.
        while voxel_bytes * math.prod(min(g * c, n) for g, c, n in zip(groups, csize, shape)) < min_block_bytes:
            growable = [i for i in range(len(shape)) if spatial[i] and groups[i] * csize[i] < shape[i]]
            if not growable:
                break
            i = min(growable, key=lambda i: (groups[i] * csize[i], -i))
            groups[i] += 1
    edges = tuple(
        _group_edges(e, min(g * c, n), p) for e, g, c, n, p in zip(cedges, groups, csize, shape, patch)
    )
    # Too few blocks to hold out validation: split blocks inside chunks, as
    # little as needed (each part re-decodes its chunks).
    parts, grouped = 1, edges
    while block_chunks is None and math.prod(len(e) - 1 for e in edges) < MIN_BLOCKS:
        parts += 1
        split = tuple(_split_edges(e, parts, 2 * p) if s else e for e, p, s in zip(grouped, patch, spatial))
        if split == edges:
            break
        edges = split
    return BlockGrid(tuple(dims), shape, patch, edges, cedges)


def split_validation(n_blocks: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a deterministic random fraction of blocks for validation.

    Parameters
    ----------
    n_blocks : int
        Number of blocks.
    fraction : float
        Fraction held out (at least one block when > 0).
    seed : int
        Seed of the split.

    Returns
    -------
    train, val : ndarray of int
        Sorted flat block ids.
    """
    if not 0.0 <= fraction < 1.0:
        raise N2VError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n_blocks)))
    if n_blocks - n_val < 1:
        raise N2VError(
            f"cannot hold out validation data: the array has only {n_blocks} block(s); "
            "use val_fraction=0, smaller chunks or smaller block_chunks"
        )
    perm = _rng(seed, _TAG_VAL).permutation(n_blocks)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def assign_blocks(train: np.ndarray, epoch: int, stream: int, n_streams: int, seed: int) -> np.ndarray:
    """Blocks that stream ``stream`` of ``n_streams`` loads in pass ``epoch``.

    Every pass is a fresh permutation of the training blocks dealt out
    round-robin, so streams never share a block (unless there are fewer
    blocks than streams, when each stream gets one block).
    """
    perm = train[_rng(seed, _TAG_PERM, epoch).permutation(len(train))]
    if len(perm) >= n_streams:
        return perm[stream::n_streams]
    return perm[[stream % len(perm)]]


# ----------------------------------------------------------------------------
# 2. Patch positions
# ----------------------------------------------------------------------------


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def _subtract(box: Box, cut: Box) -> list[Box]:
    """``box`` minus ``cut`` as disjoint boxes."""
    if _intersect(box, cut) is None:
        return [box]
    out, cur = [], list(box)
    for d, ((lo, hi), (clo, chi)) in enumerate(zip(box, cut)):
        if lo < clo:
            out.append(tuple(cur[:d] + [(lo, clo)] + cur[d + 1:]))
        if chi < hi:
            out.append(tuple(cur[:d] + [(chi, hi)] + cur[d + 1:]))
        cur[d] = (max(lo, clo), min(hi, chi))
    return out


def origin_boxes(own: Box, forbidden: Iterable[Box], patch: Sequence[int]) -> list[Box]:
    """Origins in ``own`` whose patch footprint avoids every forbidden region.

    A patch at origin ``o`` covers ``[o, o + p)``; it touches region
    ``[a, b)`` iff ``a - p < o < b``, so each region removes the box
    ``[a - p + 1, b)`` of origins.
    """
    boxes = [own] if all(lo < hi for lo, hi in own) else []
    for region in forbidden:
        cut = tuple((a - p + 1, b) for (a, b), p in zip(region, patch))
        boxes = [piece for box in boxes for piece in _subtract(box, cut)]
    return boxes


def draw_origins(rng: np.random.Generator, boxes: Sequence[Box], n: int) -> np.ndarray:
    """``n`` origins drawn uniformly from the union of disjoint ``boxes``, shape ``(n, ndim)``."""
    lo = np.array([[b[0] for b in box] for box in boxes], dtype=np.int64)
    hi = np.array([[b[1] for b in box] for box in boxes], dtype=np.int64)
    vol = np.prod(hi - lo, axis=1).astype(np.float64)
    k = rng.choice(len(boxes), size=n, p=vol / vol.sum()) if len(boxes) > 1 else np.zeros(n, dtype=np.int64)
    return rng.integers(lo[k], hi[k])


# ----------------------------------------------------------------------------
# 3. Data sources: one read(region) call over zarr, dask and numpy
# ----------------------------------------------------------------------------


class _Source:
    """A readable array: ``shape``, ``dtype``, ``chunks`` (dask style), ``name``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[tuple[int, ...], ...]
    name: str

    def read(self, region: tuple[slice, ...]) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class _ZarrSource(_Source):
    """A zarr array, read directly (no dask graph per read).

    Holds the array (which pickles as store + path) or a URL that is opened
    lazily in the process that reads, so the dataset is cheap to send to
    spawned workers.
    """

    def __init__(self, array: Any = None, url: str | None = None) -> None:
        self._url = url
        self._array = array
        z = self.array
        self.shape = tuple(z.shape)
        self.dtype = np.dtype(z.dtype)
        self.chunks = tuple(
            tuple(min(c, n - i) for i in range(0, n, c)) if n else (0,) for n, c in zip(z.shape, z.chunks)
        )
        self.name = url or f"{z.store}/{z.path}".rstrip("/")

    @property
    def array(self) -> Any:
        if self._array is None:
            import zarr

            try:
                self._array = zarr.open_array(self._url, mode="r")
            except Exception as exc:  # any store error: a user-facing path problem
                raise N2VError(f"cannot open zarr array {self._url}: {exc}") from None
        return self._array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._url is not None:
            state["_array"] = None  # reopen in the worker
        return state

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.array[region])


class _DaskSource(_Source):
    """A dask array that is not a plain view of a zarr array."""

    def __init__(self, darr: Any, name: str | None = None) -> None:
        self._darr = darr
        self.shape = tuple(int(n) for n in darr.shape)
        self.dtype = np.dtype(darr.dtype)
        self.chunks = tuple(tuple(int(c) for c in cs) for cs in darr.chunks)
        self.name = name or f"dask array {darr.name}"

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        # Synchronous: we are already in a reader thread (or a loader worker).
        return np.asarray(self._darr[region].compute(scheduler="synchronous"))


class _NumpySource(_Source):
    """An in-memory array with a notional chunk grid."""

    def __init__(self, arr: np.ndarray, chunks: tuple[tuple[int, ...], ...], name: str = "numpy array") -> None:
        self._arr = arr
        self.shape, self.dtype, self.chunks, self.name = arr.shape, arr.dtype, chunks, name

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return np.array(self._arr[region])


def _zarr_behind(darr: Any) -> Any:
    """The zarr array a dask array reads, if it is an unmodified ``da.from_zarr``
    (or ``da.from_array`` of a reader object holding the zarr array as ``.array``)."""
    layer = darr.dask.layers.get("original-" + darr.name) if hasattr(darr.dask, "layers") else None
    if layer is None:
        return None
    try:
        obj = layer["original-" + darr.name]
    except KeyError:
        return None
    if not _is_zarr(obj) and _is_zarr(getattr(obj, "array", None)):
        obj = obj.array
    return obj if _is_zarr(obj) and tuple(obj.shape) == tuple(darr.shape) else None


def _is_zarr(obj: Any) -> bool:
    return type(obj).__module__.startswith("zarr") and hasattr(obj, "chunks") and hasattr(obj, "store")


def _open_source(data: Any, dims: Sequence[str] | None, chunks: Any) -> tuple[_Source, tuple[str, ...]]:
    """Wrap any supported input as a :class:`_Source` plus its dims."""
    if isinstance(data, str):
        src: _Source = _ZarrSource(url=data)
    else:
        try:
            import xarray as xr

            if isinstance(data, xr.DataArray):
                if dims is not None and tuple(dims) != tuple(data.dims):
                    raise N2VError(f"dims {tuple(dims)} disagree with the DataArray's {tuple(data.dims)}")
                dims = tuple(str(d) for d in data.dims)
                label = data.attrs.get("source") if isinstance(data.attrs.get("source"), str) else None
                data = data.data
                if isinstance(data, np.ndarray):
                    data = _NumpySource(data, _numpy_chunks(data, dims, chunks), label or "numpy array")
                elif label and hasattr(data, "dask") and _zarr_behind(data) is None:
                    data = _DaskSource(data, label)
        except ImportError:  # pragma: no cover - xarray is a dependency
            pass
        if isinstance(data, _Source):
            src = data
        elif _is_zarr(data):
            src = _ZarrSource(array=data)
        elif hasattr(data, "dask") and hasattr(data, "chunks"):
            z = _zarr_behind(data)
            src = _ZarrSource(array=z) if z is not None else _DaskSource(data)
        elif isinstance(data, np.ndarray):
            if dims is None:
                raise N2VError("dims are required for a numpy array, e.g. dims=('y', 'x')")
            src = _NumpySource(data, _numpy_chunks(data, dims, chunks))
        else:
            raise N2VError(f"cannot sample patches from a {type(data).__name__}; "
                           "give an xarray.DataArray, zarr array, dask array, numpy array or zarr path")
    if dims is None:
        raise N2VError(f"dims are required for {src.name}, e.g. dims=('z', 'y', 'x')")
    dims = tuple(dims)
    if len(dims) != len(src.shape) or len(set(dims)) != len(dims):
        raise N2VError(f"dims {dims} do not match the {len(src.shape)}-d array {src.name} of shape {src.shape}")
    return src, dims


def _numpy_chunks(arr: np.ndarray, dims: Sequence[str], chunks: Any) -> tuple[tuple[int, ...], ...]:
    if chunks is None:  # notional: 256 along y/x/z, 1 along sample axes, whole channel axis
        chunks = [n if d == "c" else (min(n, 256) if d in ("z", "y", "x") else 1) for d, n in zip(dims, arr.shape)]
    import dask.array as da

    return tuple(tuple(int(c) for c in cs) for cs in da.core.normalize_chunks(chunks, arr.shape))


def _open_mask(mask: Any, shape: tuple[int, ...], dims: tuple[str, ...]) -> _Source:
    """Wrap a foreground mask over the grid dims (same or coarser shape)."""
    try:
        import xarray as xr

        if isinstance(mask, xr.DataArray):
            mask = mask.data
    except ImportError:  # pragma: no cover
        pass
    if isinstance(mask, str):
        src: _Source = _ZarrSource(url=mask)
    elif _is_zarr(mask):
        src = _ZarrSource(array=mask)
    elif hasattr(mask, "dask"):
        z = _zarr_behind(mask)
        src = _ZarrSource(array=z) if z is not None else _DaskSource(mask)
    else:
        arr = np.asarray(mask)
        src = _NumpySource(arr, tuple((n,) for n in arr.shape), "mask")
    if len(src.shape) != len(shape) or any(m > n or m < 1 for m, n in zip(src.shape, shape)):
        raise N2VError(f"mask shape {src.shape} must match the data's {dict(zip(dims, shape))} "
                       "(or be a coarser grid of the same dims)")
    return src


def _read_mask(mask: _Source, window: Box, shape: tuple[int, ...]) -> np.ndarray:
    """Mask over ``window`` at data resolution (nearest neighbour from a coarser grid)."""
    idx = [np.arange(lo, hi) * m // n for (lo, hi), m, n in zip(window, mask.shape, shape)]
    sub = mask.read(tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx))
    return np.asarray(sub[np.ix_(*[i - i[0] for i in idx])], dtype=bool)


# ----------------------------------------------------------------------------
# Reading a window, with bad-chunk diagnosis
# ----------------------------------------------------------------------------


def _chunk_ranges(src: _Source, region: tuple[slice, ...]) -> list[range]:
    out = []
    for s, cs in zip(region, src.chunks):
        e = np.concatenate([[0], np.cumsum(cs)])
        out.append(range(int(np.searchsorted(e, s.start, side="right")) - 1,
                         int(np.searchsorted(e, s.stop, side="left"))))
    return out


def _chunk_slices(src: _Source, idx: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(int(sum(cs[:i])), int(sum(cs[: i + 1]))) for cs, i in zip(src.chunks, idx))


def _overlap(region: tuple[slice, ...], chunk: tuple[slice, ...]) -> tuple[slice, ...]:
    """The part of ``chunk`` inside ``region``, in region-local coordinates."""
    return tuple(slice(max(r.start, k.start) - r.start, min(r.stop, k.stop) - r.start) for r, k in zip(region, chunk))


def _region_text(region: tuple[slice, ...]) -> str:
    return ", ".join(f"{s.start}:{s.stop}" for s in region)


def read_window(
    src: _Source, region: tuple[slice, ...], known_bad: frozenset = frozenset()
) -> tuple[np.ndarray, dict[tuple[int, ...], str]]:
    """Read ``region``; find and zero out corrupt or non-finite chunks.

    The fast path is one read.  Only when it fails, or when the region holds
    chunks already known to be bad, is the region read chunk by chunk, to name
    the culprits.

    Parameters
    ----------
    src : _Source
        The array.
    region : tuple of slice
        Region over all array dims.
    known_bad : frozenset
        Chunk indices already found bad (not read again).

    Returns
    -------
    data : ndarray
        The region (bad chunks filled with 0).
    bad : dict
        Chunk index (over all array dims) -> reason, for each new bad chunk.
    """
    ranges = _chunk_ranges(src, region)
    chunks = {c: _chunk_slices(src, c) for c in itertools.product(*ranges)}
    bad: dict[tuple[int, ...], str] = {}
    skip = known_bad.intersection(chunks)
    data, first_error = None, None
    if not skip:
        from .stores import RetriesExhausted, with_retries

        try:
            data = with_retries(lambda: src.read(region), f"reading block [{_region_text(region)}]")
        except RetriesExhausted:
            raise  # a store that keeps failing stops training; its chunks are not corrupt
        except Exception as exc:  # noqa: BLE001 - diagnosed chunk by chunk below
            first_error = exc
    if data is None:
        data = np.zeros(tuple(s.stop - s.start for s in region), dtype=src.dtype)
        for c, ext in chunks.items():
            if c in skip:
                continue
            local = _overlap(region, ext)
            sub = tuple(slice(r.start + loc.start, r.start + loc.stop) for r, loc in zip(region, local))
            try:
                data[local] = src.read(sub)
            except Exception as exc:  # noqa: BLE001 - any decode/store error marks the chunk bad
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                bad[c] = f"cannot be read ({type(exc).__name__}: {first_line})"
        if first_error is not None and not bad:
            raise first_error  # every chunk reads on its own: not a data problem
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        for c, ext in chunks.items():
            if c not in skip and c not in bad and not np.isfinite(data[_overlap(region, ext)]).all():
                bad[c] = "contains NaN or Inf values"
    for c in skip | set(bad):
        data[_overlap(region, chunks[c])] = 0
    return data, bad


class _BadChunks:
    """Bad chunks met by one stream: warn once each, stop past the limit."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.reasons: dict[tuple[int, ...], str] = {}

    def add(self, found: dict[tuple[int, ...], str]) -> None:
        for chunk, why in found.items():
            if chunk in self.reasons:
                continue
            self.reasons[chunk] = why
            n = len(self.reasons)
            if n > self.limit:
                raise N2VError(
                    f"too many bad chunks in {self.name}: {n} > max_bad_chunks={self.limit}; "
                    f"last: chunk {chunk} {why}"
                )
            warnings.warn(f"skipping chunk {chunk} of {self.name}: {why} ({n}/{self.limit} bad chunks allowed)",
                          RuntimeWarning, stacklevel=3)

    def snapshot(self) -> frozenset:
        return frozenset(self.reasons)

    def summary(self) -> str:
        """``" (N bad chunk(s), e.g. chunk ... <reason>)"``, or nothing when none was found."""
        if not self.reasons:
            return ""
        chunk, why = next(iter(self.reasons.items()))
        return f" ({len(self.reasons)} bad chunk(s), e.g. chunk {chunk} {why})"


# ----------------------------------------------------------------------------
# 4. Buffer entries, the per-worker stream, the dataset
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    """One decoded block in the buffer."""

    block: int
    view: np.ndarray  # sliding-window view: view[(0, *origin)] -> (C, *patch_all)
    mask_view: np.ndarray | None  # view[origin] -> patch footprint of the mask
    boxes: list[Box]  # allowed origins, window-local
    rng: np.random.Generator
    quota: int  # patches still to serve
    nbytes: int
    origins: np.ndarray = dataclasses.field(default_factory=lambda: np.empty((0, 0), np.int64))
    pos: int = 0
    misses: int = 0  # consecutive rejected draws

    def next_origin(self) -> tuple[int, ...]:
        return (0, *self.take_origins(1)[0].tolist())

    def take_origins(self, k: int) -> np.ndarray:
        """The next ``k`` origins of this block's sequence, shape ``(k, ndim)``."""
        parts = [np.empty((0, len(self.boxes[0])), np.int64)]
        while k > 0:
            if self.pos == len(self.origins):
                self.origins = draw_origins(self.rng, self.boxes, min(max(self.quota, 16), 1024))
                self.pos = 0
            got = self.origins[self.pos : self.pos + k]
            self.pos += len(got)
            k -= len(got)
            parts.append(got)
        return np.concatenate(parts)


@dataclasses.dataclass
class _Loaded:
    entry: _Entry | None
    bad: dict
    background: bool = False
    block: int = -1  # the block read (set when it was skipped)


def _accept(ds: ZarrPatchDataset, entry: _Entry, origin: tuple[int, ...], patch: np.ndarray) -> bool:
    """Foreground filter: the patch's std and the mask fraction over its footprint."""
    if ds.min_std is not None and float(patch.std()) < ds.min_std:
        return False
    if entry.mask_view is not None and float(entry.mask_view[origin[1:]].mean()) < ds.min_foreground:
        return False
    return True


class PatchStream:
    """One stream's bounded buffer of blocks and the patches drawn from it.

    Made by :meth:`ZarrPatchDataset.stream`; iterate it for single patches
    (``torch.float32`` tensors of shape ``(C, *patch)``) or call
    :meth:`next_batch`.  Close it (or use it as a context manager) to stop
    its reader threads.

    Attributes
    ----------
    stats : dict
        ``patches`` served, ``blocks_loaded``, ``blocks_skipped``,
        ``rejected`` patches, ``buffer_bytes`` now and ``peak_buffer_bytes``
        (decoded windows held plus reads in flight).
    """

    def __init__(self, ds: ZarrPatchDataset, stream: int, n_streams: int) -> None:
        self._ds = ds
        self._src = ds._source
        self._bad = _BadChunks(self._src.name, ds.max_bad_chunks)
        self.stream, self.n_streams = stream, n_streams
        self.stats = dict(patches=0, blocks_loaded=0, blocks_skipped=0, rejected=0, buffer_bytes=0,
                          peak_buffer_bytes=0)
        self._schedule = ds._schedule(stream, n_streams)
        blocks_per_pass = len(assign_blocks(ds.train_blocks, 0, stream, n_streams, ds.seed))
        total = ds._slots_total
        prefetch = min(ds.io_threads, total - 1) if ds.io_threads > 0 else 0
        self._resident = max(1, min(total - prefetch, blocks_per_pass))
        self._lookahead = prefetch
        self._pool = ThreadPoolExecutor(ds.io_threads, thread_name_prefix="n2v-block") if prefetch else None
        self._pending: collections.deque[tuple[int, Future | _Later]] = collections.deque()
        # Re-seeded from the start position: a resumed stream skips without replaying.
        self._rng = _rng(ds.seed, _TAG_SLOT, stream, n_streams, *ds._start_position(stream, n_streams))
        self._uniform: list[float] = []
        self._fails = 0  # consecutive rejected draws across the stream
        self._unusable: set[int] = set()  # training blocks skipped (for good)
        self._held = 0  # decoded entries held (in slots or being placed)
        self._closed = False
        self._slots: list[_Entry | None] = []
        self._submit()
        for _ in range(self._resident):
            entry = self._take()
            if entry is None:
                break
            self._slots.append(entry)
        self._active = [i for i, e in enumerate(self._slots) if e is not None]
        if not self._active and self.stats["blocks_skipped"]:
            raise N2VError(f"no training patches can be drawn from {self._src.name}: every block was skipped"
                           + self._bad.summary())

    # -- block loading --------------------------------------------------------

    def _submit(self) -> None:
        """Queue reads until the buffer budget (held + in flight) is used."""
        want = self._resident + self._lookahead - self._held
        while len(self._pending) < want:
            item = next(self._schedule, None)
            if item is None:
                return
            epoch, block = item
            nbytes = self._ds._window_nbytes(block)
            self._count(nbytes)
            bad = self._bad.snapshot()
            if self._pool is not None:
                self._pending.append((nbytes, self._pool.submit(self._ds._load, epoch, block, self.stream, bad)))
            else:
                self._pending.append((nbytes, _Later(self._ds._load, epoch, block, self.stream, bad)))

    def _take(self) -> _Entry | None:
        """The next loaded block in schedule order (skipping unusable ones)."""
        while True:
            self._submit()
            if not self._pending:
                return None
            nbytes, fut = self._pending.popleft()
            try:
                loaded = fut.result()
            except BaseException:
                self._count(-nbytes)
                raise
            self._bad.add(loaded.bad)
            if loaded.entry is not None:
                self._count(loaded.entry.nbytes - nbytes)
                self._held += 1
                self.stats["blocks_loaded"] += 1
                return loaded.entry
            self._count(-nbytes)
            self.stats["blocks_skipped"] += 1
            if loaded.background:
                self._reject()
            # A skipped block stays unusable (bad chunks are remembered, the mask does not
            # change): once every training block is, an endless schedule would spin forever.
            self._unusable.add(loaded.block)
            if len(self._unusable) >= len(self._ds.train_blocks):
                raise N2VError(f"no training patches can be drawn from {self._src.name}: every block was skipped"
                               + self._bad.summary())

    def _count(self, delta: int) -> None:
        self.stats["buffer_bytes"] += delta
        self.stats["peak_buffer_bytes"] = max(self.stats["peak_buffer_bytes"], self.stats["buffer_bytes"])

    def _retire(self, slot: int) -> None:
        entry = self._slots[slot]
        self._slots[slot] = None  # drop the window before the next read lands
        if entry is not None:
            self._count(-entry.nbytes)
            self._held -= 1
        new = self._take()
        if new is None:
            self._active.remove(slot)
        else:
            self._slots[slot] = new

    def _reject(self, n: int = 1) -> None:
        self.stats["rejected"] += n
        self._fails += n
        if self._fails >= self._ds.max_tries:
            ds = self._ds
            crit = ([f"std >= {ds.min_std}"] if ds.min_std is not None else []) + (
                [f"mask fraction >= {ds.min_foreground}"] if ds.mask is not None else [])
            raise N2VError(
                f"no foreground patch found in {self._src.name} after {self._fails} tries "
                f"(filter: {' and '.join(crit)}); the data looks all-background: lower min_std or check the mask"
            )

    # -- drawing --------------------------------------------------------------

    def _uniforms(self, m: int) -> np.ndarray:
        while len(self._uniform) < m:
            self._uniform = self._rng.random(4096).tolist() + self._uniform
        u = np.asarray(self._uniform[len(self._uniform) - m :])
        del self._uniform[len(self._uniform) - m :]
        return u

    def _fill_unfiltered(self, out: np.ndarray, n: int) -> int:
        """:meth:`_fill` without a foreground filter, vectorised per block.

        Each patch still picks its block at random, so batches stay mixed; the
        patches a block gets are gathered from its sliding-window view in one
        fancy-indexing copy instead of one Python step per patch.
        """
        todo = np.arange(n)
        filled = np.zeros(n, dtype=bool)
        while len(todo) and self._active:
            active = np.asarray(self._active)
            picks = active[(self._uniforms(len(todo)) * len(active)).astype(np.int64)]
            left = []
            for slot in np.unique(picks).tolist():
                entry = self._slots[slot]
                where = todo[picks == slot]
                take, rest = where[: entry.quota], where[entry.quota :]
                origins = entry.take_origins(len(take))
                out[take] = entry.view[(0, *origins.T)]
                filled[take] = True
                entry.quota -= len(take)
                left.append(rest)
                if entry.quota <= 0:
                    self._retire(slot)
            todo = np.sort(np.concatenate(left)) if left else todo[:0]
        count = int(filled.sum())
        if count < n:  # a finite stream ran out: keep the filled patches in front
            out[:count] = out[filled]
        self.stats["patches"] += count
        return count

    def _fill(self, out: np.ndarray, n: int) -> int:
        """Write up to ``n`` patches into ``out`` (shape ``(B, C, *patch_all)``); return the count."""
        ds = self._ds
        if ds.min_std is None and ds.mask is None:  # no foreground filter: every drawn patch is kept
            return self._fill_unfiltered(out, n)
        i = 0
        while i < n and self._active:
            slot = self._active[int(self._uniforms(1)[0] * len(self._active))]
            entry = self._slots[slot]
            origin = entry.next_origin()
            patch = entry.view[origin]
            if not _accept(ds, entry, origin, patch):
                entry.misses += 1
                self._reject()
                if entry.misses >= ds.block_tries:
                    self._retire(slot)
                continue
            out[i] = patch
            i += 1
            entry.misses = 0
            self._fails = 0
            entry.quota -= 1
            if entry.quota <= 0:
                self._retire(slot)
        self.stats["patches"] += i
        return i

    def next_batch(self, batch_size: int) -> torch.Tensor | None:
        """A ``(B, C, *patch)`` float32 tensor, or None once a finite stream is spent.

        B is less than ``batch_size`` only for the last batch of a finite stream.
        """
        ds = self._ds
        out = np.empty((batch_size, ds.n_channels, *ds.patch_shape), dtype=np.float32)
        n = self._fill(out.reshape(batch_size, ds.n_channels, *ds.grid.patch), batch_size)
        return torch.from_numpy(out[:n]) if n else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (batch := self.next_batch(64)) is not None:
            yield from batch  # views into one batch array: cheap, and freed together

    # -- life cycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop reader threads and drop the buffer."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            for _, fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)
        self._pending.clear()
        self._slots = []
        self._active = []
        self.stats["buffer_bytes"] = 0

    def __enter__(self) -> PatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Later:
    """A read done on demand, with the Future interface (no reader threads)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)

    def cancel(self) -> bool:
        return True


class ZarrPatchDataset(IterableDataset):
    """Stream of random training patches from a chunked array.

    Iterating yields raw patches (input units, ``torch.float32``) of shape
    ``(C, *patch_shape)`` (C = 1 without a ``c`` dim), endlessly unless
    ``epochs`` is set.  Use with a ``torch.utils.data.DataLoader`` (blocks are
    shared out among loader workers and distributed ranks, so no two serve the
    same stream) or with :func:`batches`.

    Streams are reproducible: the same seed (and position) gives the same
    patches, whatever the timing of the reader threads.  To resume, save
    :meth:`state_dict` (passing the number of patches consumed when loader
    workers are used) and call :meth:`load_state_dict` before iterating: the
    stream restarts at the pass and block reached, re-seeded from them, with
    nothing replayed.  Each ``iter()`` starts from the dataset's state in the
    process that iterates (loader workers get a copy at start-up).

    Parameters
    ----------
    data : xarray.DataArray, zarr.Array, dask array, numpy array or str
        The image.  A DataArray or dask array that wraps a zarr array
        unchanged (``da.from_zarr``) is read through the zarr array, not dask
        (chunk files of local unsharded arrays are decoded directly); a string
        is opened with ``zarr.open_array`` (local path or fsspec URL) in each
        process.
    patch_shape : sequence of int, optional
        Spatial patch shape; default 64x64 (2D) or 32x32x32 (3D).
    spatial_dims : sequence of str, optional
        ``("y", "x")`` or ``("z", "y", "x")``; default 3D when the data has
        ``z``.  Other dims except ``c`` are sample axes.
    dims : sequence of str, optional
        Dim names, required unless ``data`` is a DataArray.
    chunks : optional
        Notional chunking of a numpy array (default 256 along z/y/x).
    seed : int
        Seed of the validation split, the block order and the patches.
    val_fraction : float
        Fraction of blocks held out for validation (at least one when > 0).
    buffer_bytes : int
        Bound on decoded windows held plus reads in flight, per stream.
    patches_per_block : int, optional
        Patches served by each block load; default ``reuse`` times the
        block's volume over the patch volume.
    reuse : float
        Average number of patches covering a voxel per block load (used when
        ``patches_per_block`` is None).
    block_chunks : sequence of int, optional
        Chunks per block along each non-channel dim, instead of the automatic
        choice (at least twice the patch and ``min_block_bytes``).
    min_block_bytes : int
        Smallest block worth a read.
    straddle : bool
        Let patches cross into the following blocks (uniform coverage).
    io_threads : int
        Reader threads per stream (0: read in the consuming thread).
    min_std : float, optional
        Foreground filter: skip patches whose std (input units) is below.
    mask : array-like, optional
        Foreground mask over the non-channel dims (same shape, or a coarser
        grid mapped by nearest neighbour); a patch is kept when the mean of
        the mask over its footprint is at least ``min_foreground``.
    min_foreground : float
        See ``mask``.
    max_tries : int
        Consecutive rejected patches after which the data is declared
        all-background (:class:`N2VError`).
    block_tries : int
        Consecutive rejections after which a block is dropped from the buffer.
    max_bad_chunks : int
        Corrupt or non-finite chunks skipped (with a warning each) per stream
        before giving up with :class:`N2VError`.
    rank, world_size : int, optional
        Distributed rank and size; default from ``torch.distributed`` when
        initialised, else 0 and 1.
    epochs : int, optional
        Passes over the training blocks before the stream ends (None: endless).

    Attributes
    ----------
    grid : BlockGrid
        The blocks (``grid.bounds(b)`` gives block ``b``'s extent).
    train_blocks, val_blocks : ndarray of int
        Flat ids of the training and held-out validation blocks.
    n_channels : int
        C of the patches.
    """

    def __init__(
        self,
        data: Any,
        patch_shape: Sequence[int] | None = None,
        spatial_dims: Sequence[str] | None = None,
        *,
        dims: Sequence[str] | None = None,
        chunks: Any = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        patches_per_block: int | None = None,
        reuse: float = DEFAULT_REUSE,
        block_chunks: Sequence[int] | None = None,
        min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
        straddle: bool = True,
        io_threads: int = 2,
        min_std: float | None = None,
        mask: Any = None,
        min_foreground: float = 0.25,
        max_tries: int = 1000,
        block_tries: int = 50,
        max_bad_chunks: int = 10,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        src, dims = _open_source(data, dims, chunks)
        self._source = src
        self.dims = dims
        if spatial_dims is None:
            spatial_dims = ("z", "y", "x") if "z" in dims else ("y", "x")
        spatial_dims = tuple(spatial_dims)
        if spatial_dims not in (("y", "x"), ("z", "y", "x")):
            raise N2VError(f"spatial_dims must be ('y', 'x') or ('z', 'y', 'x'), got {spatial_dims}")
        missing = [d for d in spatial_dims if d not in dims]
        if missing:
            raise N2VError(f"spatial dim(s) {missing} not in the data's dims {dims}")
        if [d for d in dims if d in spatial_dims] != list(spatial_dims):
            raise N2VError(f"spatial dims {spatial_dims} must appear in that order in the data's dims {dims}")
        if patch_shape is None:
            patch_shape = (64, 64) if len(spatial_dims) == 2 else (32, 32, 32)
        patch_shape = tuple(int(p) for p in patch_shape)
        if len(patch_shape) != len(spatial_dims) or min(patch_shape) < 1:
            raise N2VError(f"patch_shape {patch_shape} must give a positive size for each of {spatial_dims}")
        self.spatial_dims, self.patch_shape = spatial_dims, patch_shape
        self._c_axis = dims.index("c") if "c" in dims else None
        self.n_channels = src.shape[self._c_axis] if self._c_axis is not None else 1
        grid_axes = [i for i, d in enumerate(dims) if d != "c"]
        self._grid_axes = grid_axes
        gdims = tuple(dims[i] for i in grid_axes)
        patch_all = tuple(patch_shape[spatial_dims.index(d)] if d in spatial_dims else 1 for d in gdims)
        voxel_bytes = src.dtype.itemsize * self.n_channels + (1 if mask is not None else 0)
        self.grid = make_block_grid(
            [src.shape[i] for i in grid_axes], [src.chunks[i] for i in grid_axes], gdims, patch_all,
            voxel_bytes=voxel_bytes, block_chunks=block_chunks, min_block_bytes=min_block_bytes,
            spatial=[d in spatial_dims for d in gdims],
        )
        self.straddle = bool(straddle)
        self._voxel_bytes = voxel_bytes
        window = self.grid.max_window_voxels(self.straddle) * voxel_bytes
        self._slots_total = int(buffer_bytes) // window
        if self._slots_total < 1:
            raise N2VError(
                f"buffer_bytes={buffer_bytes} cannot hold one block window ({window} bytes); "
                "raise buffer_bytes or use smaller blocks"
            )
        self.buffer_bytes = int(buffer_bytes)
        self.val_fraction = float(val_fraction)
        if patches_per_block is not None and int(patches_per_block) < 1:
            raise N2VError(f"patches_per_block must be >= 1, got {patches_per_block}")
        self.patches_per_block = None if patches_per_block is None else int(patches_per_block)
        self.reuse = float(reuse)
        self.io_threads = max(0, int(io_threads))
        self.min_std = None if min_std is None else float(min_std)
        self.mask = None if mask is None else _open_mask(mask, self.grid.shape, gdims)
        self.min_foreground = float(min_foreground)
        self.max_tries, self.block_tries = int(max_tries), max(1, int(block_tries))
        self.max_bad_chunks = int(max_bad_chunks)
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self._val_cache: dict[int, np.ndarray] = {}
        self._set_seed(int(seed))
        self.set_epoch(0)

    # -- blocks, schedule, state ---------------------------------------------

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        self.train_blocks, self.val_blocks = split_validation(self.grid.n_blocks, self.val_fraction, seed)
        self._val_set = set(self.val_blocks.tolist())
        self._quota = np.array([self._block_quota(b) for b in range(self.grid.n_blocks)], dtype=np.int64)
        self._val_cache.clear()

    def _block_quota(self, block: int) -> int:
        if self.patches_per_block is not None:
            return self.patches_per_block
        own = math.prod(hi - lo for lo, hi in self.grid.origin_box(block, self.straddle))
        return max(1, round(self.reuse * own / math.prod(self.grid.patch)))

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at pass ``epoch`` over the training blocks."""
        self._epoch = int(epoch)
        self._served = 0
        self._resume = 0

    def state_dict(self, patches_served: int | None = None) -> dict[str, int]:
        """Where the stream stands, for resuming.

        Parameters
        ----------
        patches_served : int, optional
            Patches this process (rank) consumed since the last
            :meth:`set_epoch` / :meth:`load_state_dict`, all its loader
            workers together (e.g. steps x batch size).  Needed with loader
            workers, whose counts the main process cannot see; default the
            count iterated in this process.

        Returns
        -------
        dict
            ``seed``, ``epoch`` and ``patches_served`` over all ranks (ranks
            step together, so this rank's count times the world size).
        """
        local = self._served if patches_served is None else int(patches_served)
        served = self._resume + local * self._rank_world()[1]
        return {"seed": self.seed, "epoch": self._epoch, "patches_served": served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: later iteration skips to the pass and block
        reached, re-seeded from (seed, pass, block), without replaying patches."""
        unknown = set(state) - {"seed", "epoch", "patches_served"}
        if unknown:
            raise N2VError(f"unknown sampler state key(s): {sorted(unknown)}")
        if int(state["seed"]) != self.seed:
            self._set_seed(int(state["seed"]))
        self._epoch = int(state.get("epoch", 0))
        self._resume = int(state.get("patches_served", 0))
        self._served = 0

    def _epoch_quota(self, epoch: int, n_streams: int) -> int:
        return sum(int(self._quota[assign_blocks(self.train_blocks, epoch, s, n_streams, self.seed)].sum())
                   for s in range(n_streams))

    def _start_position(self, stream: int, n_streams: int) -> tuple[int, int]:
        """(pass, index into this stream's blocks of that pass) reached after the served patches.

        All streams are assumed to have served the same fraction of a pass
        (a loader takes batches from its workers in turn).
        """
        epoch, left = self._epoch, self._resume
        if len(self.train_blocks) >= n_streams:  # every pass serves the same total
            per_pass = int(self._quota[self.train_blocks].sum())
            epoch, left = epoch + left // per_pass, left % per_pass
        else:
            while left >= (per_pass := self._epoch_quota(epoch, n_streams)):
                epoch, left = epoch + 1, left - per_pass
        if not left:
            return epoch, 0
        cum = np.cumsum(self._quota[assign_blocks(self.train_blocks, epoch, stream, n_streams, self.seed)])
        return epoch, int(np.searchsorted(cum, left / per_pass * cum[-1], side="right"))

    def _schedule(self, stream: int, n_streams: int) -> Iterator[tuple[int, int]]:
        """(pass, block) pairs this stream loads, from the resume position on."""
        epoch, start = self._start_position(stream, n_streams)
        stop = None if self.epochs is None else self._epoch + int(self.epochs)
        while stop is None or epoch < stop:
            for b in assign_blocks(self.train_blocks, epoch, stream, n_streams, self.seed)[start:]:
                yield epoch, int(b)
            epoch, start = epoch + 1, 0

    def _rank_world(self) -> tuple[int, int]:
        """Distributed rank and world size: explicit, else from ``torch.distributed``, else (0, 1)."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank() if rank is None else rank
                world = torch.distributed.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise N2VError(f"rank {rank} is outside world size {world}")
        return rank, world

    def _streams(self) -> tuple[int, int]:
        """(this stream, number of streams) from loader worker and distributed rank."""
        rank, world = self._rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    # -- reading blocks ---------------------------------------------------------

    def _region(self, window: Box) -> tuple[slice, ...]:
        region = [slice(None)] * len(self.dims)
        for ax, (lo, hi) in zip(self._grid_axes, window):
            region[ax] = slice(lo, hi)
        if self._c_axis is not None:
            region[self._c_axis] = slice(0, self.n_channels)
        return tuple(region)

    def _window_nbytes(self, block: int) -> int:
        return math.prod(hi - lo for lo, hi in self.grid.window(block, self.straddle)) * self._voxel_bytes

    def _load(self, epoch: int, block: int, stream: int, known_bad: frozenset, validation: bool = False) -> _Loaded:
        """Read one block window and prepare its patch origins (runs in a reader thread)."""
        grid = self.grid
        straddle = self.straddle and not validation
        window = grid.window(block, straddle)
        own = grid.origin_box(block, straddle)
        mask_win = None
        if self.mask is not None:
            mask_win = _read_mask(self.mask, window, grid.shape)
            core = tuple(slice(lo - w0, hi - w0 + p - 1) for (lo, hi), (w0, _), p in zip(own, window, grid.patch))
            if not mask_win[core].any():
                return _Loaded(None, {}, background=True, block=block)
        data, bad = read_window(self._source, self._region(window), known_bad)
        # Forbidden footprint regions: other validation blocks (for training), bad chunks.
        forbidden: list[Box] = []
        for other in grid.blocks_overlapping(window):
            if other != block and (validation or other in self._val_set):
                forbidden.append(grid.bounds(other))
        for chunk in set(bad) | known_bad:
            ext = _chunk_slices(self._source, chunk)
            forbidden.append(tuple((ext[ax].start, ext[ax].stop) for ax in self._grid_axes))
        boxes = origin_boxes(own, forbidden, grid.patch)
        if not boxes:
            return _Loaded(None, bad, block=block)
        if self._c_axis is not None:
            data = np.moveaxis(data, self._c_axis, 0)
        else:
            data = data[None]
        local = [tuple((lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, window)) for box in boxes]
        view = np.lib.stride_tricks.sliding_window_view(data, (self.n_channels, *grid.patch))
        mask_view = None
        if mask_win is not None:
            mask_view = np.lib.stride_tricks.sliding_window_view(mask_win, grid.patch)
        rng = _rng(self.seed, _TAG_VALDRAW if validation else _TAG_BLOCK, epoch, block, stream)
        nbytes = data.nbytes + (mask_win.nbytes if mask_win is not None else 0)
        return _Loaded(_Entry(block, view, mask_view, local, rng, int(self._quota[block]), nbytes), bad)

    # -- iteration ------------------------------------------------------------

    def stream(self, stream: int | None = None, n_streams: int | None = None) -> PatchStream:
        """A :class:`PatchStream` for this process (worker and rank from the environment unless given)."""
        if stream is None or n_streams is None:
            stream, n_streams = self._streams()
        return PatchStream(self, stream, n_streams)

    def __iter__(self) -> Iterator[torch.Tensor]:
        s = self.stream()
        try:
            for patch in s:
                self._served += 1
                yield patch
        finally:
            s.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_val_cache"] = {}  # validation patches stay in the main process
        return state

    # -- validation -----------------------------------------------------------

    def validation_patches(self, n: int) -> np.ndarray:
        """A fixed validation set drawn once from the held-out blocks.

        Patches lie entirely inside validation blocks; the same ``n`` and
        seed always give the same array.

        Returns
        -------
        ndarray
            float32, shape ``(n, C, *patch_shape)``.
        """
        n = int(n)
        if n in self._val_cache:
            return self._val_cache[n]
        if len(self.val_blocks) == 0:
            raise N2VError("no validation blocks: val_fraction is 0")
        order = self.val_blocks[_rng(self.seed, _TAG_VALDRAW).permutation(len(self.val_blocks))]
        order = order[: min(len(order), n, 64)]  # enough blocks for variety, not a full read
        out = np.empty((n, self.n_channels, *self.patch_shape), dtype=np.float32)
        flat = out.reshape(n, self.n_channels, *self.grid.patch)
        bad = _BadChunks(self._source.name, self.max_bad_chunks)
        got, tries = 0, 0
        for k, block in enumerate(order):
            loaded = self._load(0, int(block), 0, bad.snapshot(), validation=True)
            bad.add(loaded.bad)
            entry = loaded.entry
            if entry is None:
                continue
            want = math.ceil((n - got) / (len(order) - k))
            misses = 0
            while want > 0 and misses < self.block_tries:
                origin = entry.next_origin()
                patch = entry.view[origin]
                if (self.min_std is not None or self.mask is not None) and not _accept(self, entry, origin, patch):
                    misses += 1
                    tries += 1
                    continue
                flat[got] = patch
                got, want, misses = got + 1, want - 1, 0
            if got == n:
                break
        if got == 0:
            why = (f"every one holds bad chunks{bad.summary()}" if bad.reasons
                   else "the held-out data looks all-background")
            raise N2VError(f"no validation patch found in the {len(order)} validation block(s) of "
                           f"{self._source.name} after {tries} tries: {why}")
        if got < n:  # filters left some blocks short: repeat the accepted patches
            flat[got:] = flat[np.arange(n - got) % got]
        self._val_cache[n] = out
        return out


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def batches(dataset: Iterable[torch.Tensor], batch_size: int, prefetch: int = 2) -> Iterator[torch.Tensor]:
    """Group patches into ``(B, C, *patch)`` float32 tensors, drawn ahead in a thread.

    A :class:`ZarrPatchDataset` is drawn straight into each batch array (no
    per-patch tensors); any other iterable of ``(C, *patch)`` patches is
    stacked.  A finite stream ends with a short last batch.

    Parameters
    ----------
    dataset : ZarrPatchDataset or iterable of tensors
        Where the patches come from.
    batch_size : int
        Patches per batch.
    prefetch : int
        Batches prepared ahead by a background thread, so that drawing
        overlaps the consumer's work (0: draw on demand in the caller).
    """
    if isinstance(dataset, ZarrPatchDataset):
        s = dataset.stream()
        try:
            for batch in _ahead(iter(lambda: s.next_batch(batch_size), None), prefetch):
                dataset._served += len(batch)
                yield batch
        finally:
            s.close()
        return

    def stacked() -> Iterator[torch.Tensor]:
        buf: list[torch.Tensor] = []
        for patch in dataset:
            buf.append(torch.as_tensor(patch))
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
        if buf:
            yield torch.stack(buf)

    yield from _ahead(stacked(), prefetch)


def _ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead; re-raise its errors here."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=run, name="n2v-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
