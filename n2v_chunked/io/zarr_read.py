"""Reading Zarr and OME-Zarr (NGFF 0.1-0.5): plain arrays and groups, multiscales,
bioformats2raw layouts, a level array opened on its own, local or fsspec URLs."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import zarr

from ..errors import ConfigError, UnreadableDataError, first_line
from .metadata_axes import AXIS_TYPES, CANONICAL
from .ngff import ome_metadata
from .readers import ChunkReader, Raw, SourceInfo, from_reader, not_one_image
from .objects import diagnose, zarr_store

log = logging.getLogger("n2v_chunked")


class _ZarrReader(ChunkReader):
    """Reads a zarr array; names failing chunks by their store key."""

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


def open_zarr(source: str, level: int, storage_options: dict[str, Any], url: bool) -> Raw:
    """Open a Zarr array or group, an OME-Zarr image or one of its level arrays."""
    try:
        node = zarr.open(store=zarr_store(source, read_only=True, options=storage_options), mode="r")
    except Exception as exc:  # zarr's not-found errors, and fsspec backends' own (missing s3fs, credentials)
        problem = diagnose(source, exc) if url else None  # a missing bucket, refused credentials
        raise UnreadableDataError(problem or f"cannot open {source} as Zarr: {type(exc).__name__}: {first_line(exc)[:200]}") from None
    if isinstance(node, zarr.Array):
        parent = _parent_multiscales(source, storage_options)
        if parent is not None:
            group, ms, version, index = parent
            if level not in (0, index):
                raise ConfigError(f"{source} is level {index} of its OME-Zarr; do not also pass level {level}")
            return _open_multiscales(group, ms, version, index, source.rstrip("/").rsplit("/", 1)[0])
        return _plain_zarr(node, source)
    ms, version = _multiscales(node.attrs.asdict())
    if ms is None:
        _refuse_collection(node, source)
    if ms is None and _is_bioformats2raw(node.attrs.asdict()) and "0" in node:
        node = node["0"]  # bioformats2raw layout of one series: the image is the group "0"
        ms, version = _multiscales(node.attrs.asdict())
    if ms is not None:
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



def _refuse_collection(node: Any, source: str) -> None:
    """Refuse an HCS plate, a well, or a bioformats2raw container of several images: they are not one image.

    Taking their first image instead would silently train on, or denoise, a
    fraction of the data (``io/collections.py`` lists them for ``info``).
    """
    attrs, root = node.attrs.asdict(), source.rstrip("/")
    plate, _ = ome_metadata(attrs, "plate")
    well, _ = ome_metadata(attrs, "well")
    if isinstance(plate, dict):  # before bioformats2raw: bioformats2raw writes a screen as a plate
        wells = [str(w.get("path", "")).strip("/") for w in plate.get("wells") or []]
        example = None
        if wells:
            try:
                first, _ = ome_metadata(node[wells[0]].attrs.asdict(), "well")
                example = f"{root}/{wells[0]}/{str(first['images'][0]['path']).strip('/')}"
            except Exception:  # a damaged well: the refusal still stands, without an example
                pass
        raise not_one_image(source, f"an HCS plate of {len(wells)} well(s)", example)
    if isinstance(well, dict):
        fields = [str(i.get("path", "")).strip("/") for i in well.get("images") or []]
        raise not_one_image(source, f"a plate well of {len(fields)} field(s)", f"{root}/{fields[0]}" if fields else None)
    if _is_bioformats2raw(attrs) and "1" in node:
        raise not_one_image(source, "a bioformats2raw container of several images (series 0, 1, ...)", f"{root}/0")


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


def _parent_multiscales(source: str, storage_options: dict[str, Any]) -> tuple[Any, dict, str | None, int] | None:
    """If ``source`` is a level array of an OME-Zarr, return its group and level index."""
    stripped = source.rstrip("/")
    if "/" not in stripped:
        return None
    parent, name = stripped.rsplit("/", 1)
    try:
        group = zarr.open_group(store=zarr_store(parent, read_only=True, options=storage_options), mode="r")
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


def _open_multiscales(group: Any, ms: dict[str, Any], version: str | None, level: int, source: str) -> Raw:
    # every way of naming an image (its group, a level array, a URL) comes through here, so all are flagged alike
    if (group.attrs.get("n2v_chunked") or {}).get("complete") is False:
        log.warning("%s is marked incomplete: it is an unfinished or failed n2v-chunked output", source)
    datasets = ms.get("datasets") or []
    if not datasets:
        raise UnreadableDataError(f"OME-Zarr {source} lists no datasets in its multiscales metadata")
    if level >= len(datasets):
        raise ConfigError(
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
        stored_bytes=lambda: _stored_bytes(arrays),
        dtype=str(arr.dtype),
    )
    return Raw(
        from_reader(reader, tuple(arr.shards or arr.chunks)),
        dims,
        "ome-zarr",
        source,
        scale=dict(enumerate(map(float, scale))),
        units={i: str(u) for i, u in enumerate(unit_list) if u},
        translation=dict(enumerate(map(float, trans))),
        ngff_version=version,
        info=info,
        attrs={"metadata_axes": names, "axes_problem": problem},
        rebuild=lambda ch: from_reader(reader, ch),
        store_array=arr,
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
        if isinstance(kind, str) and kind.lower() in AXIS_TYPES.values() and kind.lower() != AXIS_TYPES[name]:
            return f"axis {name!r} has type {kind!r}, expected {AXIS_TYPES[name]!r}"
    return None


def _stored_bytes(arrays: Sequence[Any]) -> int | None:
    try:
        return int(sum(a.nbytes_stored() for a in arrays))
    except Exception:  # not every store can list its size
        return None


def _plain_zarr(arr: Any, source: str) -> Raw:
    names = None
    dn = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")  # v3 / xarray's v2
    if dn and all(n and str(n).lower() in CANONICAL for n in dn) and len(set(dn)) == arr.ndim:
        names = tuple(str(n).lower() for n in dn)
    info = SourceInfo(
        store_chunks=tuple(arr.chunks),
        shards=tuple(arr.shards) if arr.shards else None,
        levels=[tuple(arr.shape)],
        stored_bytes=lambda: _stored_bytes([arr]),
        dtype=str(arr.dtype),
    )
    reader = _ZarrReader(arr, f"array {source}")
    return Raw(
        from_reader(reader, tuple(arr.shards or arr.chunks)), names, "zarr", source, info=info,
        rebuild=lambda ch: from_reader(reader, ch), store_array=arr,
    )
