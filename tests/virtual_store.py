"""Volumes of any logical size that exist nowhere: for ``benchmarks/scale.py`` and the scale tests.

Two fsspec file systems, registered under their own URL schemes, so that
every path of n2v_chunked reads and writes them as it would an object store
(zarr 3's ``FsspecStore``):

* ``virtual://NAME`` serves an OME-Zarr 0.5 image (one level, uint16) whose
  metadata is a ``zarr.json`` pair and whose every chunk is computed from its
  key when read: a fixed random pattern plus an offset hashed from the chunk's
  coordinates, uncompressed.  Nothing is stored; a 100 TB volume costs the
  same memory as a 1 GB one.  Chunk reads and listings are counted
  (:class:`Counts`), so a test can assert that start-up reads a bounded
  number of chunks and lists nothing.
* ``virtual://NAME`` may also be an HCS plate (:func:`add_plate`, NGFF 0.5):
  plate, row, well and field metadata computed from the path, every field
  such a volume.  Metadata reads are counted and can be made to wait
  :data:`LATENCY_S` each, as an object store's round trips do.
* ``discard://NAME`` keeps metadata and small files (``zarr.json``, resume
  markers, the lock) in memory and throws chunk data away, counting it; a
  chunk read back reads as missing (the fill value).

:func:`add_volume` registers a volume and returns its URL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from typing import Any, Sequence

import fsspec
import numpy as np
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

VIRTUAL, DISCARD = "virtual", "discard"


@dataclasses.dataclass
class Counts:
    """What the file systems were asked for (all volumes together)."""

    chunk_reads: int = 0  # chunk objects served by virtual://
    listings: int = 0  # ls/find calls on virtual://
    metadata_reads: int = 0  # zarr.json objects served by virtual:// plates
    in_flight: int = 0  # plate metadata reads under way now
    max_in_flight: int = 0  # the most at once since the last reset
    chunk_writes: int = 0  # chunk objects discarded by discard://
    bytes_discarded: int = 0
    reads_at_first_write: int = 0  # chunk_reads when discard:// got its first chunk
    write_times: list[float] = dataclasses.field(default_factory=list)  # perf_counter() of each discarded chunk
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def reset(self) -> None:
        self.add(**{k: -getattr(self, k) for k in ("chunk_reads", "listings", "metadata_reads", "chunk_writes",
                                                   "bytes_discarded", "max_in_flight")})
        self.write_times.clear()


class Enough(Exception):
    """Raised by ``discard://`` once :data:`STOP_AFTER` chunks were written: ends a run of a huge volume."""


COUNTS = Counts()
STOP_AFTER: int | None = None  # chunk writes after which discard:// raises Enough
LATENCY_S = 0.0  # wait per metadata read of a virtual plate (an object store's round trip)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A virtual uint16 volume: axes, shape and chunk shape."""

    axes: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape)

    @property
    def nchunks(self) -> int:
        return math.prod(-(-s // c) for s, c in zip(self.shape, self.chunks))


@dataclasses.dataclass(frozen=True)
class Plate:
    """A virtual HCS plate: ``rows`` x ``columns`` wells of ``fields`` fields, each field ``volume``."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    fields: int
    volume: Volume

    @property
    def images(self) -> int:
        return len(self.rows) * len(self.columns) * self.fields


_VOLUMES: dict[str, Volume] = {}
_PLATES: dict[str, Plate] = {}
_PATTERNS: dict[tuple[int, ...], bytes] = {}


def shape_for(nbytes: float, chunks: Sequence[int]) -> tuple[int, ...]:
    """A shape of about ``nbytes`` uint16 bytes: inner axes near the cube's side in whole chunks, the first the rest."""
    side = (nbytes / 2) ** (1 / len(chunks))
    inner = [max(c, round(side / c) * c) for c in chunks[1:]]
    return (max(chunks[0], round(nbytes / 2 / math.prod(inner))), *inner)


def add_volume(name: str, shape: Sequence[int], chunks: Sequence[int], axes: str = "zyx") -> str:
    """Register a virtual volume and return its URL (``virtual://NAME``)."""
    _VOLUMES[name] = Volume(axes, tuple(int(s) for s in shape), tuple(int(c) for c in chunks))
    return f"{VIRTUAL}://{name}"


def add_plate(name: str, rows: int, columns: int, fields: int, shape: Sequence[int], chunks: Sequence[int],
              axes: str = "yx") -> str:
    """Register a virtual plate (rows ``A``, ``B``, ...; columns ``1``, ``2``, ...) and return its URL."""
    vol = Volume(axes, tuple(int(s) for s in shape), tuple(int(c) for c in chunks))
    _PLATES[name] = Plate(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:rows]), tuple(str(c + 1) for c in range(columns)),
                          fields, vol)
    return f"{VIRTUAL}://{name}"


def _plate_metadata(plate: Plate, parts: list[str]) -> bytes | None:
    """``zarr.json`` of a plate's root, row, well or field (``parts``: the path below the plate, without it)."""
    def group(attrs: dict[str, Any]) -> bytes:
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()

    if not parts:
        wells = [{"path": f"{r}/{c}", "rowIndex": i, "columnIndex": j}
                 for i, r in enumerate(plate.rows) for j, c in enumerate(plate.columns)]
        return group({"ome": {"version": "0.5", "plate": {
            "rows": [{"name": r} for r in plate.rows], "columns": [{"name": c} for c in plate.columns],
            "wells": wells, "field_count": plate.fields, "name": "virtual"}}})
    if parts[0] not in plate.rows:
        return None
    if len(parts) == 1:
        return group({})
    if parts[1] not in plate.columns:
        return None
    if len(parts) == 2:
        return group({"ome": {"version": "0.5", "well": {"images": [{"path": str(f)} for f in range(plate.fields)]}}})
    if not (parts[2].isdigit() and int(parts[2]) < plate.fields):
        return None
    return _metadata(plate.volume).get("/".join(parts[3:] + ["zarr.json"]))


def _pattern(chunks: tuple[int, ...]) -> np.ndarray:
    raw = _PATTERNS.get(chunks)
    if raw is None:  # smooth-ish signal around 1000 with noise, the same in every chunk
        rng = np.random.default_rng(0)
        raw = (1000 + rng.integers(0, 200, size=chunks)).astype("<u2").tobytes()
        _PATTERNS[chunks] = raw
    return np.frombuffer(raw, dtype="<u2").reshape(chunks)


def chunk_values(vol: Volume, index: Sequence[int]) -> np.ndarray:
    """The stored chunk at grid ``index`` (full chunk shape, as Zarr v3 stores edge chunks)."""
    h = 0
    for i in index:
        h = (h * 1_000_003 + int(i) + 1) % 2_147_483_647
    return _pattern(vol.chunks) + np.uint16(h % 1000)


def _metadata(vol: Volume) -> dict[str, bytes]:
    axes = [{"name": a, "type": "space" if a in "zyx" else "time" if a == "t" else "channel"} for a in vol.axes]
    group = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "multiscales": [{
        "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * len(vol.axes)}]}]}]}}}
    array = {
        "zarr_format": 3, "node_type": "array", "shape": list(vol.shape), "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(vol.chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "dimension_names": list(vol.axes), "attributes": {},
    }
    return {"zarr.json": json.dumps(group).encode(), "0/zarr.json": json.dumps(array).encode()}


class VirtualFileSystem(AbstractFileSystem):
    """Read-only ``virtual://NAME``: OME-Zarr metadata and chunks computed from their keys."""

    protocol = VIRTUAL
    cachable = False

    def _split(self, path: str) -> tuple[Volume, str]:
        name, _, rest = self._strip_protocol(path).strip("/").partition("/")
        plate = _PLATES.get(name)
        if plate is not None:  # a plate's field is a volume: the rest below ROW/COL/FIELD/
            parts = rest.split("/")
            if len(parts) > 3 and _plate_metadata(plate, parts[:3]) is not None:
                return plate.volume, "/".join(parts[3:])
            raise FileNotFoundError(path)
        if name not in _VOLUMES:
            raise FileNotFoundError(path)
        return _VOLUMES[name], rest

    def _content(self, path: str) -> bytes:
        name, _, rest = self._strip_protocol(path).strip("/").partition("/")
        if name in _PLATES and rest.endswith("zarr.json"):
            with COUNTS.lock:
                COUNTS.metadata_reads += 1
                COUNTS.in_flight += 1
                COUNTS.max_in_flight = max(COUNTS.max_in_flight, COUNTS.in_flight)
            try:
                if LATENCY_S:
                    time.sleep(LATENCY_S)
            finally:
                COUNTS.add(in_flight=-1)
            found = _plate_metadata(_PLATES[name], [p for p in rest.split("/")[:-1] if p])
            if found is None:
                raise FileNotFoundError(path)
            return found
        vol, rest = self._split(path)
        meta = _metadata(vol)
        if rest in meta:
            return meta[rest]
        parts = rest.split("/")
        if len(parts) == len(vol.shape) + 2 and parts[:2] == ["0", "c"]:
            index = tuple(int(p) for p in parts[2:])
            if all(0 <= i < -(-s // c) for i, s, c in zip(index, vol.shape, vol.chunks)):
                COUNTS.add(chunk_reads=1)
                return chunk_values(vol, index).tobytes()
        raise FileNotFoundError(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        return self._content(path)[start:end]

    def info(self, path: str, **kw: Any) -> dict[str, Any]:
        vol, rest = self._split(path)
        if rest in ("", "0", "0/c"):
            return {"name": path, "size": 0, "type": "directory"}
        return {"name": path, "size": len(self._content(path)), "type": "file"}

    def ls(self, path: str, detail: bool = True, **kw: Any) -> list[Any]:
        COUNTS.add(listings=1)  # never needed to read: a listing of a virtual volume is a finding
        vol, rest = self._split(path)
        base = self._strip_protocol(path).strip("/")
        names = {"": ["zarr.json", "0"], "0": ["zarr.json", "c"]}.get(rest)
        if names is None:
            raise NotImplementedError(f"listing {path}: a virtual volume has too many chunks to list")
        entries = [self.info(f"{base}/{n}") for n in names]
        return entries if detail else [e["name"] for e in entries]


class DiscardFileSystem(MemoryFileSystem):
    """``discard://NAME``: small files in memory, chunk data (``.../c/...`` or v2 keys) counted and dropped."""

    protocol = DISCARD
    store: dict[str, Any] = {}  # its own, not the memory:// file system's
    pseudo_dirs = [""]

    @staticmethod
    def _is_chunk(path: str) -> bool:
        parts = path.strip("/").split("/")
        return "c" in parts[1:-1] and parts[-1].isdigit()

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        if self._is_chunk(self._strip_protocol(path)):
            if not COUNTS.write_times:
                COUNTS.reads_at_first_write = COUNTS.chunk_reads
            COUNTS.add(chunk_writes=1, bytes_discarded=len(value))
            COUNTS.write_times.append(time.perf_counter())
            if STOP_AFTER is not None and COUNTS.chunk_writes >= STOP_AFTER:
                raise Enough(f"{COUNTS.chunk_writes} chunks written")
            return
        super().pipe_file(path, value, mode=mode, **kw)


def clear_discarded() -> None:
    """Forget every file ``discard://`` holds."""
    DiscardFileSystem.store.clear()
    DiscardFileSystem.pseudo_dirs[:] = [""]


fsspec.register_implementation(VIRTUAL, VirtualFileSystem, clobber=True)
fsspec.register_implementation(DISCARD, DiscardFileSystem, clobber=True)
