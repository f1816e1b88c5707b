"""``info`` and ``convert``: describe any readable source, or turn it into OME-Zarr.

Conversion is lazy end to end: :func:`~n2v_chunked.io.sources.open_image` gives a
dask array over the store's chunks (TIFF strips/tiles through tifffile's Zarr
store) and :func:`~n2v_chunked.io.ome.write_ome_zarr` streams it block by block,
so memory stays at a few blocks per thread whatever the file size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import ConfigError


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; None -> ``'unknown'``."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def parse_int_list(text: str | Sequence[int] | None, what: str = "value", minimum: int = 1) -> tuple[int, ...] | None:
    """Parse ``"1,256,256"`` (or a list from a YAML config) into a tuple of ints ``>= minimum``.

    The one parser of the integer lists of the command line (``--chunks``, ``--shards``, ``--patch``,
    ``--halo``) and of the Python API.

    Raises
    ------
    ConfigError
        Not integers, or one below ``minimum`` (the message names ``what``).
    """
    if text is None:
        return None
    items = text.replace("x", ",").split(",") if isinstance(text, str) else list(text)
    try:
        out = tuple(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers like 1,256,256; got {text!r}") from None
    if not out or any(v < minimum for v in out):
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ConfigError(f"{what} must be {kind} integers; got {text!r}")
    return out


def info(
    source: Any, axes: str | None = None, level: int = 0, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Describe a source without reading its pixels.

    Returns
    -------
    dict
        ``format``, ``ngff_version``, ``source``, ``axes`` (canonical order, as
        the shape), ``stored_axes`` (the order ``--axes`` refers to), ``shape``, ``dtype``,
        ``chunks`` and ``shards`` (as stored), ``levels`` (shapes), ``level``,
        ``scale``, ``units``, ``translation``, ``bytes_in_memory`` (the opened
        level), ``bytes_on_disk`` (all levels; None if unknown) and
        ``complete`` (an n2v-chunked output's flag; None for other sources).
    """
    from .sources import open_image_info

    arr, si = open_image_info(source, axes, level, storage_options=storage_options)
    return {
        "complete": _n2v_complete(arr.attrs["source"], storage_options) if arr.attrs["format"] == "ome-zarr" else None,
        "source": arr.attrs["source"],
        "format": arr.attrs["format"],
        "ngff_version": arr.attrs["ngff_version"],
        "axes": "".join(arr.dims),
        "stored_axes": si.stored_axes,
        "shape": tuple(int(s) for s in arr.shape),
        "dtype": si.dtype or str(arr.dtype),
        "chunks": si.store_chunks,
        "shards": si.shards,
        "levels": si.levels,
        "level": level,
        "scale": dict(arr.attrs["scale"]),
        "units": dict(arr.attrs["units"]),
        "translation": dict(arr.attrs["translation"]),
        "bytes_in_memory": int(math.prod(arr.shape) * arr.dtype.itemsize),
        "bytes_on_disk": si.stored_bytes(),
    }


def _n2v_complete(source: str, storage_options: dict[str, Any] | None) -> bool | None:
    """The ``complete`` flag of an n2v_chunked output; None for other stores."""
    import zarr

    from .objects import zarr_store

    try:
        meta = zarr.open_group(store=zarr_store(source, read_only=True, options=storage_options), mode="r").attrs.get(
            "n2v_chunked")
    except Exception:  # a level path or a foreign layout: nothing to report
        return None
    return bool(meta.get("complete")) if isinstance(meta, dict) else None


def _stored_note(d: dict[str, Any]) -> str:
    """Where the stored order differs, say so: ``--axes`` is read in that order."""
    stored = d.get("stored_axes") or d["axes"]
    return "" if stored == d["axes"] else f"  (stored as {stored}: the order --axes refers to)"
def written_chunks(source: str, level: int = 0) -> tuple[int, int] | None:
    """(stored, total) chunks (shards when sharded) of one level of an OME-Zarr; None if unknown.

    An unfinished output is mostly empty, so its size on disk says nothing
    about the image; the share of chunks written says how far it got.
    """
    import zarr

    from .objects import zarr_store

    try:
        group = zarr.open_group(store=zarr_store(source, read_only=True), mode="r")
        attrs = group.attrs.asdict()
        ms = (attrs.get("ome", attrs)).get("multiscales")[0]
        arr = group[ms["datasets"][level]["path"]]
        return int(arr.nchunks_initialized), int(arr.nchunks)
    except Exception:  # not an OME-Zarr layout we know: say nothing rather than guess
        return None


def format_info(d: dict[str, Any]) -> str:
    """The text ``n2v-chunked info`` prints for :func:`info`'s dict."""

    def tup(t: Sequence[int] | None) -> str:
        return "none" if t is None else " x ".join(str(v) for v in t)

    scale = ", ".join(
        f"{k}={v:g}{' ' + d['units'][k] if k in d['units'] else ''}" for k, v in d["scale"].items()
    )
    trans = ", ".join(f"{k}={v:g}" for k, v in d["translation"].items() if v)
    lines = [
        f"source:       {d['source']}",
        f"format:       {d['format']}" + (f" (NGFF {d['ngff_version']})" if d["ngff_version"] else ""),
        f"axes:         {d['axes']}" + _stored_note(d),
        f"shape:        {tup(d['shape'])}" + (f"  (level {d['level']})" if d["level"] else ""),
        f"dtype:        {d['dtype']}",
        f"chunks:       {tup(d['chunks'])}",
        f"shards:       {tup(d['shards'])}",
        f"levels:       {len(d['levels'])}",
    ]
    lines += [f"  {i}: {tup(s)}" for i, s in enumerate(d["levels"])]
    lines.append(f"scale:        {scale}")
    if trans:
        lines.append(f"translation:  {trans}")
    lines.append(f"in memory:    {human_bytes(d['bytes_in_memory'])}")
    on_disk = human_bytes(d["bytes_on_disk"])
    if d.get("complete") is False:
        written = written_chunks(d["source"], d["level"])
        if written is not None:
            share = 100.0 * written[0] / max(written[1], 1)
            on_disk += f" (INCOMPLETE: {written[0]} of {written[1]} chunks of level {d['level']} written, {share:.0f}%)"
        else:
            on_disk += " (INCOMPLETE)"
    elif d["bytes_on_disk"]:
        ratio = d["bytes_in_memory"] / d["bytes_on_disk"]
        on_disk += f" (all levels; level {d['level']} is {ratio:.1f}x that in memory)"
    lines.append(f"on disk:      {on_disk}")
    if d.get("complete") is not None:
        state = "complete" if d["complete"] else "INCOMPLETE (unfinished or failed write)"
        lines.append(f"written by:   n2v-chunked, {state}")
    return "\n".join(lines)


def _tally(values: list[str]) -> str:
    """``zyx`` when all agree, else ``mixed: zyx (380), czyx (4)``."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{v} ({n})" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_collection(coll: Any) -> str:
    """The text ``n2v-chunked info`` prints for a collection (:class:`~n2v_chunked.io.collections.Collection`):
    a summary in :func:`format_info`'s style, then one row per image."""
    images = coll.images
    what = {"plate": "HCS plate", "well": "plate well", "container": "bioformats2raw container",
            "folder": "folder of images"}[coll.kind]
    if coll.name:
        what += f" {coll.name!r}"
    if coll.ngff_version:
        what += f" (NGFF {coll.ngff_version})"
    count = f"{len(images)}"
    if coll.kind == "plate":
        count += f" ({len(coll.wells)} wells)"
    if coll.selection is not None:
        count += f", selected by --select {coll.selection} from {coll.total}"
    lines = [
        f"source:       {coll.source}",
        f"collection:   {what}",
        f"images:       {count}",
        f"axes:         {_tally([im.axes for im in images])}",
        f"channels:     {_tally([str(im.channels) for im in images])}",
        f"dtype:        {_tally([im.dtype for im in images])}",
        f"in memory:    {human_bytes(coll.nbytes)}" + (f"  (level {coll.level})" if coll.level else ""),
        "",
    ]
    named = coll.kind == "container" and any(im.label for im in images)
    header = ["image"] + (["series name"] if named else []) + ["axes", "channels", "shape", "dtype", "in memory"]
    rows = [[im.name] + ([im.label] if named else []) + [im.axes, str(im.channels), " x ".join(map(str, im.shape)),
                                                          im.dtype, human_bytes(im.nbytes)] for im in images]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    if coll.complete is not None:
        state = "complete" if coll.complete else "INCOMPLETE (unfinished or failed write; predict --resume finishes it)"
        lines.insert(7, f"written by:   n2v-chunked, {state}")
    return "\n".join(lines)


def convert(
    source: Any,
    out: str,
    *,
    axes: str | None = None,
    level: int = 0,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    ngff_version: str = "0.5",
    dtype: Any = None,
    overwrite: bool = False,
    pyramid: bool = True,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Convert any readable source to OME-Zarr, lazily and in bounded memory.

    Parameters
    ----------
    source : path, URL or array
        Anything :func:`~n2v_chunked.io.sources.open_image` reads.
    out : str
        Output OME-Zarr location; must not be (inside) the input.
    axes, level
        As for ``open_image``.
    chunks, shards : sequence of int, optional
        Output chunk and shard shapes in canonical axis order.
    ngff_version : {"0.5", "0.4"}
        Output format.
    dtype : dtype-like, optional
        Output type; None keeps the input's (lossless).  Integer outputs are
        rounded and clipped.
    overwrite : bool
        Replace an existing Zarr output.
    pyramid : bool
        Add downsampled levels.
    progress : bool
        Progress bar on a terminal.
    storage_options : dict, optional
        fsspec options for URL inputs.

    Returns
    -------
    str
        The output location.
    """
    from .ome import check_dtype, check_shape_list, default_chunks, write_ome_zarr
    from .pyramid import write_block_shape
    from .sources import open_image

    probe = open_image(source, axes, level, storage_options=storage_options)
    dims, shape = tuple(probe.dims), tuple(probe.shape)
    out_dtype = check_dtype(probe.dtype if dtype is None else dtype)
    chunks = check_shape_list("chunks", chunks, dims) or default_chunks(shape, dims, out_dtype)
    chunks = tuple(min(c, max(1, s)) for c, s in zip(chunks, shape))
    shards = check_shape_list("shards", shards, dims)
    # Re-open so each write block is read straight from the store (no rechunk
    # that would hold every TIFF page a block spans).
    block = write_block_shape(shape, chunks, shards, out_dtype)
    data = open_image(source, axes, level, storage_options=storage_options, chunks=block)
    del probe
    provenance = {
        "command": "convert",
        "source": data.attrs["source"],
        "source_format": data.attrs["format"],
        "source_level": level,
    }
    return write_ome_zarr(
        out,
        data,
        dtype=out_dtype,
        chunks=chunks,
        shards=shards,
        ngff_version=ngff_version,
        pyramid=pyramid,
        overwrite=overwrite,
        provenance=provenance,
        progress=progress,
    )
