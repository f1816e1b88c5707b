"""One stream of the patch sampler: a bounded buffer of decoded blocks.

Blocks are decoded by a background thread pool so that reading overlaps the
consumer's compute; each patch comes from a random one of the buffered blocks,
and a block is replaced as soon as its patch quota is spent.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..engine.transfer import host_empty
from ..errors import N2VError, UnreadableDataError
from .access import BadChunks
from .grid import Box, draw_origins

# Consecutive rejected patches after which the data is declared all-background.
MAX_TRIES = 1000
# Consecutive rejections after which a block is dropped from the buffer.
BLOCK_TRIES = 50

# ----------------------------------------------------------------------------
# Buffer entries
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One decoded block in the buffer."""

    block: int
    view: np.ndarray  # sliding-window view: view[(0, *origin)] -> (C, *patch_all)
    mask_view: np.ndarray | None  # view[origin] -> patch footprint of the mask
    boxes: list[Box]  # allowed origins, window-local
    rng: np.random.Generator
    quota: int  # patches still to serve
    nbytes: int
    origins: np.ndarray = dataclasses.field(default_factory=lambda: np.empty((0, 0), np.int64))
    pos: int = 0
    misses: int = 0  # consecutive rejected draws

    def next_origin(self) -> tuple[int, ...]:
        return (0, *self.take_origins(1)[0].tolist())

    def take_origins(self, k: int) -> np.ndarray:
        """The next ``k`` origins of this block's sequence, shape ``(k, ndim)``."""
        parts = [np.empty((0, len(self.boxes[0])), np.int64)]
        while k > 0:
            if self.pos == len(self.origins):
                self.origins = draw_origins(self.rng, self.boxes, min(max(self.quota, 16), 1024))
                self.pos = 0
            got = self.origins[self.pos : self.pos + k]
            self.pos += len(got)
            k -= len(got)
            parts.append(got)
        return np.concatenate(parts)


@dataclasses.dataclass
class Loaded:
    """What one block read gave: the buffer entry (None when no patch can be drawn) and the bad chunks found."""

    entry: Entry | None
    bad: dict
    background: bool = False
    block: int = -1  # the block read (set when it was skipped)


@dataclasses.dataclass(frozen=True)
class Foreground:
    """The foreground filter: a patch's std and the mask fraction over its footprint."""

    min_std: float | None
    min_foreground: float
    masked: bool  # the dataset has a mask

    @property
    def active(self) -> bool:
        """Whether any patch can be rejected (else every drawn patch is kept)."""
        return self.min_std is not None or self.masked

    def accepts(self, entry: Entry, origin: tuple[int, ...], patch: np.ndarray) -> bool:
        if self.min_std is not None and float(patch.std()) < self.min_std:
            return False
        if entry.mask_view is not None and float(entry.mask_view[origin[1:]].mean()) < self.min_foreground:
            return False
        return True

    def describe(self) -> str:
        """The criteria, for the all-background error."""
        crit = ([f"std >= {self.min_std}"] if self.min_std is not None else []) + (
            [f"mask fraction >= {self.min_foreground}"] if self.masked else [])
        return " and ".join(crit)


@dataclasses.dataclass
class StreamSpec:
    """What one :class:`PatchStream` needs from its dataset, made by
    :meth:`~n2v_chunked.sampling.dataset.ZarrPatchDataset.stream` (the stream never reaches into the dataset).
    """

    name: str  # the source, for messages
    schedule: Iterator[tuple[int, int]]  # (pass, block) pairs to load, from the resume position on
    rng: np.random.Generator  # the stream's draws, seeded from its start position (a resumed stream skips)
    blocks_per_pass: int  # blocks this stream loads per pass
    train_blocks: int  # training blocks in all: once every one was skipped, no patch can be drawn
    slots: int  # block windows the buffer budget holds
    io_threads: int
    max_bad_chunks: int
    window_nbytes: Callable[[int], int]  # bytes of a block's window
    load: Callable[[int, int, int, frozenset], Loaded]  # (pass, block, stream, known bad chunks); reader threads
    foreground: Foreground
    batch_shape: tuple[int, ...]  # (C, *patch): one patch of a batch
    draw_shape: tuple[int, ...]  # (C, *patch over every grid dim): one patch as drawn


class PatchStream:
    """One stream's bounded buffer of blocks and the patches drawn from it.

    Made by :meth:`ZarrPatchDataset.stream`; iterate it for single patches
    (``torch.float32`` tensors of shape ``(C, *patch)``) or call
    :meth:`next_batch`.  Close it (or use it as a context manager) to stop
    its reader threads.

    Attributes
    ----------
    stats : dict
        ``patches`` served, ``blocks_loaded``, ``blocks_skipped``,
        ``rejected`` patches, ``buffer_bytes`` now and ``peak_buffer_bytes``
        (decoded windows held plus reads in flight).
    """

    def __init__(self, spec: StreamSpec, stream: int, n_streams: int) -> None:
        self._spec = spec
        self._bad = BadChunks(spec.name, spec.max_bad_chunks)
        self.stream, self.n_streams = stream, n_streams
        self.stats = dict(patches=0, blocks_loaded=0, blocks_skipped=0, rejected=0, buffer_bytes=0,
                          peak_buffer_bytes=0)
        self._schedule = spec.schedule
        prefetch = min(spec.io_threads, spec.slots - 1) if spec.io_threads > 0 else 0
        self._resident = max(1, min(spec.slots - prefetch, spec.blocks_per_pass))
        self._lookahead = prefetch
        self._pool = ThreadPoolExecutor(spec.io_threads, thread_name_prefix="n2v-block") if prefetch else None
        self._pending: collections.deque[tuple[int, Future | _Later]] = collections.deque()
        self._rng = spec.rng
        self._uniform: list[float] = []
        self._fails = 0  # consecutive rejected draws across the stream
        self._unusable: set[int] = set()  # training blocks skipped (for good)
        self._held = 0  # decoded entries held (in slots or being placed)
        self._closed = False
        self._slots: list[Entry | None] = []
        self._submit()
        for _ in range(self._resident):
            entry = self._take()
            if entry is None:
                break
            self._slots.append(entry)
        self._active = [i for i, e in enumerate(self._slots) if e is not None]
        if not self._active and self.stats["blocks_skipped"]:
            raise UnreadableDataError(f"no training patches can be drawn from {self._spec.name}: every block was skipped"
                           + self._bad.summary())

    # -- block loading --------------------------------------------------------

    def _submit(self) -> None:
        """Queue reads until the buffer budget (held + in flight) is used."""
        want = self._resident + self._lookahead - self._held
        while len(self._pending) < want:
            item = next(self._schedule, None)
            if item is None:
                return
            epoch, block = item
            nbytes = self._spec.window_nbytes(block)
            self._count(nbytes)
            bad = self._bad.snapshot()
            if self._pool is not None:
                self._pending.append((nbytes, self._pool.submit(self._spec.load, epoch, block, self.stream, bad)))
            else:
                self._pending.append((nbytes, _Later(self._spec.load, epoch, block, self.stream, bad)))

    def _take(self) -> Entry | None:
        """The next loaded block in schedule order (skipping unusable ones)."""
        while True:
            self._submit()
            if not self._pending:
                return None
            nbytes, fut = self._pending.popleft()
            try:
                loaded = fut.result()
            except BaseException:
                self._count(-nbytes)
                raise
            self._bad.add(loaded.bad)
            if loaded.entry is not None:
                self._count(loaded.entry.nbytes - nbytes)
                self._held += 1
                self.stats["blocks_loaded"] += 1
                return loaded.entry
            self._count(-nbytes)
            self.stats["blocks_skipped"] += 1
            if loaded.background:
                self._reject()
            # A skipped block stays unusable (bad chunks are remembered, the mask does not
            # change): once every training block is, an endless schedule would spin forever.
            self._unusable.add(loaded.block)
            if len(self._unusable) >= self._spec.train_blocks:
                raise UnreadableDataError(f"no training patches can be drawn from {self._spec.name}: every block was skipped"
                               + self._bad.summary())

    def _count(self, delta: int) -> None:
        self.stats["buffer_bytes"] += delta
        self.stats["peak_buffer_bytes"] = max(self.stats["peak_buffer_bytes"], self.stats["buffer_bytes"])

    def _retire(self, slot: int) -> None:
        entry = self._slots[slot]
        self._slots[slot] = None  # drop the window before the next read lands
        if entry is not None:
            self._count(-entry.nbytes)
            self._held -= 1
        new = self._take()
        if new is None:
            self._active.remove(slot)
        else:
            self._slots[slot] = new

    def _reject(self, n: int = 1) -> None:
        self.stats["rejected"] += n
        self._fails += n
        if self._fails >= MAX_TRIES:
            raise N2VError(
                f"no foreground patch found in {self._spec.name} after {self._fails} tries "
                f"(filter: {self._spec.foreground.describe()}); the data looks all-background: lower min_std or check the mask"
            )

    # -- drawing --------------------------------------------------------------

    def _uniforms(self, m: int) -> np.ndarray:
        while len(self._uniform) < m:
            self._uniform = self._rng.random(4096).tolist() + self._uniform
        u = np.asarray(self._uniform[len(self._uniform) - m :])
        del self._uniform[len(self._uniform) - m :]
        return u

    def _fill_unfiltered(self, out: np.ndarray, n: int) -> int:
        """:meth:`_fill` without a foreground filter, vectorised per block.

        Each patch still picks its block at random, so batches stay mixed; the
        patches a block gets are gathered from its sliding-window view in one
        fancy-indexing copy instead of one Python step per patch.
        """
        todo = np.arange(n)
        filled = np.zeros(n, dtype=bool)
        while len(todo) and self._active:
            active = np.asarray(self._active)
            picks = active[(self._uniforms(len(todo)) * len(active)).astype(np.int64)]
            left = []
            for slot in np.unique(picks).tolist():
                entry = self._slots[slot]
                where = todo[picks == slot]
                take, rest = where[: entry.quota], where[entry.quota :]
                origins = entry.take_origins(len(take))
                out[take] = entry.view[(0, *origins.T)]
                filled[take] = True
                entry.quota -= len(take)
                left.append(rest)
                if entry.quota <= 0:
                    self._retire(slot)
            todo = np.sort(np.concatenate(left)) if left else todo[:0]
        count = int(filled.sum())
        if count < n:  # a finite stream ran out: keep the filled patches in front
            out[:count] = out[filled]
        self.stats["patches"] += count
        return count

    def _fill(self, out: np.ndarray, n: int) -> int:
        """Write up to ``n`` patches into ``out`` (shape ``(B, C, *patch_all)``); return the count."""
        foreground = self._spec.foreground
        if not foreground.active:  # no foreground filter: every drawn patch is kept
            return self._fill_unfiltered(out, n)
        i = 0
        while i < n and self._active:
            slot = self._active[int(self._uniforms(1)[0] * len(self._active))]
            entry = self._slots[slot]
            origin = entry.next_origin()
            patch = entry.view[origin]
            if not foreground.accepts(entry, origin, patch):
                entry.misses += 1
                self._reject()
                if entry.misses >= BLOCK_TRIES:
                    self._retire(slot)
                continue
            out[i] = patch
            i += 1
            entry.misses = 0
            self._fails = 0
            entry.quota -= 1
            if entry.quota <= 0:
                self._retire(slot)
        self.stats["patches"] += i
        return i

    def next_batch(self, batch_size: int, pin: bool = False) -> torch.Tensor | None:
        """A ``(B, C, *patch)`` float32 tensor, or None once a finite stream is spent.

        B is less than ``batch_size`` only for the last batch of a finite stream.
        ``pin``: drawn straight into page-locked memory when CUDA is present,
        so the copy to the GPU runs asynchronously (no extra copy to pin it).
        """
        out = host_empty((batch_size, *self._spec.batch_shape), pin)
        n = self._fill(out.numpy().reshape(batch_size, *self._spec.draw_shape), batch_size)
        return out[:n] if n else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (batch := self.next_batch(64)) is not None:
            yield from batch  # views into one batch array: cheap, and freed together

    # -- life cycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop reader threads and drop the buffer."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            for _, fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)
        self._pending.clear()
        self._slots = []
        self._active = []
        self.stats["buffer_bytes"] = 0

    def __enter__(self) -> PatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Later:
    """A read done on demand, with the Future interface (no reader threads)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)

    def cancel(self) -> bool:
        return True


def ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead; re-raise its errors here."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=run, name="n2v-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
