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

from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import AxesError, ConfigError, InputNotFoundError, N2VError, UnreadableDataError
from .formats import open_with_bioio
from .listing import folder_images
from .metadata_axes import ASK_AXES, CANONICAL, check_axes_agree, parse_axes
from .readers import Raw, SourceInfo, not_one_image
from .stores import ZARR_MARKERS, is_url
from .tiff import TIFF_SUFFIXES, open_tiff, open_tiff_stack
from .zarr_read import open_zarr

# Private key of ``DataArray.encoding`` under which :func:`open_image` hands
# over the zarr array it opened (see :func:`store_array`).
_STORE_ARRAY = "_n2v_chunked_store_array"


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
        raise ConfigError(f"level must be >= 0, got {level}")
    if isinstance(source, xr.DataArray):
        raw = _open_xarray(source, axes)
    elif isinstance(source, da.Array):
        raw = Raw(source, None, "dask", "<dask array>")
    elif isinstance(source, np.ndarray):
        raw = Raw(da.from_array(source, chunks="auto"), None, "numpy", "<numpy array>")
    elif isinstance(source, (str, Path)):
        raw = _open_path(str(source), axes, level, storage_options or {})
    else:
        raise N2VError(f"cannot open a {type(source).__name__}: give a path, URL, numpy, dask or xarray array")
    if level and raw.format not in ("ome-zarr", "tiff"):
        raise ConfigError(f"{raw.source} has a single resolution level; level {level} does not exist")
    return _canonical(raw, axes, chunks)


def _open_path(source: str, axes: Any, level: int, storage_options: dict[str, Any]) -> Raw:
    if source.startswith("file://"):
        source = source[len("file://"):]  # local: same code path as plain paths
    if is_url(source):
        if source.lower().rstrip("/").endswith(TIFF_SUFFIXES):
            raise N2VError(f"TIFF files are read from local paths only; copy {source} to a local disk")
        try:
            return open_zarr(source, level, storage_options, url=True)
        except UnreadableDataError:
            _refuse_folder(source, storage_options)  # a prefix of images is a collection, not an unreadable image
            raise
    if any(ch in source for ch in "*?["):
        files = _tiffs_or_refuse(source)
        if not files:
            raise InputNotFoundError(f"no TIFF files match {source}")
        return open_tiff_stack(files, source, axes)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"input not found: {source}")
    path = path.resolve()
    if path.is_dir():
        if any((path / m).exists() for m in ZARR_MARKERS):
            return open_zarr(str(path), level, storage_options, url=False)
        files = _tiffs_or_refuse(str(path))
        if files:
            return open_tiff_stack(files, str(path), axes)
        raise UnreadableDataError(
            f"{path} is a directory but neither a Zarr store (no zarr.json/.zgroup/.zarray) nor a folder of TIFFs"
        )
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return open_tiff(str(path), level)
    if path.name in ZARR_MARKERS:  # e.g. img.zarr/zarr.json: the node it describes
        return open_zarr(str(path.parent), level, storage_options, url=False)
    return open_with_bioio(str(path), level)  # PNG, JPEG, vendor formats: the optional [formats] extra


def _tiffs_or_refuse(source: str) -> list[str]:
    """The TIFFs of a local folder or glob, which stack into one image; refuse a mix of images (a collection)."""
    images = folder_images(source)
    files = [path for _, path in images if path.lower().endswith(TIFF_SUFFIXES)]
    if len(files) < len(images):
        raise not_one_image(source, f"a set of {len(images)} images, not all TIFFs", images[0][1])
    return files


def _refuse_folder(source: str, storage_options: dict[str, Any]) -> None:
    """Refuse a URL prefix (or glob) of images as a collection; return where it holds none."""
    try:
        images = folder_images(source, storage_options)
    except Exception:  # listing failed too: the error of opening it says more
        return
    if images:
        raise not_one_image(source, f"a set of {len(images)} images", images[0][1])


# ----------------------------------------------------------------------------
# In-memory arrays and canonical order.
# ----------------------------------------------------------------------------


def _open_xarray(arr: xr.DataArray, axes: Any) -> Raw:
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data), chunks="auto")
    names = tuple(str(d).lower() for d in arr.dims)
    dims = names if all(n in CANONICAL for n in names) and len(set(names)) == len(names) else None
    raw = Raw(data, dims, "xarray", str(arr.attrs.get("source", "<xarray DataArray>")), store_array=store_array(arr))
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


def _rechunked(raw: Raw, dims: tuple[str, ...], out_dims: tuple[str, ...], chunks: Any) -> da.Array:
    """The source's dask array with ``chunks`` (canonical order or by dim), read block-wise."""
    if isinstance(chunks, dict):
        by_dim = {str(k): v for k, v in chunks.items()}
    elif isinstance(chunks, (tuple, list)) and len(chunks) == len(out_dims):
        by_dim = dict(zip(out_dims, chunks))
    else:
        return raw.data.rechunk(chunks)  # any other dask chunk spec
    if not set(by_dim) <= set(dims):
        raise ConfigError(f"chunks {chunks} name dims not in {''.join(out_dims)}")
    native = tuple(
        min(int(by_dim.get(d, raw.data.chunksize[i])), raw.data.shape[i]) or 1 for i, d in enumerate(dims)
    )
    return raw.rebuild(native) if raw.rebuild is not None else raw.data.rechunk(native)


def _canonical(raw: Raw, axes: Any, chunks: Any = None) -> tuple[xr.DataArray, SourceInfo]:
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
    if raw.store_array is not None and order == list(range(ndim)):  # same values, only the dask chunks may differ
        out.encoding[_STORE_ARRAY] = (data.name, raw.store_array)
    return out, info


def store_array(x: xr.DataArray) -> Any:
    """The zarr array that :func:`open_image` read ``x`` from, while ``x`` still holds exactly its data.

    Readers that can read the store directly (the patch sampler) use it
    instead of the dask graph.  Anything done to the array afterwards
    (selection, arithmetic, transposition) gives another dask name, and then
    there is no store array to hand over.

    Returns
    -------
    zarr.Array or None
    """
    held = x.encoding.get(_STORE_ARRAY)
    if held is None or not isinstance(x.data, da.Array):
        return None
    name, array = held
    return array if x.data.name == name and tuple(x.shape) == tuple(array.shape) else None
