"""Array access for the patch sampler: one ``read(region)`` over zarr, dask and numpy.

A zarr array is read directly (no dask graph per read): either given as such,
as a path or URL, or handed over by :func:`~n2v_chunked.io.sources.open_image`
with the DataArray it opened (:func:`~n2v_chunked.io.sources.store_array`).
:func:`read_window` reads a block window and names the corrupt or non-finite
chunks in it (zeroed, for the caller to cut out); :class:`BadChunks` keeps one
stream's tally of them.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ..errors import AxesError, ConfigError, N2VError, UnreadableDataError, first_line
from ..io.sources import store_array
from ..io.objects import zarr_store
from ..io.stores import RetriesExhausted, with_retries
from .grid import Box

# ----------------------------------------------------------------------------
# Sources: one read(region) call over zarr, dask and numpy
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
            try:
                self._array = zarr.open_array(store=zarr_store(self._url, read_only=True), mode="r")
            except Exception as exc:  # any store error: a user-facing path problem
                raise UnreadableDataError(f"cannot open zarr array {self._url}: {exc}") from None
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


def _is_zarr(obj: Any) -> bool:
    return type(obj).__module__.startswith("zarr") and hasattr(obj, "chunks") and hasattr(obj, "store")


def open_source(data: Any, dims: Sequence[str] | None, chunks: Any) -> tuple[_Source, tuple[str, ...]]:
    """Wrap any supported input as a source plus its dims.

    A DataArray from :func:`~n2v_chunked.io.sources.open_image` that still
    holds the data it opened is read through the zarr array it hands over
    (:func:`~n2v_chunked.io.sources.store_array`); any other dask array
    through dask.
    """
    if isinstance(data, str):
        src: _Source = _ZarrSource(url=data)
    else:
        if isinstance(data, xr.DataArray):
            if dims is not None and tuple(dims) != tuple(data.dims):
                raise AxesError(f"dims {tuple(dims)} disagree with the DataArray's {tuple(data.dims)}")
            dims = tuple(str(d) for d in data.dims)
            label = data.attrs.get("source") if isinstance(data.attrs.get("source"), str) else None
            z = store_array(data)
            data = data.data
            if z is not None:
                data = _ZarrSource(array=z)
            elif isinstance(data, np.ndarray):
                data = _NumpySource(data, _numpy_chunks(data, dims, chunks), label or "numpy array")
            elif label and hasattr(data, "dask"):
                data = _DaskSource(data, label)
        if isinstance(data, _Source):
            src = data
        elif _is_zarr(data):
            src = _ZarrSource(array=data)
        elif hasattr(data, "dask") and hasattr(data, "chunks"):
            src = _DaskSource(data)
        elif isinstance(data, np.ndarray):
            if dims is None:
                raise AxesError("dims are required for a numpy array, e.g. dims=('y', 'x')")
            src = _NumpySource(data, _numpy_chunks(data, dims, chunks))
        else:
            raise N2VError(f"cannot sample patches from a {type(data).__name__}; "
                           "give an xarray.DataArray, zarr array, dask array, numpy array or zarr path")
    if dims is None:
        raise AxesError(f"dims are required for {src.name}, e.g. dims=('z', 'y', 'x')")
    dims = tuple(dims)
    if len(dims) != len(src.shape) or len(set(dims)) != len(dims):
        raise AxesError(f"dims {dims} do not match the {len(src.shape)}-d array {src.name} of shape {src.shape}")
    return src, dims


def _numpy_chunks(arr: np.ndarray, dims: Sequence[str], chunks: Any) -> tuple[tuple[int, ...], ...]:
    if chunks is None:  # notional: 256 along y/x/z, 1 along sample axes, whole channel axis
        chunks = [n if d == "c" else (min(n, 256) if d in ("z", "y", "x") else 1) for d, n in zip(dims, arr.shape)]
    return tuple(tuple(int(c) for c in cs) for cs in da.core.normalize_chunks(chunks, arr.shape))


def open_mask(mask: Any, shape: tuple[int, ...], dims: tuple[str, ...]) -> _Source:
    """Wrap a foreground mask over the grid dims (same or coarser shape)."""
    if isinstance(mask, xr.DataArray):
        z = store_array(mask)
        mask = mask.data if z is None else z
    if isinstance(mask, str):
        src: _Source = _ZarrSource(url=mask)
    elif _is_zarr(mask):
        src = _ZarrSource(array=mask)
    elif hasattr(mask, "dask"):
        src = _DaskSource(mask)
    else:
        arr = np.asarray(mask)
        src = _NumpySource(arr, tuple((n,) for n in arr.shape), "mask")
    if len(src.shape) != len(shape) or any(m > n or m < 1 for m, n in zip(src.shape, shape)):
        raise ConfigError(f"mask shape {src.shape} must match the data's {dict(zip(dims, shape))} "
                       "(or be a coarser grid of the same dims)")
    return src


def read_mask(mask: _Source, window: Box, shape: tuple[int, ...]) -> np.ndarray:
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


def chunk_slices(src: _Source, idx: tuple[int, ...]) -> tuple[slice, ...]:
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
    chunks = {c: chunk_slices(src, c) for c in itertools.product(*ranges)}
    bad: dict[tuple[int, ...], str] = {}
    skip = known_bad.intersection(chunks)
    data, first_error = None, None
    if not skip:
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
                bad[c] = f"cannot be read ({type(exc).__name__}: {first_line(exc)})"
        if first_error is not None and not bad:
            raise first_error  # every chunk reads on its own: not a data problem
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        for c, ext in chunks.items():
            if c not in skip and c not in bad and not np.isfinite(data[_overlap(region, ext)]).all():
                bad[c] = "contains NaN or Inf values"
    for c in skip | set(bad):
        data[_overlap(region, chunks[c])] = 0
    return data, bad


class BadChunks:
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
                raise UnreadableDataError(
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

