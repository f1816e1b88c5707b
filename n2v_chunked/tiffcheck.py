"""Refusing TIFF files whose pages or strips are missing.

tifffile reads what it can of a damaged file: a 101-slice stack cut short by
an interrupted copy opens as its first page, and only a log line says so.
Converted or denoised, that is a smaller image marked complete.  Here a TIFF
must hold everything its own structure and metadata promise:

* the planes its metadata counts (ImageJ ``images=``, OME-XML
  ``SizeZ x SizeT x SizeC``, tifffile's shaped ``shape``);
* every page of its IFD chain (a chain that points past the end of the file
  was cut);
* every strip or tile its pages point to, within the file.

tifffile's own log records while a file is opened are captured here (they
would reach the user as unformatted lines) and become part of our error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from typing import Any, Iterator

from .errors import UnreadableDataError


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
