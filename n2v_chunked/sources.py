"""Opening any input lazily as an :class:`xarray.DataArray`.

One entry point, :func:`open_image`, for OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on
Zarr v3), plain Zarr arrays and groups, local paths and fsspec URLs, TIFF and
OME-TIFF files, folders or globs of TIFFs, and in-memory numpy / dask / xarray
arrays.  Nothing is read until the caller computes: stored data becomes a dask
array whose chunks are the store's chunks (its shards, when sharded; for TIFF,
whole strips/tiles/pages merged to a few MiB).

The result has dims in canonical order, a subset of ``("t", "c", "z", "y", "x")``,
and ``attrs``: ``scale``, ``units``, ``translation`` (dicts keyed by dim),
``source`` (str), ``format`` (``ome-zarr``, ``zarr``, ``tiff``, ``numpy``,
``dask`` or ``xarray``) and ``ngff_version`` (str or None).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import math
import re
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from .errors import AxesError, InputNotFoundError, N2VError, UnreadableDataError
from .metadata_axes import Stated, check_axes_agree, tiff_stated_axes
from .tiffcheck import check_complete, quiet_tifffile

log = logging.getLogger("n2v_chunked")

CANONICAL: tuple[str, ...] = ("t", "c", "z", "y", "x")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
ASK_AXES = "pass --axes (letters from tczyx, e.g. --axes zyx)"
# Merge tiny TIFF strips into dask chunks of about this size: one task per
# 8-row strip would make millions of tasks for a large file.
TIFF_CHUNK_BYTES = 4 * 2**20

# NGFF units are UDUNITS-2 names; OME-XML and ImageJ use abbreviations.
_UNITS = {
    "µm": "micrometer", "\u03bcm": "micrometer", "um": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "\\u00b5m": "micrometer", "nm": "nanometer", "mm": "millimeter",
    "cm": "centimeter", "m": "meter", "pm": "picometer", "å": "angstrom", "a": "angstrom",
    "s": "second", "sec": "second", "ms": "millisecond", "µs": "microsecond", "us": "microsecond",
    "min": "minute", "h": "hour", "ns": "nanosecond",
}
_NGFF_UNITS = set(_UNITS.values()) | {"kilometer", "inch", "foot", "day"}
_NGFF_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


@dataclasses.dataclass
class SourceInfo:
    """What :func:`open_image_info` learnt about the store, beyond the array.

    Attributes
    ----------
    store_chunks : tuple of int or None
        Chunk shape of the opened level in the store, canonical order.
    shards : tuple of int or None
        Shard shape (Zarr v3 sharding), canonical order.
    levels : list of tuple of int
        Shape of every resolution level (canonical order); one entry if none.
    nbytes_stored : int or None
        Bytes the source occupies on disk (all levels), when known.
    dtype : str
        Stored data type.
    """

    store_chunks: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    levels: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    nbytes_stored: int | None = None
    dtype: str = ""
    stored_axes: str = ""  # the axes in stored order: the order --axes refers to


@dataclasses.dataclass
class _Raw:
    """An opened source in its native axis order, before canonicalisation."""

    data: da.Array
    dims: tuple[str, ...] | None
    format: str
    source: str
    scale: dict[int, float] = dataclasses.field(default_factory=dict)  # keyed by position
    units: dict[int, str] = dataclasses.field(default_factory=dict)
    translation: dict[int, float] = dataclasses.field(default_factory=dict)
    ngff_version: str | None = None
    info: SourceInfo = dataclasses.field(default_factory=SourceInfo)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Axes the metadata states, by stored position (None where it states none);
    # None: ``dims`` if known, else nothing stated (see metadata_axes.py).
    stated: Stated | None = None
    # Re-read with other dask chunks (native order).  Reading each block
    # straight from the store keeps memory at one block per task, where
    # ``rechunk`` across, say, whole TIFF pages would hold every page a block spans.
    rebuild: Callable[[tuple[int, ...]], da.Array] | None = None


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def parse_axes(axes: str | Sequence[str], ndim: int) -> tuple[str, ...]:
    """Validate an axes string such as ``"zyx"`` against an array's ndim.

    Parameters
    ----------
    axes : str or sequence of str
        Letters from ``tczyx`` (any case), no repeats, one per dimension.
    ndim : int
        Number of dimensions of the array the axes describe.

    Returns
    -------
    tuple of str
        Lower-case axis names in the given (not canonical) order.
    """
    letters = tuple(a.lower() for a in (axes.replace(",", "").strip() if isinstance(axes, str) else axes))
    bad = sorted({a for a in letters if a not in CANONICAL})
    if bad:
        raise AxesError(
            f"unknown axis letter(s) {', '.join(map(repr, bad))} in axes {''.join(letters)!r}: use letters from tczyx"
        )
    if len(set(letters)) != len(letters):
        raise AxesError(f"repeated axis letter in axes {''.join(letters)!r}")
    if len(letters) != ndim:
        raise AxesError(f"axes {''.join(letters)!r} has {len(letters)} letters but the data has {ndim} dimensions")
    return letters


def open_image(
    source: Any,
    axes: str | Sequence[str] | None = None,
    level: int = 0,
    *,
    storage_options: dict[str, Any] | None = None,
    chunks: Any = None,
) -> xr.DataArray:
    """Open an image lazily as a dask-backed DataArray in canonical axis order.

    Parameters
    ----------
    source : str, Path, numpy.ndarray, dask.array.Array or xarray.DataArray
        A path or fsspec URL (``file://``, ``s3://``, ...) to an OME-Zarr group
        (or one of its level arrays), a plain Zarr array or group, a TIFF /
        OME-TIFF file, a folder or glob of same-shaped TIFFs; or an array.
    axes : str, optional
        Axis letters of the source in its stored order (e.g. ``"zyx"``, or
        ``"yxc"`` for a channels-last RGB TIFF), not the canonical order of the
        result.  Required where the metadata states no axes; where it does,
        ``axes`` must agree with it (:class:`~n2v_chunked.errors.AxesError`
        otherwise).  For a folder of TIFFs the first letter names the
        stacking axis.
    level : int
        Resolution level of a multiscale source (0 = full resolution).
    storage_options : dict, optional
        fsspec options for URLs (credentials, endpoint, ...).
    chunks : tuple of int or dict, optional
        Dask chunks to use instead of the store's, in canonical (output) dim
        order or as ``{dim: size}``; stored sources are then read block by
        block at those chunks (best multiples of the store's).

    Returns
    -------
    xarray.DataArray
        Dims a subset of ``("t", "c", "z", "y", "x")`` in that order; see the
        module docstring for ``attrs``.
    """
    return open_image_info(source, axes, level, storage_options=storage_options, chunks=chunks)[0]


def open_image_info(
    source: Any,
    axes: str | Sequence[str] | None = None,
    level: int = 0,
    *,
    storage_options: dict[str, Any] | None = None,
    chunks: Any = None,
) -> tuple[xr.DataArray, SourceInfo]:
    """Like :func:`open_image`, also returning store details (chunks, levels, size)."""
    if level < 0:
        raise N2VError(f"level must be >= 0, got {level}")
    if isinstance(source, xr.DataArray):
        raw = _open_xarray(source, axes)
    elif isinstance(source, da.Array):
        raw = _Raw(source, None, "dask", "<dask array>")
    elif isinstance(source, np.ndarray):
        raw = _Raw(da.from_array(source, chunks="auto"), None, "numpy", "<numpy array>")
    elif isinstance(source, (str, Path)):
        raw = _open_path(str(source), axes, level, storage_options or {})
    else:
        raise N2VError(f"cannot open a {type(source).__name__}: give a path, URL, numpy, dask or xarray array")
    if level and raw.format not in ("ome-zarr", "tiff"):
        raise N2VError(f"{raw.source} has a single resolution level; level {level} does not exist")
    return _canonical(raw, axes, chunks)


# ----------------------------------------------------------------------------
# Reading stored arrays chunk by chunk.
# ----------------------------------------------------------------------------


class _ChunkReader:
    """Array-like for :func:`dask.array.from_array` that reads one region per call.

    Decode or I/O failures become :class:`N2VError` naming the array and the
    chunk, so that a corrupt chunk found hours into a job is one clear line.
    The object pickles (for distributed workers) without open file handles.
    """

    def __init__(self, label: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...]) -> None:
        self.label = label
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.store_chunks = tuple(chunks)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # deterministic task names (dask adds the chunks) without pickling the store
        return (type(self).__name__, self.label, self.shape, str(self.dtype), getattr(self, "level", 0))

    def _read(self, key: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        from .stores import with_retries

        try:  # transient store errors (timeouts, 5xx, throttling) are retried with back-off
            return with_retries(lambda: self._read(key), f"reading {self.label}")
        except (N2VError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            where, cause = self._locate(key, exc)
            raise UnreadableDataError(f"cannot read {self.label} {where}: {type(cause).__name__}: {_first_line(cause)}") from exc

    def _chunk_name(self, idx: tuple[int, ...]) -> str:
        return str(idx)

    def _locate(self, key: Any, exc: Exception) -> tuple[str, Exception]:
        """Name the stored chunk that fails: re-read the failed block chunk by chunk.

        Only runs on the error path, so a block of many chunks costs nothing
        extra when all is well.
        """
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != self.ndim or not all(isinstance(k, slice) for k in key):
            return f"at {key}", exc
        sl = [slice(*k.indices(n)[:2]) for k, n in zip(key, self.shape)]
        ranges = [range(s.start // c, max(s.start // c + 1, -(-s.stop // c))) for s, c in zip(sl, self.store_chunks)]
        for idx in itertools.product(*ranges):
            sub = tuple(
                slice(max(s.start, i * c), min(s.stop, (i + 1) * c)) for s, i, c in zip(sl, idx, self.store_chunks)
            )
            try:
                self._read(sub)
            except Exception as inner:  # the first failing chunk is the culprit
                region = ", ".join(
                    f"{i * c}:{min((i + 1) * c, n)}" for i, c, n in zip(idx, self.store_chunks, self.shape)
                )
                return f"chunk {self._chunk_name(idx)} (region [{region}]); the chunk may be corrupt", inner
        region = ", ".join(f"{s.start}:{s.stop}" for s in sl)
        return f"region [{region}]", exc


class _ZarrReader(_ChunkReader):
    def __init__(self, array: Any, label: str) -> None:
        super().__init__(label, array.shape, array.dtype, array.chunks)
        self.array = array

    def _read(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[key])

    def _chunk_name(self, idx: tuple[int, ...]) -> str:
        try:
            return f"{idx} (key {self.array.metadata.encode_chunk_key(idx)})"
        except Exception:  # older metadata classes
            return str(idx)


class _TiffReader(_ChunkReader):
    """Reads a TIFF through ``tifffile``'s Zarr store (strip/tile/page chunks).

    With ``keep_open`` the file stays open in each process (one big file read
    chunk by chunk); without, every read opens and closes it (a folder of
    thousands of files must not hold thousands of handles).
    """

    def __init__(self, path: str, level: int, keep_open: bool) -> None:
        self.path, self.level, self.keep_open = path, level, keep_open
        self._handles: tuple[Any, Any, Any] | None = None
        self._lock = threading.Lock()
        handles = self._open(check=True)
        z = handles[2]
        super().__init__(f"TIFF {path}", z.shape, z.dtype, z.chunks)
        if keep_open:
            self._handles = handles
        else:
            self._close(handles)

    def _open(self, check: bool = False) -> tuple[Any, Any, Any]:
        """Open the file; with ``check``, refuse it unless all its pages and strips are there."""
        import tifffile
        import zarr

        with quiet_tifffile() as records:
            tf = tifffile.TiffFile(self.path)
            try:
                if check:
                    check_complete(tf, self.path, self.level, records)
                store = tf.series[0].aszarr(level=self.level)
                return tf, store, zarr.open(store, mode="r")
            except Exception:
                tf.close()
                raise

    @staticmethod
    def _close(handles: tuple[Any, Any, Any]) -> None:
        handles[1].close()
        handles[0].close()

    def _read(self, key: Any) -> np.ndarray:
        if not self.keep_open:
            handles = self._open()
            try:
                return _read_in_pieces(handles[2], key, self.store_chunks)
            finally:
                self._close(handles)
        with self._lock:
            if self._handles is None:
                self._handles = self._open()
        return _read_in_pieces(self._handles[2], key, self.store_chunks)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _read_in_pieces(z: Any, key: Any, chunks: Sequence[int], limit: int = TIFF_CHUNK_BYTES) -> np.ndarray:
    """``z[key]``, split into sequential reads of about ``limit`` bytes of stored chunks.

    tifffile's store hands zarr whole decoded strips/pages and zarr fetches all
    of a selection's chunks at once: a block spanning 64 whole-page chunks
    would hold 64 decoded pages.  Reading piecewise bounds that to ``limit``
    (the file is behind one lock anyway, so nothing is lost).
    """
    key = key if isinstance(key, tuple) else (key,)
    if len(key) != z.ndim or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
        return np.asarray(z[key])
    sl = [slice(*k.indices(n)[:2]) for k, n in zip(key, z.shape)]
    spans = [((s.stop - 1) // c - s.start // c + 1) if s.stop > s.start else 0 for s, c in zip(sl, chunks)]
    per_chunk = math.prod(chunks) * z.dtype.itemsize
    axis = next((d for d, n in enumerate(spans) if n > 1), None)
    if axis is None or math.prod(spans) * per_chunk <= limit:
        return np.asarray(z[tuple(sl)])
    c = chunks[axis]
    step = max(1, limit // (per_chunk * math.prod(spans) // spans[axis])) * c  # chunk rows per piece
    out = np.empty(tuple(s.stop - s.start for s in sl), dtype=z.dtype)
    start = sl[axis].start
    while start < sl[axis].stop:
        stop = min(sl[axis].stop, (start // c) * c + step)
        sub = list(sl)
        sub[axis] = slice(start, stop)
        piece = _read_in_pieces(z, tuple(sub), chunks, limit)
        idx = [slice(None)] * len(sl)
        idx[axis] = slice(start - sl[axis].start, stop - sl[axis].start)
        out[tuple(idx)] = piece
        start = stop
    return out


def _from_reader(reader: _ChunkReader, chunks: tuple[int, ...]) -> da.Array:
    meta = np.empty((0,) * reader.ndim, dtype=reader.dtype)
    return da.from_array(reader, chunks=chunks, asarray=False, fancy=False, lock=False, meta=meta)


def grow_chunks(shape: Sequence[int], chunks: Sequence[int], itemsize: int, target: int) -> tuple[int, ...]:
    """Multiply store chunks, innermost dim first, until a chunk is about ``target`` bytes."""
    out = [min(c, s) for c, s in zip(chunks, shape)]
    for d in reversed(range(len(out))):
        size = math.prod(out) * itemsize
        if size >= target:
            break
        factor = max(1, target // size)
        out[d] = min(shape[d], out[d] * factor)
    return tuple(out)


# ----------------------------------------------------------------------------
# Paths and URLs.
# ----------------------------------------------------------------------------


def is_url(s: str) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s))


def _open_path(source: str, axes: Any, level: int, storage_options: dict[str, Any]) -> _Raw:
    if source.startswith("file://"):
        source = source[len("file://"):]  # local: same code path as plain paths
    if is_url(source):
        if source.lower().rstrip("/").endswith(TIFF_SUFFIXES):
            raise N2VError(f"TIFF files are read from local paths only; copy {source} to a local disk")
        return _open_zarr(source, level, storage_options, url=True)
    if any(ch in source for ch in "*?["):
        files = sorted((f for f in glob.glob(source) if f.lower().endswith(TIFF_SUFFIXES)), key=_natural_key)
        if not files:
            raise InputNotFoundError(f"no TIFF files match {source}")
        return _open_tiff_stack(files, source, axes)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"input not found: {source}")
    path = path.resolve()
    if path.is_dir():
        if any((path / m).exists() for m in ZARR_MARKERS):
            return _open_zarr(str(path), level, storage_options, url=False)
        files = sorted((str(f) for f in path.iterdir() if f.name.lower().endswith(TIFF_SUFFIXES)), key=_natural_key)
        if files:
            return _open_tiff_stack(files, str(path), axes)
        raise UnreadableDataError(
            f"{path} is a directory but neither a Zarr store (no zarr.json/.zgroup/.zarray) nor a folder of TIFFs"
        )
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return _open_tiff(str(path), level)
    if path.name in ZARR_MARKERS:  # e.g. img.zarr/zarr.json: the node it describes
        return _open_zarr(str(path.parent), level, storage_options, url=False)
    from .formats import open_with_bioio  # PNG, JPEG, vendor formats: the optional [formats] extra

    return open_with_bioio(str(path), level)


def _natural_key(s: str) -> list[Any]:
    """Sort ``frame_2`` before ``frame_10``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------
# Zarr and OME-Zarr.
# ----------------------------------------------------------------------------


def _open_zarr(source: str, level: int, storage_options: dict[str, Any], url: bool) -> _Raw:
    import zarr

    kw = {"storage_options": storage_options} if url and storage_options else {}
    try:
        node = zarr.open(store=source, mode="r", **kw)
    except Exception as exc:  # zarr's not-found errors, and fsspec backends' own (missing s3fs, credentials)
        from .stores import diagnose

        problem = diagnose(source, exc) if url else None  # a missing bucket, refused credentials
        raise UnreadableDataError(problem or f"cannot open {source} as Zarr: {type(exc).__name__}: {_first_line(exc)}") from None
    if isinstance(node, zarr.Array):
        parent = _parent_multiscales(source, kw)
        if parent is not None:
            group, ms, version, index = parent
            if level not in (0, index):
                raise N2VError(f"{source} is level {index} of its OME-Zarr; do not also pass level {level}")
            return _open_multiscales(group, ms, version, index, source.rstrip("/").rsplit("/", 1)[0])
        return _plain_zarr(node, source)
    ms, version = _multiscales(node.attrs.asdict())
    if ms is None and _is_bioformats2raw(node.attrs.asdict()) and "0" in node:
        node = node["0"]  # bioformats2raw layout: the image is the group "0"
        ms, version = _multiscales(node.attrs.asdict())
    if ms is not None:
        if (node.attrs.get("n2v_chunked") or {}).get("complete") is False:
            log.warning("%s is marked incomplete: it is an unfinished or failed n2v-chunked output", source)
        return _open_multiscales(node, ms, version, level, source)
    arrays = sorted(node.array_keys())
    if len(arrays) == 1:
        return _plain_zarr(node[arrays[0]], f"{source.rstrip('/')}/{arrays[0]}")
    if not arrays:
        raise UnreadableDataError(f"Zarr group {source} has no OME-Zarr multiscales metadata and holds no arrays")
    raise UnreadableDataError(
        f"Zarr group {source} has no OME-Zarr multiscales metadata and holds several arrays "
        f"({', '.join(arrays)}): open one of them, e.g. {source.rstrip('/')}/{arrays[0]}"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _is_bioformats2raw(attrs: dict[str, Any]) -> bool:
    return "bioformats2raw.layout" in attrs or "bioformats2raw.layout" in (attrs.get("ome") or {})


def _multiscales(attrs: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The first ``multiscales`` entry and the NGFF version (0.5 under ``ome``)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("multiscales"):
        return ome["multiscales"][0], str(ome.get("version", "0.5"))
    ms = attrs.get("multiscales")
    if isinstance(ms, list) and ms:
        version = ms[0].get("version")
        return ms[0], str(version) if version is not None else None
    return None, None


def _parent_multiscales(source: str, kw: dict[str, Any]) -> tuple[Any, dict, str | None, int] | None:
    """If ``source`` is a level array of an OME-Zarr, return its group and level index."""
    import zarr

    stripped = source.rstrip("/")
    if "/" not in stripped:
        return None
    parent, name = stripped.rsplit("/", 1)
    try:
        group = zarr.open_group(store=parent, mode="r", **kw)
    except Exception:
        return None
    ms, version = _multiscales(group.attrs.asdict())
    if ms is None:
        return None
    paths = [str(d.get("path", "")).strip("/") for d in ms.get("datasets", [])]
    return (group, ms, version, paths.index(name)) if name in paths else None


def _transforms(items: list[dict[str, Any]] | None, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, trans = np.ones(ndim), np.zeros(ndim)
    for t in items or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = np.asarray(t["scale"], dtype=float)
        elif t.get("type") == "translation" and "translation" in t:
            trans = np.asarray(t["translation"], dtype=float)
    if scale.shape != (ndim,) or trans.shape != (ndim,):
        raise UnreadableDataError(f"coordinateTransformations {items} do not match {ndim} axes")
    return scale, trans


def _open_multiscales(group: Any, ms: dict[str, Any], version: str | None, level: int, source: str) -> _Raw:
    datasets = ms.get("datasets") or []
    if not datasets:
        raise UnreadableDataError(f"OME-Zarr {source} lists no datasets in its multiscales metadata")
    if level >= len(datasets):
        raise N2VError(
            f"OME-Zarr {source} has {len(datasets)} level(s) (0..{len(datasets) - 1}); level {level} does not exist"
        )
    try:
        arrays = [group[str(d["path"]).strip("/")] for d in datasets]
    except KeyError as exc:
        raise UnreadableDataError(f"OME-Zarr {source}: dataset {exc} listed in multiscales metadata is missing") from None
    arr = arrays[level]
    ndim = arr.ndim
    raw_axes = ms.get("axes")
    if raw_axes is None:  # NGFF 0.1/0.2: always 5D tczyx
        names: list[str] = list(CANONICAL) if ndim == 5 else []
        unit_list: list[str | None] = [None] * ndim
    else:
        names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in raw_axes]
        unit_list = [a.get("unit") if isinstance(a, dict) else None for a in raw_axes]
    if names and len(names) != ndim:
        raise UnreadableDataError(f"OME-Zarr {source}: {len(names)} axes in metadata but level {level} has {ndim} dimensions")
    problem = _axes_problem(raw_axes, names) if raw_axes is not None else None
    scale, trans = _transforms(datasets[level].get("coordinateTransformations"), ndim)
    gscale, gtrans = _transforms(ms.get("coordinateTransformations"), ndim)
    scale, trans = scale * gscale, trans * gscale + gtrans
    dims = tuple(names) if names and problem is None else None
    reader = _ZarrReader(arr, f"array {source.rstrip('/')}/{arr.basename}")
    info = SourceInfo(
        store_chunks=tuple(arr.chunks),
        shards=tuple(arr.shards) if arr.shards else None,
        levels=[tuple(a.shape) for a in arrays],
        nbytes_stored=_stored_bytes(arrays),
        dtype=str(arr.dtype),
    )
    return _Raw(
        _from_reader(reader, tuple(arr.shards or arr.chunks)),
        dims,
        "ome-zarr",
        source,
        scale=dict(enumerate(map(float, scale))),
        units={i: str(u) for i, u in enumerate(unit_list) if u},
        translation=dict(enumerate(map(float, trans))),
        ngff_version=version,
        info=info,
        attrs={"metadata_axes": names, "axes_problem": problem},
        rebuild=lambda ch: _from_reader(reader, ch),
    )


def _axes_problem(raw_axes: list[Any], names: list[str]) -> str | None:
    """What makes NGFF ``axes`` metadata unusable here, or None.

    Names must be distinct letters from ``tczyx``; a ``type`` that is one of
    NGFF's own (space, time, channel) must agree with the name.  Custom or
    missing types pass.
    """
    unknown = [n for n in names if n not in CANONICAL]
    if unknown:
        return f"unknown axis name(s) {', '.join(map(repr, unknown))} (known: t, c, z, y, x)"
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"repeated axis name(s) {', '.join(map(repr, repeated))}"
    for axis, name in zip(raw_axes, names):
        kind = axis.get("type") if isinstance(axis, dict) else None
        if isinstance(kind, str) and kind.lower() in _NGFF_TYPES.values() and kind.lower() != _NGFF_TYPES[name]:
            return f"axis {name!r} has type {kind!r}, expected {_NGFF_TYPES[name]!r}"
    return None


def _stored_bytes(arrays: Sequence[Any]) -> int | None:
    try:
        return int(sum(a.nbytes_stored() for a in arrays))
    except Exception:  # not every store can list its size
        return None


def _plain_zarr(arr: Any, source: str) -> _Raw:
    names = None
    dn = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")  # v3 / xarray's v2
    if dn and all(n and str(n).lower() in CANONICAL for n in dn) and len(set(dn)) == arr.ndim:
        names = tuple(str(n).lower() for n in dn)
    info = SourceInfo(
        store_chunks=tuple(arr.chunks),
        shards=tuple(arr.shards) if arr.shards else None,
        levels=[tuple(arr.shape)],
        nbytes_stored=_stored_bytes([arr]),
        dtype=str(arr.dtype),
    )
    reader = _ZarrReader(arr, f"array {source}")
    return _Raw(
        _from_reader(reader, tuple(arr.shards or arr.chunks)), names, "zarr", source, info=info,
        rebuild=lambda ch: _from_reader(reader, ch),
    )


# ----------------------------------------------------------------------------
# TIFF.
# ----------------------------------------------------------------------------


def _tiff_axes(letters: str) -> tuple[str, ...] | None:
    """Map tifffile axis letters to ours; None when any is unknown (Q, I, ...)."""
    letters = letters.upper()
    if "S" in letters and "C" not in letters:
        letters = letters.replace("S", "C")  # RGB samples are channels
    out = tuple(a.lower() for a in letters)
    return out if all(a in CANONICAL for a in out) and len(set(out)) == len(out) else None


def _tiff_metadata(tf: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Pixel sizes and units by axis name from OME-XML or ImageJ metadata."""
    scale: dict[str, float] = {}
    units: dict[str, str] = {}
    if tf.is_ome and tf.ome_metadata:
        try:
            root = ET.fromstring(tf.ome_metadata)
        except ET.ParseError:
            root = None
        elements = root.iter() if root is not None else iter(())
        pixels = next((e for e in elements if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
        if pixels is not None:
            for ax in "xyz":
                size = pixels.get(f"PhysicalSize{ax.upper()}")
                if size is not None:
                    scale[ax] = float(size)
                    units[ax] = pixels.get(f"PhysicalSize{ax.upper()}Unit", "µm")
            if pixels.get("TimeIncrement") is not None:
                scale["t"] = float(pixels.get("TimeIncrement"))
                units["t"] = pixels.get("TimeIncrementUnit", "s")
    elif tf.is_imagej:
        meta = tf.imagej_metadata or {}
        unit = meta.get("unit")
        tags = tf.pages.first.tags
        for ax, tag in (("x", "XResolution"), ("y", "YResolution")):
            if tag in tags and unit:
                num, den = tags[tag].value
                if num:
                    scale[ax] = den / num
        if "spacing" in meta:
            scale["z"] = float(meta["spacing"])
        if unit:
            units.update({ax: unit for ax in scale if ax in "zyx"})
        if meta.get("finterval"):
            scale["t"], units["t"] = float(meta["finterval"]), "second"
    units = {ax: _UNITS.get(str(u).lower(), str(u).lower()) for ax, u in units.items()}
    units = {ax: u for ax, u in units.items() if u in _NGFF_UNITS}  # drop 'pixel' and unknown names
    return scale, units


def _open_tiff(path: str, level: int, keep_open: bool = True) -> _Raw:
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tf:  # judged by _TiffReader below
            series = tf.series[0]
            nlevels = len(series.levels)
            if level >= nlevels:
                raise N2VError(f"TIFF {path} has {nlevels} level(s); level {level} does not exist")
            dims = _tiff_axes(series.axes)
            stated = tiff_stated_axes(tf, series)
            scale, units = _tiff_metadata(tf)
            levels = [tuple(lv.shape) for lv in series.levels]
            axes_letters = series.axes
        reader = _TiffReader(path, level, keep_open)
    except N2VError:
        raise
    except Exception as exc:
        raise UnreadableDataError(f"cannot read TIFF {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if len(axes_letters) != reader.ndim:  # tifffile squeezes differently: trust the shape
        dims, stated = None, None
    chunks = grow_chunks(reader.shape, reader.store_chunks, reader.dtype.itemsize, TIFF_CHUNK_BYTES)
    raw = _Raw(_from_reader(reader, chunks), dims, "tiff", path, rebuild=lambda ch: _from_reader(reader, ch))
    raw.stated = stated or ()  # () : the metadata states nothing (tifffile's guesses are not metadata)
    if dims is not None:
        # level > 0 of a pyramid: pixel sizes grow by the level's downsampling
        f = {d: levels[0][i] / reader.shape[i] for i, d in enumerate(dims)}
        raw.scale = {i: scale[d] * f[d] for i, d in enumerate(dims) if d in scale}
        raw.units = {i: units[d] for i, d in enumerate(dims) if d in units}
    raw.attrs["tiff_axes"] = axes_letters
    raw.attrs["reader"] = reader
    raw.attrs["tiff_scale"], raw.attrs["tiff_units"] = scale, units
    raw.info = SourceInfo(reader.store_chunks, None, levels, Path(path).stat().st_size, str(reader.dtype))
    return raw


def _open_tiff_stack(files: list[str], source: str, axes: Any) -> _Raw:
    """Stack same-shaped TIFFs along a new leading axis (``t`` unless ``axes`` says)."""
    first = _open_tiff(files[0], 0, keep_open=False)
    shape, dtype, chunks = first.data.shape, first.data.dtype, first.data.chunksize
    readers = [first.attrs["reader"]]
    for f in files[1:]:  # opens headers only: cheap even for thousands of files
        try:
            reader = _TiffReader(f, 0, keep_open=False)
        except N2VError:
            raise
        except Exception as exc:
            raise UnreadableDataError(f"cannot read TIFF {f}: {type(exc).__name__}: {_first_line(exc)}") from None
        if reader.shape != shape or reader.dtype != dtype:
            raise UnreadableDataError(
                f"TIFF {f} has shape {reader.shape} {reader.dtype} but {files[0]} has {shape} {dtype}: "
                "all files of a stack must match"
            )
        readers.append(reader)

    def stack(ch: tuple[int, ...]) -> da.Array:
        out = da.stack([_from_reader(r, ch[1:]) for r in readers], axis=0)
        return out.rechunk({0: ch[0]}) if ch[0] != 1 else out

    data = stack((1,) + tuple(chunks))
    if axes is not None:
        dims = parse_axes(axes, data.ndim)
        inner = dims[1:]
    else:
        inner = first.dims
        if inner is None:
            said = first.attrs["tiff_axes"]
            raise AxesError(f"cannot tell the axes of the TIFFs in {source} (tifffile says {said!r}); {ASK_AXES}")
        if "t" in inner:
            raise AxesError(f"the TIFFs in {source} already have a t axis, so the stacking axis is unclear; {ASK_AXES}")
        dims = ("t",) + inner
    raw = _Raw(data, dims, "tiff", source, rebuild=stack)
    raw.stated = (None,) + tuple(first.stated) if first.stated else ()  # the stacking axis is ours to name
    sc, un = first.attrs["tiff_scale"], first.attrs["tiff_units"]
    raw.scale = {i + 1: sc[d] for i, d in enumerate(inner) if d in sc}
    raw.units = {i + 1: un[d] for i, d in enumerate(inner) if d in un}
    size = sum(Path(f).stat().st_size for f in files)
    raw.info = SourceInfo(
        (1,) + tuple(first.info.store_chunks or ()), None, [tuple(data.shape)], size, str(dtype)
    )
    return raw


# ----------------------------------------------------------------------------
# In-memory arrays and canonical order.
# ----------------------------------------------------------------------------


def _open_xarray(arr: xr.DataArray, axes: Any) -> _Raw:
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data), chunks="auto")
    names = tuple(str(d).lower() for d in arr.dims)
    dims = names if all(n in CANONICAL for n in names) and len(set(names)) == len(names) else None
    raw = _Raw(data, dims, "xarray", str(arr.attrs.get("source", "<xarray DataArray>")))
    # Keep our own attrs when the array came from open_image; else read uniform coords.
    scale, units, trans = arr.attrs.get("scale") or {}, arr.attrs.get("units") or {}, arr.attrs.get("translation") or {}
    for i, d in enumerate(arr.dims):
        key = str(d).lower()
        if key in scale or str(d) in scale:
            raw.scale[i] = float(scale.get(str(d), scale.get(key)))
        elif d in arr.coords and arr.sizes[d] > 1 and np.issubdtype(arr.coords[d].dtype, np.number):
            c = np.asarray(arr.coords[d].values, dtype=float)
            step = np.diff(c)
            if np.allclose(step, step[0]) and step[0] > 0:
                raw.scale[i], raw.translation[i] = float(step[0]), float(c[0])
        if key in trans or str(d) in trans:
            raw.translation[i] = float(trans.get(str(d), trans.get(key)))
        u = units.get(str(d), units.get(key)) or (arr.coords[d].attrs.get("units") if d in arr.coords else None)
        if u:
            raw.units[i] = str(u)
    raw.ngff_version = arr.attrs.get("ngff_version")
    return raw


def _rechunked(raw: _Raw, dims: tuple[str, ...], out_dims: tuple[str, ...], chunks: Any) -> da.Array:
    """The source's dask array with ``chunks`` (canonical order or by dim), read block-wise."""
    if isinstance(chunks, dict):
        by_dim = {str(k): v for k, v in chunks.items()}
    elif isinstance(chunks, (tuple, list)) and len(chunks) == len(out_dims):
        by_dim = dict(zip(out_dims, chunks))
    else:
        return raw.data.rechunk(chunks)  # any other dask chunk spec
    if not set(by_dim) <= set(dims):
        raise N2VError(f"chunks {chunks} name dims not in {''.join(out_dims)}")
    native = tuple(
        min(int(by_dim.get(d, raw.data.chunksize[i])), raw.data.shape[i]) or 1 for i, d in enumerate(dims)
    )
    return raw.rebuild(native) if raw.rebuild is not None else raw.data.rechunk(native)


def _canonical(raw: _Raw, axes: Any, chunks: Any = None) -> tuple[xr.DataArray, SourceInfo]:
    ndim = raw.data.ndim
    if axes is not None:
        dims = parse_axes(axes, ndim)
        stated = raw.stated if raw.stated is not None else raw.dims
        check_axes_agree(dims, stated or None, raw.source, raw.data.shape)
    elif raw.dims is not None:
        dims = raw.dims
    elif raw.attrs.get("axes_problem"):  # before the 2D default: wrong metadata must not pass as yx
        said = ", ".join(raw.attrs.get("metadata_axes") or [])
        raise AxesError(f"OME-Zarr {raw.source}: invalid axes metadata ({said}): {raw.attrs['axes_problem']}; "
                       f"{ASK_AXES} to read it anyway")
    elif ndim == 2:
        dims = ("y", "x")  # the only unambiguous default
    else:
        hint = ""
        if raw.attrs.get("tiff_axes"):
            hint = f" (tifffile says {raw.attrs['tiff_axes']!r})"
        elif raw.attrs.get("metadata_axes"):
            hint = f" (metadata says {''.join(raw.attrs['metadata_axes'])!r})"
        raise AxesError(f"cannot tell the axes of {raw.source}, shape {tuple(raw.data.shape)}{hint}; {ASK_AXES}")
    if raw.format == "tiff" and axes is not None and raw.attrs.get("tiff_scale") and raw.dims is None:
        # metadata keyed by tifffile letters we could not map: now we know the names
        sc, un = raw.attrs["tiff_scale"], raw.attrs["tiff_units"]
        raw.scale = {i: sc[d] for i, d in enumerate(dims) if d in sc}
        raw.units = {i: un[d] for i, d in enumerate(dims) if d in un}
    order = [dims.index(d) for d in CANONICAL if d in dims]
    out_dims = tuple(dims[i] for i in order)
    data = raw.data
    if chunks is not None:
        data = _rechunked(raw, dims, out_dims, chunks)
    data = data.transpose(order) if order != list(range(ndim)) else data
    attrs = {
        "scale": {dims[i]: float(raw.scale.get(i, 1.0)) for i in order},
        "units": {dims[i]: raw.units[i] for i in order if i in raw.units},
        "translation": {dims[i]: float(raw.translation.get(i, 0.0)) for i in order},
        "source": raw.source,
        "format": raw.format,
        "ngff_version": raw.ngff_version,
    }
    info = raw.info
    if info.store_chunks is not None and len(info.store_chunks) == ndim:
        info.store_chunks = tuple(info.store_chunks[i] for i in order)
    if info.shards is not None:
        info.shards = tuple(info.shards[i] for i in order)
    info.levels = [tuple(s[i] for i in order) for s in info.levels if len(s) == ndim] or [tuple(data.shape)]
    info.dtype = info.dtype or str(data.dtype)
    info.stored_axes = "".join(dims)
    out = xr.DataArray(data, dims=out_dims, attrs=attrs)
    out.name = None  # xarray would take the dask task name
    return out, info
