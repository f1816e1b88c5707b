"""Reading TIFF: files, pyramids, folders and globs of same-shaped files, and
refusing TIFFs whose pages or strips are missing.

Reading goes through ``tifffile``'s Zarr store (strip/tile/page chunks,
merged into dask chunks of a few MiB).  Before a file is read, its metadata
plane counts, IFD chain and strip extents are checked
(:func:`check_complete`); tifffile's own log is kept from the user
(:func:`quiet_tifffile`)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator, Sequence

import dask.array as da
import numpy as np
import tifffile
import zarr

from ..errors import AxesError, ConfigError, N2VError, UnreadableDataError, first_line
from .metadata_axes import ASK_AXES, CANONICAL, parse_axes, tiff_stated_axes
from .readers import ChunkReader, Raw, SourceInfo, from_reader, not_one_image
from .stores import grow_chunks

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
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


class _Capture(logging.Filter):
    """Keeps tifffile's records of one thread (the one opening a file) from the log."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:  # other threads' files are not ours to judge
            return True
        self.records.append(record)
        return False


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[list[logging.LogRecord]]:
    """Capture the ``tifffile`` logger's records of this thread instead of printing them.

    Yields
    ------
    list of logging.LogRecord
        Filled while the block runs.
    """
    logger = logging.getLogger("tifffile")
    cap = _Capture()
    logger.addFilter(cap)  # a logger filter also stops propagation to the root handlers
    try:
        yield cap.records
    finally:
        logger.removeFilter(cap)


def check_complete(tf: Any, path: str, level: int = 0, records: list[logging.LogRecord] | None = None) -> None:
    """Raise :class:`UnreadableDataError` unless the TIFF holds all it promises.

    Parameters
    ----------
    tf : tifffile.TiffFile
        The open file.
    path : str
        Its path, for the message.
    level : int
        Pyramid level that will be read (its strips are checked too).
    records : list of logging.LogRecord, optional
        tifffile's log records from opening the file (:func:`quiet_tifffile`);
        a warning or error among them that no check below explains is an
        error as well, since it means tifffile read around a problem.
    """
    size = os.path.getsize(path)
    series = tf.series[0]
    problem = _count_problem(tf, series) or _extent_problem(series, 0, size)
    if problem is None and level:
        problem = _extent_problem(series, level, size)
    if problem is None and series.kind not in ("imagej", "ome", "shaped"):
        problem = _chain_problem(tf, size)  # no count to compare with: the IFD chain must end cleanly
    said = [r.getMessage() for r in records or () if r.levelno >= logging.WARNING]
    if problem is None and said:
        problem = f"damaged: tifffile reports {_strip_prefix(said[0])}"
    if problem is not None:
        raise UnreadableDataError(f"TIFF {path} is {problem}; it is not read as a smaller image: "
                                  "copy or export the complete file again")


def _strip_prefix(message: str) -> str:
    """tifffile messages start with ``<tifffile.TiffFile 'x.tif'>``: the path is ours to give."""
    if message.startswith("<") and "> " in message:
        message = message.split("> ", 1)[1]
    return message.splitlines()[0][:160] if message else message


def _planes(series: Any) -> int:
    """Number of 2D planes (pages' worth of images) the series delivers."""
    page = math.prod(series.keyframe.shape) or 1
    return math.prod(series.shape) // page


def _count_problem(tf: Any, series: Any) -> str | None:
    """Planes the metadata counts but the series lacks, in words; None when they match."""
    planes = _planes(series)
    if tf.is_imagej:
        images = int((tf.imagej_metadata or {}).get("images") or 0)
        if images > planes:
            return f"truncated: ImageJ metadata says {images} images, {_readable(tf, planes)} readable"
    if tf.is_ome and tf.ome_metadata:
        expected = _ome_planes(tf.ome_metadata)
        if expected is not None and expected[0] > planes:
            return f"truncated: OME-XML says {expected[1]} ({expected[0]} planes), {_readable(tf, planes)} readable"
    if tf.is_shaped and tf.shaped_metadata:
        shape = tuple(int(n) for n in tf.shaped_metadata[0].get("shape") or ())
        if shape and math.prod(shape) > math.prod(series.shape):
            return f"truncated: its metadata says shape {shape}, readable {tuple(series.shape)}"
    return None


def _readable(tf: Any, planes: int) -> str:
    """``"37 pages"``: the IFDs tifffile could read (only on the error path: this reads every IFD)."""
    return f"{max(len(tf.pages), planes)} page(s)"


def _ome_planes(xml: str) -> tuple[int, str] | None:
    """Planes of the first OME Image, and how the XML states them."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    try:
        z, t, c = (int(pixels.get(f"Size{a}", "1")) for a in "ZTC")
    except ValueError:
        return None
    channel = next((e for e in pixels if e.tag.rsplit("}", 1)[-1] == "Channel"), None)
    samples = int(channel.get("SamplesPerPixel", "1")) if channel is not None else 1
    planes = z * t * max(1, c // max(1, samples))
    return planes, f"SizeZ={z}, SizeT={t}, SizeC={c}"


def _extent_problem(series: Any, level: int, size: int) -> str | None:
    """Pages missing from the series, or strips/tiles that lie beyond the end of the file."""
    s = series.levels[level] if level < len(series.levels) else series
    if s.dataoffset is not None:  # one contiguous block: tifffile reads it from the first page on
        end = int(s.dataoffset) + int(s.nbytes)
        if end > size:
            return f"truncated: its image data run to byte {end} but the file has {size} bytes"
        return None
    pages = list(s.pages)
    missing = sum(p is None for p in pages)
    if missing:
        return f"incomplete: {missing} of {len(pages)} planes of the image are missing from the file"
    for i, page in enumerate(pages):
        ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            cut = sum(e > size for e in ends)
            return (f"truncated: page {i + 1} of {len(pages)} has {cut} of {len(ends)} strips/tiles past the end "
                    f"of the file (they run to byte {max(ends)}, the file has {size} bytes)")
    return None


def _chain_problem(tf: Any, size: int) -> str | None:
    """The IFD chain points on after the last page tifffile could read."""
    pages = len(tf.pages)
    where = getattr(tf.pages, "next_page_offset", None)  # where the last read IFD stores the next one's offset
    if not where:
        return None
    try:
        fh = tf.filehandle
        fh.seek(where)
        (nxt,) = struct.unpack(tf.tiff.offsetformat, fh.read(tf.tiff.offsetsize))
    except (OSError, struct.error, AttributeError):
        return None  # nothing we can say for sure
    if not nxt:
        return None
    if nxt >= size:
        return (f"truncated: page {pages + 1} should start at byte {nxt} but the file has {size} bytes; "
                f"{pages} page(s) readable")
    return f"damaged: page {pages + 1} at byte {nxt} cannot be read; {pages} page(s) readable"


class _TiffReader(ChunkReader):
    """Reads a TIFF through ``tifffile``'s Zarr store (strip/tile/page chunks).

    With ``keep_open`` the file stays open in each process from its first
    read on (one big file read chunk by chunk); without, every read opens and
    closes it (a folder of thousands of files must not hold thousands of
    handles).  Opening it only to learn its shape holds no handle, so listing
    a folder of thousands of TIFFs (``io/collections.py``) does not either.
    """

    def __init__(self, path: str, level: int, keep_open: bool) -> None:
        self.path, self.level, self.keep_open = path, level, keep_open
        self._handles: tuple[Any, Any, Any] | None = None
        self._lock = threading.Lock()
        handles = self._open(check=True)
        z = handles[2]
        super().__init__(f"TIFF {path}", z.shape, z.dtype, z.chunks)
        self._close(handles)

    def _open(self, check: bool = False) -> tuple[Any, Any, Any]:
        """Open the file; with ``check``, refuse it unless all its pages and strips are there."""
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


def open_tiff(path: str, level: int, keep_open: bool = True) -> Raw:
    """Open a TIFF file (level ``level`` of a pyramid) as a :class:`~n2v_chunked.io.readers.Raw`."""
    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tf:  # judged by _TiffReader below
            series = tf.series[0]
            nlevels = len(series.levels)
            if level >= nlevels:
                raise ConfigError(f"TIFF {path} has {nlevels} level(s); level {level} does not exist")
            dims = _tiff_axes(series.axes)
            stated = tiff_stated_axes(tf, series)
            scale, units = _tiff_metadata(tf)
            levels = [tuple(lv.shape) for lv in series.levels]
            axes_letters = series.axes
        reader = _TiffReader(path, level, keep_open)
    except N2VError:
        raise
    except Exception as exc:
        raise UnreadableDataError(f"cannot read TIFF {path}: {type(exc).__name__}: {first_line(exc)[:200]}") from None
    if len(axes_letters) != reader.ndim:  # tifffile squeezes differently: trust the shape
        dims, stated = None, None
    chunks = grow_chunks(reader.shape, reader.store_chunks, reader.dtype.itemsize, TIFF_CHUNK_BYTES)
    raw = Raw(from_reader(reader, chunks), dims, "tiff", path, rebuild=lambda ch: from_reader(reader, ch))
    raw.stated = stated or ()  # () : the metadata states nothing (tifffile's guesses are not metadata)
    if dims is not None:
        # level > 0 of a pyramid: pixel sizes grow by the level's downsampling
        f = {d: levels[0][i] / reader.shape[i] for i, d in enumerate(dims)}
        raw.scale = {i: scale[d] * f[d] for i, d in enumerate(dims) if d in scale}
        raw.units = {i: units[d] for i, d in enumerate(dims) if d in units}
    raw.attrs["tiff_axes"] = axes_letters
    raw.attrs["reader"] = reader
    raw.attrs["tiff_scale"], raw.attrs["tiff_units"] = scale, units
    size = Path(path).stat().st_size
    raw.info = SourceInfo(reader.store_chunks, None, levels, lambda: size, str(reader.dtype))
    return raw


def open_tiff_stack(files: list[str], source: str, axes: Any) -> Raw:
    """Stack same-shaped TIFFs along a new leading axis (``t`` unless ``axes`` says)."""
    first = open_tiff(files[0], 0, keep_open=False)
    shape, dtype, chunks = first.data.shape, first.data.dtype, first.data.chunksize
    readers = [first.attrs["reader"]]
    for f in files[1:]:  # opens headers only: cheap even for thousands of files
        try:
            reader = _TiffReader(f, 0, keep_open=False)
        except N2VError:
            raise
        except Exception as exc:
            raise UnreadableDataError(f"cannot read TIFF {f}: {type(exc).__name__}: {first_line(exc)[:200]}") from None
        if reader.shape != shape or reader.dtype != dtype:
            raise not_one_image(source, f"a set of TIFFs of different shapes or dtypes ({Path(f).name} has shape "
                                f"{reader.shape} {reader.dtype} but {Path(files[0]).name} has {shape} {dtype}), not one stack")
        readers.append(reader)

    def stack(ch: tuple[int, ...]) -> da.Array:
        out = da.stack([from_reader(r, ch[1:]) for r in readers], axis=0)
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
    raw = Raw(data, dims, "tiff", source, rebuild=stack)
    raw.stated = (None,) + tuple(first.stated) if first.stated else ()  # the stacking axis is ours to name
    sc, un = first.attrs["tiff_scale"], first.attrs["tiff_units"]
    raw.scale = {i + 1: sc[d] for i, d in enumerate(inner) if d in sc}
    raw.units = {i + 1: un[d] for i, d in enumerate(inner) if d in un}
    size = sum(Path(f).stat().st_size for f in files)
    raw.info = SourceInfo(
        (1,) + tuple(first.info.store_chunks or ()), None, [tuple(data.shape)], lambda: size, str(dtype)
    )
    return raw

