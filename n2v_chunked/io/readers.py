"""What every reader of a stored source shares: the opened source before
canonical order (:class:`Raw`), store details (:class:`SourceInfo`), and the
array-like that dask reads one region at a time (:class:`ChunkReader`).

The format readers (:mod:`~n2v_chunked.io.zarr_read`, :mod:`~n2v_chunked.io.tiff`,
:mod:`~n2v_chunked.io.formats`) build a :class:`Raw`;
:func:`~n2v_chunked.io.sources.open_image` puts it in canonical order.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import dask.array as da
import numpy as np

from ..errors import CollectionError, N2VError, UnreadableDataError, first_line
from .metadata_axes import Stated
from .stores import with_retries


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
    stored_bytes : callable
        Bytes the source occupies on disk (all levels), or None when unknown.
        A call lists every stored object, so only ``info`` makes it: opening
        a source never lists its chunks.
    dtype : str
        Stored data type.
    """

    store_chunks: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    levels: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    stored_bytes: Callable[[], int | None] = lambda: None
    dtype: str = ""
    stored_axes: str = ""  # the axes in stored order: the order --axes refers to


@dataclasses.dataclass
class Raw:
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
    # The zarr array ``data`` reads, unchanged (handed over to the sampler,
    # which reads it directly, without a dask graph per read).
    store_array: Any = None


def not_one_image(source: str, what: str, example: str | None = None) -> CollectionError:
    """The one-line refusal of a collection where one image is needed (every command but ``info``).

    Parameters
    ----------
    source : str
        The collection as the user named it.
    what : str
        What it is, e.g. ``"an HCS plate of 96 wells"``.
    example : str, optional
        The path of one of its images, to show how to give one.
    """
    one = f"; give one image instead, e.g. {example}" if example else ""
    return CollectionError(f"{source} is {what}: `n2v-chunked info` lists its images (--select picks some); "
                           f"`train` and `predict` take it whole; everything else takes one image{one}")


class ChunkReader:
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
        try:  # transient store errors (timeouts, 5xx, throttling) are retried with back-off
            return with_retries(lambda: self._read(key), f"reading {self.label}")
        except (N2VError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            where, cause = self._locate(key, exc)
            raise UnreadableDataError(f"cannot read {self.label} {where}: {type(cause).__name__}: {first_line(cause)[:200]}") from exc

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


def from_reader(reader: ChunkReader, chunks: tuple[int, ...]) -> da.Array:
    """A dask array over ``reader`` with ``chunks``, one ``reader[region]`` call per block."""
    meta = np.empty((0,) * reader.ndim, dtype=reader.dtype)
    return da.from_array(reader, chunks=chunks, asarray=False, fancy=False, lock=False, meta=meta, inline_array=True)

