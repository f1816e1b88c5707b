"""Writing OME-Zarr: NGFF 0.5 (Zarr v3) by default, 0.4 (Zarr v2) on request.

An output is a group with a level-0 array ``"0"`` (and, after
:func:`build_pyramid`, levels ``"1"``, ``"2"``, ...) plus ``multiscales``
metadata that ``ome-zarr-py`` and napari read.  NGFF 0.5 stores it as group
attributes ``{"ome": {"version": "0.5", "multiscales": [...]}}``; 0.4 as
``{"multiscales": [{"version": "0.4", ...}]}``.

Every output carries ``attributes["n2v_chunked"] = {"complete": bool,
"version": ..., **provenance}``.  ``complete`` is written False at creation and
set True by :func:`mark_complete` only after every chunk and every pyramid
level has landed, so a crashed or interrupted job never looks finished.

Data types: float32 by default.  Integer outputs are rounded to the nearest
integer and clipped to the type's range (NaN becomes 0); float outputs are a
plain cast.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import N2VError, OutputExistsError
from .sources import CANONICAL, ZARR_MARKERS, grow_chunks, is_url, parse_axes

DEFAULT_CHUNK_BYTES = 2 * 2**20  # 1-4 MiB chunks: good for object stores and viewers
WRITE_BLOCK_BYTES = 8 * 2**20  # one dask task writes about this much (whole chunks)
MAX_BLOCKS_PER_PASS = 4096  # bound the dask graph (and its memory) for huge arrays
MAX_THREADS = 16  # bound memory on many-core machines: threads x a few blocks
PYRAMID_MIN_SIDE = 256  # automatic pyramids stop once y and x fit in one viewer tile
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


# ----------------------------------------------------------------------------
# Chunks, dtypes and paths.
# ----------------------------------------------------------------------------


def default_chunks(
    shape: Sequence[int], dims: Sequence[str], dtype: Any = "float32", target: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """A chunk shape of about ``target`` bytes: 1 along t and c, near-cubic in space.

    Spatial sides start at the next power of two of the array's size and the
    largest is halved until a chunk fits ``target``; sides are then clipped to
    the array.
    """
    itemsize = np.dtype(dtype).itemsize
    out = [1 if d in ("t", "c") else 2 ** math.ceil(math.log2(max(1, s))) for s, d in zip(shape, dims)]

    def nbytes() -> int:
        return math.prod(min(c, max(1, s)) for c, s in zip(out, shape)) * itemsize

    spatial = [i for i, d in enumerate(dims) if d not in ("t", "c")]
    while spatial and nbytes() > target:
        i = max(spatial, key=lambda j: (min(out[j], shape[j]), -j))
        if out[i] == 1:
            break
        out[i] //= 2
    return tuple(max(1, min(c, s)) for c, s in zip(out, shape))


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


def _local(path: str | os.PathLike[str]) -> Path | None:
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return None if is_url(s) else Path(s).expanduser().absolute()


def location(path: str | os.PathLike[str]) -> str:
    """``path`` as the store location zarr and fsspec use: absolute for local paths, URLs unchanged."""
    loc = _local(path)
    return str(loc) if loc is not None else str(path)


def check_not_input(out: str | os.PathLike[str], source: str | None) -> None:
    """Refuse to write onto (into, or above) a stored input.

    Parameters
    ----------
    out : str or Path
        The output location.
    source : str or None
        The input's ``attrs["source"]`` (a path, glob or URL); in-memory
        sources (``"<numpy array>"``) are ignored.
    """
    if not source or source.startswith("<"):
        return
    if any(c in source for c in "*?["):  # a glob: compare with its fixed leading folder
        parts = source.split("/")
        source = "/".join(parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]) or "/"
    a, b = _local(out), _local(source)
    if a is None or b is None:
        sa, sb = str(out).rstrip("/"), source.rstrip("/")
        clash = sa == sb or sa.startswith(sb + "/") or sb.startswith(sa + "/")
    else:
        a, b = a.resolve(), b.resolve()
        clash = a == b or b in a.parents or a in b.parents
    if clash:
        raise N2VError(f"refusing to write {out}: it is, contains or lies inside the input {source}")


def _prepare_location(path: str, overwrite: bool, storage_options: dict[str, Any]) -> None:
    """Check the output can be created; remove an old Zarr output if ``overwrite``.

    Everything is checked before anything is deleted, and only Zarr stores (or
    empty folders) are ever deleted: ``--overwrite`` must not eat a user's folder.
    """
    loc = _local(path)
    if loc is None:
        import fsspec

        fs, fpath = fsspec.core.url_to_fs(path, **storage_options)
        if fs.exists(fpath):
            if not overwrite:
                raise OutputExistsError(f"output {path} exists; pass --overwrite")
            if not any(fs.exists(f"{fpath.rstrip('/')}/{m}") for m in ZARR_MARKERS):
                raise N2VError(f"refusing to overwrite {path}: it is not a Zarr store")
            fs.rm(fpath, recursive=True)
        return
    if loc.exists() or loc.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {loc} exists; pass --overwrite")
        if loc.is_dir() and not loc.is_symlink():
            if any(loc.iterdir()) and not any((loc / m).exists() for m in ZARR_MARKERS):
                raise N2VError(f"refusing to overwrite {loc}: it is a non-empty folder but not a Zarr store")
        else:
            raise N2VError(f"refusing to overwrite {loc}: it is a file, not a Zarr store")
    ancestor = loc.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise N2VError(f"cannot create output {loc}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise N2VError(f"cannot create output {loc}: {ancestor} is not writable")
    if loc.exists():
        try:
            shutil.rmtree(loc)
        except OSError as exc:
            raise N2VError(f"cannot remove old output {loc}: {exc.strerror or exc}") from None


def _open_group(path: str, mode: str, storage_options: dict[str, Any] | None = None) -> Any:
    import zarr

    kw = {"storage_options": storage_options} if storage_options and _local(path) is None else {}
    try:
        return zarr.open_group(store=location(path), mode=mode, **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
        raise N2VError(f"no Zarr group at {path}: {type(exc).__name__}") from None
    except PermissionError as exc:
        raise N2VError(f"cannot open {path} for writing: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------
# Metadata.
# ----------------------------------------------------------------------------


def _multiscales_entry(
    dims: Sequence[str], units: dict[str, str], datasets: list[dict[str, Any]], name: str | None, version: str
) -> dict[str, Any]:
    axes = []
    for d in dims:
        ax: dict[str, Any] = {"name": d, "type": _AXIS_TYPES[d]}
        if d in units and d != "c":
            ax["unit"] = units[d]
        axes.append(ax)
    entry: dict[str, Any] = {"axes": axes, "datasets": datasets}
    if name:
        entry["name"] = name
    if version == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def _dataset(path: str, scale: Sequence[float], translation: Sequence[float]) -> dict[str, Any]:
    ct: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if any(t != 0 for t in translation):
        ct.append({"type": "translation", "translation": [float(t) for t in translation]})
    return {"path": path, "coordinateTransformations": ct}


def read_multiscales(group: Any) -> tuple[dict[str, Any], str]:
    """The first multiscales entry of an OME-Zarr group and its NGFF version."""
    attrs = group.attrs.asdict()
    if isinstance(attrs.get("ome"), dict) and attrs["ome"].get("multiscales"):
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if attrs.get("multiscales"):
        return attrs["multiscales"][0], str(attrs["multiscales"][0].get("version", "0.4"))
    raise N2VError(f"{group.store} has no OME-Zarr multiscales metadata")


def _multiscales_attrs(entry: dict[str, Any], version: str) -> dict[str, Any]:
    if version == "0.4":
        return {"multiscales": [entry]}
    entry = {k: v for k, v in entry.items() if k != "version"}
    return {"ome": {"version": "0.5", "multiscales": [entry]}}


def _write_multiscales(group: Any, entry: dict[str, Any], version: str) -> None:
    group.attrs.update(_multiscales_attrs(entry, version))


# ----------------------------------------------------------------------------
# Creating, completing.
# ----------------------------------------------------------------------------


def check_shape_list(what: str, values: Sequence[int] | None, dims: Sequence[str]) -> tuple[int, ...] | None:
    """Validate a chunk or shard shape: one positive int per dim (None passes)."""
    if values is None:
        return None
    values = tuple(int(v) for v in values)
    if len(values) != len(dims) or any(v < 1 for v in values):
        raise N2VError(f"{what} {list(values)} must give {len(dims)} positive sizes, one per axis {''.join(dims)}")
    return values


def check_dtype(dtype: Any) -> np.dtype:
    """A numeric NumPy dtype from a user's string, or a one-line :class:`N2VError`."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise N2VError(f"unknown dtype {dtype!r}: use e.g. float32, uint16, uint8") from None
    if dt.kind not in "uif" or dt.itemsize > 8:
        raise N2VError(f"dtype {dt} is not supported for images: use an integer or float type")
    return dt


def create_ome_zarr(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    dims: Sequence[str] | str,
    dtype: Any = "float32",
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    ngff_version: str = "0.5",
    scale: dict[str, float] | None = None,
    units: dict[str, str] | None = None,
    translation: dict[str, float] | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Create an empty OME-Zarr image (level 0 only), marked incomplete.

    Parameters
    ----------
    path : str or Path
        Output location: local path or fsspec URL.
    shape : sequence of int
        Level-0 shape, in the order of ``dims``.
    dims : str or sequence of str
        Axis names in canonical order (a subset of ``tczyx`` with y and x).
    dtype : dtype-like
        Stored data type (float32 by default).
    chunks : sequence of int, optional
        Chunk shape; :func:`default_chunks` if None.
    shards : sequence of int, optional
        Zarr v3 shard shape (a multiple of ``chunks``); NGFF 0.5 only.
    ngff_version : {"0.5", "0.4"}
        0.5 writes Zarr v3, 0.4 writes Zarr v2 with ``/`` chunk keys.
    scale, units, translation : dict, optional
        Physical pixel size, unit and origin by axis name.
    provenance : dict, optional
        Extra JSON entries for ``attributes["n2v_chunked"]``.
    overwrite : bool
        Replace an existing Zarr output at ``path``.
    name : str, optional
        Name stored in the multiscales metadata.
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    zarr.Array
        The writable level-0 array.
    """
    import zarr
    from zarr.codecs import BloscCodec

    from . import __version__

    ngff_version = str(ngff_version)
    if ngff_version not in ("0.4", "0.5"):
        raise N2VError(f"NGFF version must be 0.4 or 0.5, got {ngff_version}")
    dims = parse_axes(dims, len(shape))
    if [d for d in CANONICAL if d in dims] != list(dims):
        raise N2VError(f"axes {''.join(dims)} must be in the order tczyx for OME-Zarr")
    if "y" not in dims or "x" not in dims:
        raise N2VError(f"OME-Zarr needs y and x axes; got {''.join(dims)}")
    shape = tuple(int(s) for s in shape)
    dtype = check_dtype(dtype)
    chunks = check_shape_list("chunks", chunks, dims) or default_chunks(shape, dims, dtype)
    chunks = tuple(min(c, max(1, s)) for c, s in zip(chunks, shape))
    shards = check_shape_list("shards", shards, dims)
    if shards is not None:
        if ngff_version == "0.4":
            raise N2VError("shards need NGFF 0.5 (Zarr v3); drop --shards or use --ngff 0.5")
        if any(s % c for s, c in zip(shards, chunks)):
            raise N2VError(f"shards {list(shards)} must be multiples of chunks {list(chunks)}")
    path_s = location(path)
    _prepare_location(str(path), overwrite, storage_options or {})

    scale = scale or {}
    translation = translation or {}
    zarr_format = 2 if ngff_version == "0.4" else 3
    if zarr_format == 3:
        compressors: Any = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
        extra: dict[str, Any] = {"dimension_names": list(dims), "shards": shards}
    else:
        from numcodecs import Blosc

        compressors = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
        extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}  # NGFF 0.4 requires '/'
    kw = {"storage_options": storage_options} if storage_options and _local(path) is None else {}
    try:
        entry = _multiscales_entry(
            dims,
            units or {},
            [_dataset("0", [scale.get(d, 1.0) for d in dims], [translation.get(d, 0.0) for d in dims])],
            name,
            ngff_version,
        )
        # the group's metadata is written once, with the incomplete flag and the provenance a resume
        # needs, so a kill cannot leave a group without them
        attrs = _multiscales_attrs(entry, ngff_version)
        attrs["n2v_chunked"] = {"complete": False, "version": __version__, **(provenance or {})}
        group = zarr.open_group(store=path_s, mode="w-", zarr_format=zarr_format, attributes=attrs, **kw)
        arr = group.create_array(
            "0", shape=shape, dtype=dtype, chunks=chunks, compressors=compressors, fill_value=0, **extra
        )
    except OSError as exc:
        raise N2VError(f"cannot write output {path_s}: {exc.strerror or exc}") from None
    return arr


def mark_complete(
    path: str | os.PathLike[str], complete: bool = True, storage_options: dict[str, Any] | None = None
) -> None:
    """Set ``attributes["n2v_chunked"]["complete"]`` of the output at ``path``."""
    group = _open_group(str(path), "r+", storage_options)
    meta = dict(group.attrs.get("n2v_chunked") or {})
    meta["complete"] = bool(complete)
    group.attrs["n2v_chunked"] = meta


def is_complete(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """True only for an n2v_chunked output whose writer finished (False for foreign stores)."""
    group = _open_group(str(path), "r", storage_options)
    return bool((group.attrs.get("n2v_chunked") or {}).get("complete", False))


# ----------------------------------------------------------------------------
# Storing data.
# ----------------------------------------------------------------------------


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


def _distributed_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


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
    from .progress import Progress

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
    client = _distributed_client()
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
    group = _open_group(str(path), "r+", storage_options)
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
        datasets.append(_dataset(str(k), scale, trans))
        shapes.append(shape)
        prev = arr
    ms = dict(ms, datasets=datasets)
    _write_multiscales(group, ms, version)
    return shapes


# ----------------------------------------------------------------------------
# One call: create, store, pyramid, complete.
# ----------------------------------------------------------------------------


def write_ome_zarr(
    path: str | os.PathLike[str],
    data: xr.DataArray,
    *,
    dtype: Any = "float32",
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    ngff_version: str = "0.5",
    pyramid: bool = True,
    pyramid_levels: int | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a (lazy) DataArray to an OME-Zarr image, then mark it complete.

    Parameters
    ----------
    path : str or Path
        Output location (local path or fsspec URL); must not be the input.
    data : xarray.DataArray
        Dims from ``tczyx`` (as from :func:`~n2v_chunked.sources.open_image`);
        ``attrs`` ``scale``, ``units`` and ``translation`` are copied.
    dtype : dtype-like or None
        Output type (float32 by default; None keeps the data's type).  Integer
        types are rounded and clipped.
    chunks, shards, ngff_version, overwrite, provenance, name, storage_options
        As for :func:`create_ome_zarr`.
    pyramid : bool
        Add downsampled levels (:func:`build_pyramid`).
    pyramid_levels : int, optional
        Total number of levels; automatic if None.
    progress : bool
        Progress bar while writing.

    Returns
    -------
    str
        The output location.
    """
    from .sources import open_image

    if not isinstance(data, xr.DataArray):
        raise N2VError(f"write_ome_zarr needs an xarray.DataArray, got {type(data).__name__}")
    check_not_input(path, data.attrs.get("source"))
    data = open_image(data)  # canonical order, dask-backed, attrs filled in
    dims = tuple(data.dims)
    arr = create_ome_zarr(
        path, data.shape, dims, dtype=data.dtype if dtype is None else dtype, chunks=chunks, shards=shards,
        ngff_version=ngff_version, scale=data.attrs["scale"], units=data.attrs["units"],
        translation=data.attrs["translation"], provenance=provenance, overwrite=overwrite, name=name,
        storage_options=storage_options,
    )
    store_blocks(data.data, arr, progress=progress, desc="writing level 0")
    if pyramid:
        build_pyramid(path, pyramid_levels, progress=progress, storage_options=storage_options)
    mark_complete(path, True, storage_options)
    return location(path)
