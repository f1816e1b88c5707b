"""Collections of images: HCS plates, bioformats2raw containers, folders and globs of images.

:func:`open_collection` lists a collection's images from their metadata
alone: no chunk of any image is read and no image is kept open, so listing a
96-well plate of four fields is a few hundred small JSON reads, made
concurrently (:data:`METADATA_THREADS`) because on an object store each is a
round trip.  Each image is opened with
:func:`~n2v_chunked.io.sources.open_image_info`, the reader every command
uses, so a collection's image is read exactly as the same image given alone.

Layouts (NGFF 0.4 and 0.5; local paths and object-store URLs alike):

* ``plate``: an HCS plate, plate -> wells -> fields, each field a multiscale
  image; images are named ``ROW/COLUMN/FIELD`` (``B/3/0``) as stored.
* ``well``: one well of a plate, its fields named by their paths.
* ``container``: bioformats2raw's layout, one image per series (``0/``,
  ``1/``, ...), named by index, with the series names of
  ``OME/METADATA.ome.xml`` where it has them.
* ``folder``: a folder, URL prefix or glob of images of any shapes, sizes and
  dtypes (OME-Zarr, Zarr, TIFF, and what the ``[formats]`` extra reads),
  named by their paths relative to the folder.  A folder of TIFFs that all
  share one shape and dtype is, as before, also one image (a stack); the
  other commands read it so.

Every other command refuses a collection with one line
(:func:`~n2v_chunked.io.readers.not_one_image`); this module is what ``info``
lists, what ``--select`` narrows (:func:`select_images`), and what training will
check with :func:`check_consistent`.

Neither ome-zarr-py nor ome-zarr-models is used here: ome-zarr-models
validates a plate by loading every well and image model one after another and
refuses data that bends the specification; ome-zarr-py's plate reader builds
one stitched pyramid, which needs every field to have one shape.  This listing
needs only the paths that plate and well metadata name
(:func:`~n2v_chunked.io.ngff.ome_metadata`) and reads each image with the
project's own reader.  The tests check it against plates and containers that
ome-zarr-py writes and reads and ome-zarr-models validates.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import CollectionError, ConfigError, InputNotFoundError, UnreadableDataError
from . import objects
from .ngff import ome_metadata
from .listing import GLOB, METADATA_THREADS, folder_images, join, map_concurrently, strip_file
from .sources import open_image_info
from .stores import ZARR_MARKERS, is_url


#: Metadata reads in flight while listing (each is one round trip on an object store).
KINDS = ("plate", "well", "container", "folder")
#: A folder written by ``predict`` records its run here (a plate or container in its root's ``n2v_chunked`` attributes).
RECORD = ".n2v_chunked.json"
_RANGE = re.compile(r"(\d+)-(\d+)")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image of a collection, as its metadata describes it.

    Attributes
    ----------
    name : str
        Stable name inside the collection: ``B/3/0`` (well row/column/field),
        ``2`` (series index), or a path relative to the folder.
    path : str
        Local path or URL that :func:`~n2v_chunked.io.sources.open_image` opens.
    shape : tuple of int
        Shape of the listed level, canonical axis order.
    axes : str
        Canonical axes (a subset of ``tczyx``).
    dtype : str
        Stored data type.
    format : str
        ``ome-zarr``, ``zarr``, ``tiff``, ... (as ``open_image`` reports it).
    label : str
        Series name (containers), well (plates, ``B3``), or empty.
    scale : dict
        Pixel size by axis.
    keys : tuple of str
        What ``--select`` patterns are matched against, besides ``name``.
    index : int or None
        Series index (containers only): ``--select 0-3`` picks by range.
    ngff_version : str or None
        The image's NGFF version (OME-Zarr images only).
    chunks : tuple of tuple of int
        Chunk sizes along each axis (dask style), as read: the training
        sampler plans its blocks from them without opening the image again.
    """

    name: str
    path: str
    shape: tuple[int, ...]
    axes: str
    dtype: str
    format: str
    label: str = ""
    scale: dict[str, float] = dataclasses.field(default_factory=dict)
    keys: tuple[str, ...] = ()
    index: int | None = None
    ngff_version: str | None = None
    chunks: tuple[tuple[int, ...], ...] = ()

    @property
    def channels(self) -> int:
        """Size of the channel axis (1 without one)."""
        return self.shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the listed level in memory."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Collection:
    """The images of a plate, well, container or folder, listed from metadata.

    Attributes
    ----------
    source : str
        The collection as given.
    kind : str
        One of :data:`KINDS`.
    images : tuple of ImageEntry
        In the collection's order (plate metadata's wells, then each well's
        fields; series index; natural order of paths).
    ngff_version : str or None
        NGFF version of the plate, well or container metadata.
    name : str or None
        The plate's name, where its metadata has one.
    level : int
        Resolution level the shapes are of.
    total : int
        Images in the whole collection, before any selection.
    selection : str or None
        The ``--select`` patterns that picked ``images``.
    complete : bool or None
        An output of ``n2v-chunked predict``: whether every image of it was
        written (its root's flag); None for other collections.
    """

    source: str
    kind: str
    images: tuple[ImageEntry, ...]
    ngff_version: str | None = None
    name: str | None = None
    level: int = 0
    total: int = 0
    selection: str | None = None
    complete: bool | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of all listed images in memory (at ``level``)."""
        return sum(im.nbytes for im in self.images)

    @property
    def wells(self) -> list[str]:
        """Wells of the listed images of a plate, in order (``B3``, ...); empty for other kinds."""
        return list(dict.fromkeys(im.label for im in self.images)) if self.kind == "plate" else []


# ----------------------------------------------------------------------------
# What is a collection.
# ----------------------------------------------------------------------------


def _zarr_node(source: str, storage_options: dict[str, Any]) -> Any:
    """The Zarr group or array at ``source``; None where there is none (for a URL, maybe a prefix of images)."""
    import zarr

    try:
        return zarr.open(store=objects.zarr_store(source, read_only=True, options=storage_options), mode="r")
    except Exception:  # nothing there, or not Zarr: the caller decides what that means
        return None


def _zarr_attrs(source: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """Attributes of the Zarr group at ``source``; None where there is no group."""
    import zarr

    node = _zarr_node(source, storage_options)
    return node.attrs.asdict() if isinstance(node, zarr.Group) else None


def collection_kind(source: Any, storage_options: dict[str, Any] | None = None) -> str | None:
    """What kind of collection ``source`` is (one of :data:`KINDS`), or None for one image.

    Reads the root's metadata only (for a local folder, nothing).  A folder
    is a collection here even where it holds same-shaped TIFFs that the other
    commands read as one stack.

    Raises
    ------
    InputNotFoundError
        A local path that does not exist.
    """
    if not isinstance(source, (str, Path)):
        return None  # arrays are images
    return _kind(str(source), storage_options or {})[0]


def _kind(source: str, options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """:func:`collection_kind` and the root group's attributes (read once: the listing needs them too)."""
    import zarr

    s = strip_file(source)
    if GLOB.search(s):
        return "folder", {}
    if not is_url(s):
        path = Path(s).expanduser()
        if not path.exists():
            raise InputNotFoundError(f"input not found: {source}")
        if not path.is_dir():
            return None, {}
        if not any((path / m).exists() for m in ZARR_MARKERS):
            return "folder", {}
    node = _zarr_node(s, options)
    if not isinstance(node, zarr.Group):
        return ("folder" if node is None and is_url(s) else None), {}
    attrs = node.attrs.asdict()
    if ome_metadata(attrs, "multiscales")[0]:
        return None, attrs
    if isinstance(ome_metadata(attrs, "plate")[0], dict):
        return "plate", attrs
    if isinstance(ome_metadata(attrs, "well")[0], dict):
        return "well", attrs
    if ome_metadata(attrs, "bioformats2raw.layout")[0] is not None:
        return "container", attrs
    return None, attrs


# ----------------------------------------------------------------------------
# Listing.
# ----------------------------------------------------------------------------


def open_collection(
    source: Any,
    *,
    axes: str | None = None,
    level: int = 0,
    select: str | Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    threads: int = METADATA_THREADS,
) -> Collection:
    """List the images of a plate, well, container, folder or glob from their metadata.

    Parameters
    ----------
    source : str or Path
        Local path, glob, or URL of the collection.
    axes : str, optional
        Stored axes of every image, for images whose metadata states none
        (as ``--axes`` of a single image).
    level : int
        Resolution level whose shapes are listed; every image must have it.
    select : str or sequence of str, optional
        ``--select`` patterns (:func:`select_images`).
    storage_options : dict, optional
        Object-store options for URLs.
    threads : int
        Metadata reads in flight.

    Returns
    -------
    Collection

    Raises
    ------
    N2VError
        ``source`` is one image (not a collection), lists no images, or one of
        its images cannot be opened (the error names it).
    """
    s, options = strip_file(str(source)), storage_options or {}
    kind, attrs = _kind(s, options) if isinstance(source, (str, Path)) else (None, {})
    if kind is None:
        raise CollectionError(f"{source} is one image, not a collection (plate, container, folder or glob of images): "
                              "describe it with `n2v-chunked info` without --select")
    listing = {"plate": _plate, "well": _well, "container": _container, "folder": _folder}[kind]
    items, meta = listing(s, attrs, options, threads)
    if not items:
        raise UnreadableDataError(f"{source} holds no images")
    total, patterns = len(items), None
    if select is not None:  # before opening: an image left out is never read
        patterns = parse_selection(select)
        items = _pick(items, patterns, str(source))

    complete = _written_complete(s, kind, attrs, options)

    def entry(item: _Item) -> ImageEntry | None:
        try:
            arr, si = open_image_info(item.path, axes, level, storage_options=options)
        except (InputNotFoundError, UnreadableDataError):
            if complete is False:  # a half-written output of predict: images not begun yet are left out
                return None
            raise
        return ImageEntry(item.name, item.path, tuple(int(n) for n in arr.shape), "".join(arr.dims),
                          si.dtype or str(arr.dtype), arr.attrs["format"], item.label,
                          dict(arr.attrs["scale"]), item.keys, item.index, arr.attrs["ngff_version"],
                          tuple(tuple(int(c) for c in cs) for cs in arr.data.chunks))

    found = map_concurrently(entry, items, threads)
    images = tuple(im for im in found if im is not None)
    if complete is False:
        missing = f" ({len(found) - len(images)} of its {len(found)} images not written yet)" if None in found else ""
        log.warning("%s is marked incomplete: it is an unfinished or failed n2v-chunked output%s", source, missing)
    if not images:
        raise UnreadableDataError(f"{source} holds no images")
    if kind == "container" and meta.get("ngff_version") is None:  # 0.4 states it on the images only
        meta["ngff_version"] = images[0].ngff_version
    selection = ",".join(patterns) if patterns else None
    return Collection(str(source), kind, images, level=level, total=total, selection=selection, complete=complete,
                      **meta)


def _written_complete(source: str, kind: str, attrs: dict[str, Any], options: dict[str, Any]) -> bool | None:
    """The ``complete`` flag of a collection ``predict`` wrote (:data:`RECORD` in a folder); None for others."""
    if kind == "folder":
        if GLOB.search(source):
            return None
        try:
            raw = objects.read(join(source, RECORD), options)
            attrs = {"n2v_chunked": json.loads(raw)} if raw else {}
        except Exception:  # unreadable or not JSON: not ours
            return None
    meta = attrs.get("n2v_chunked")
    return bool(meta.get("complete")) if isinstance(meta, dict) else None


@dataclasses.dataclass(frozen=True)
class _Item:
    """An image found by a listing, before it is opened."""

    name: str
    path: str
    label: str = ""
    keys: tuple[str, ...] = ()
    index: int | None = None


def _group_attrs(path: str, options: dict[str, Any], what: str) -> dict[str, Any]:
    attrs = _zarr_attrs(path, options)
    if attrs is None:
        raise UnreadableDataError(f"{what} {path} is missing or not a Zarr group")
    return attrs


Listed = tuple[list[_Item], dict[str, Any]]  # the images found, and the collection's own metadata


def _plate(source: str, attrs: dict[str, Any], options: dict[str, Any], threads: int) -> Listed:
    """Wells from the plate metadata, then each well's fields (one well read each, concurrently)."""
    plate, version = ome_metadata(attrs, "plate")
    wells = [str(w.get("path", "")).strip("/") for w in plate.get("wells") or [] if isinstance(w, dict)]
    per_well = map_concurrently(lambda w: _fields(join(source, w), options), wells, threads)
    items = []
    for well, fields in zip(wells, per_well):
        label = well.replace("/", "")  # B/3 -> B3
        for field in fields:
            items.append(_Item(f"{well}/{field}", join(source, f"{well}/{field}"), label,
                               (well, label, f"{label}/{field}")))
    return items, {"ngff_version": version, "name": plate.get("name")}


def _fields(well_path: str, options: dict[str, Any], attrs: dict[str, Any] | None = None) -> list[str]:
    well, _ = ome_metadata(attrs or _group_attrs(well_path, options, "plate well"), "well")
    if not isinstance(well, dict):
        raise UnreadableDataError(f"plate well {well_path} has no well metadata")
    return [str(i.get("path", "")).strip("/") for i in well.get("images") or [] if isinstance(i, dict)]


def _well(source: str, attrs: dict[str, Any], options: dict[str, Any], threads: int) -> Listed:
    _, version = ome_metadata(attrs, "well")
    items = [_Item(f, join(source, f)) for f in _fields(source, options, attrs)]
    return items, {"ngff_version": version}


def _container(source: str, attrs: dict[str, Any], options: dict[str, Any], threads: int) -> Listed:
    """Series ``0/``, ``1/``, ...: as the ``OME`` group's ``series`` lists them, else consecutive from 0.

    Names come from ``OME/METADATA.ome.xml``'s ``Image`` elements, in series order.
    """
    _, version = ome_metadata(attrs, "bioformats2raw.layout")
    ome_attrs = _zarr_attrs(join(source, "OME"), options) or {}
    series, _ = ome_metadata(ome_attrs, "series")
    if isinstance(series, list) and series:
        paths = [str(p).strip("/") for p in series]
    else:  # the layout's rule: consecutive integers from 0
        try:
            present = set(objects.listdir(source, options=options))
            exists: Callable[[str], bool] = present.__contains__
        except Exception:  # an HTTP server cannot list: probe 0/, 1/, ... one by one
            exists = lambda p: _zarr_attrs(join(source, p), options) is not None  # noqa: E731
        paths = []
        while exists(str(len(paths))):
            paths.append(str(len(paths)))
    names = _series_names(objects.read(join(source, "OME/METADATA.ome.xml"), options))
    items = []
    for i, p in enumerate(paths):
        label = names[i] if i < len(names) else ""
        items.append(_Item(p, join(source, p), label, (label,) if label else (), i))
    return items, {"ngff_version": version}


def _series_names(xml: bytes | None) -> list[str]:
    """``Name`` of each ``Image`` of OME-XML, in order ('' where unnamed); [] without usable XML."""
    if not xml:
        return []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []  # names are a convenience: a damaged XML leaves the series numbered
    return [el.get("Name", "") for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]


def _folder(source: str, attrs: dict[str, Any], options: dict[str, Any], threads: int) -> Listed:
    items = [_Item(name, path, keys=(name.rsplit("/", 1)[-1],)) for name, path in folder_images(source, options, threads)]
    return items, {}


# ----------------------------------------------------------------------------
# Selection and consistency.
# ----------------------------------------------------------------------------


def parse_selection(spec: str | Sequence[str]) -> list[str]:
    """``"B3,C*"`` -> ``["B3", "C*"]`` (a list passes through, stripped)."""
    items = spec.split(",") if isinstance(spec, str) else [str(p) for p in spec]
    patterns = [p.strip() for p in items if p.strip()]
    if not patterns:
        raise ConfigError("--select is empty: give wells (B3,C*), fields (B3/0, */1), series (0,2-5) or name globs")
    return patterns


def _matches(image: ImageEntry | _Item, pattern: str) -> bool:
    rng = _RANGE.fullmatch(pattern)
    if rng and image.index is not None:
        return int(rng.group(1)) <= image.index <= int(rng.group(2))
    p = pattern.lower()
    return any(fnmatch.fnmatchcase(k.lower(), p) for k in (image.name, *image.keys) if k)


def select_images(collection: Collection, spec: str | Sequence[str]) -> Collection:
    """The images that any ``--select`` pattern matches; every pattern must match one.

    A pattern is a glob (``*``, ``?``, ``[...]``; case ignored) matched
    against an image's name and its other keys: for a plate the well
    (``B3`` or ``B/3``: all its fields) and ``B3/0`` (one field; ``*/0``:
    field 0 of every well); for a container the series index and name, and
    ``N-M`` for a range of indices; for a folder the relative path and the
    file name.

    Raises
    ------
    ConfigError
        A pattern matches no image (a typo must not pass as a smaller selection).
    """
    patterns = parse_selection(spec)
    images = tuple(_pick(list(collection.images), patterns, collection.source))
    return dataclasses.replace(collection, images=images, selection=",".join(patterns))


def _pick(images: list[Any], patterns: list[str], source: str) -> list[Any]:
    """The images (entries or listed items) that any pattern matches, in order; refuse a pattern matching none."""
    chosen: set[int] = set()
    for pattern in patterns:
        hits = [i for i, im in enumerate(images) if _matches(im, pattern)]
        if not hits:
            names = [im.name for im in images]
            examples = f"e.g. {', '.join(names[:3])}" + (f" ... {names[-1]}" if len(names) > 3 else "")
            raise ConfigError(f"--select {pattern!r} matches none of the {len(images)} images of {source} ({examples})")
        chosen.update(hits)
    return [im for i, im in enumerate(images) if i in chosen]


def some_names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_consistent(images: Iterable[ImageEntry], what: str = "one model") -> None:
    """Refuse images whose axes or channel counts disagree, naming them (one line).

    Shapes, sizes and dtypes may differ; axes and channels are what one model
    is built for.

    Raises
    ------
    CollectionError
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for im in images:
        groups.setdefault((im.axes, im.channels), []).append(im.name)
    if len(groups) <= 1:
        return
    kinds = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{some_names(names)} {'is' if len(names) == 1 else 'are'} {axes} with {c} channel{'s' if c != 1 else ''}"
             for (axes, c), names in kinds]
    raise CollectionError(f"images disagree in axes or channels, so they cannot share {what}: {'; '.join(parts)} "
                          "(pick one kind with --select)")

