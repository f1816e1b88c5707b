"""The patch sampler's dataset: :class:`ZarrPatchDataset` and :func:`batches`.

Reading a random 64x64 patch straight from a compressed Zarr array decodes one
to four whole chunks for 16 KiB of pixels.  This sampler instead keeps a
bounded buffer of decoded *blocks* (chunk-aligned groups of chunks, each at
least twice the patch), draws many patches from each block, and replaces a
block as soon as its patch quota is spent.  Every decoded byte serves many
patches while the stream stays mixed.

The dataset holds what all streams share (source, block grid, validation
split, schedule, resume state) and loads one block window on request
(:meth:`ZarrPatchDataset._load`); each stream is a
:class:`~n2v_chunked.sampling.stream.PatchStream`, which sees the dataset only
through the public :class:`~n2v_chunked.sampling.stream.StreamSpec` it is given.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..engine.transfer import pinned
from ..errors import AxesError, ConfigError, N2VError, UnreadableDataError
from .access import BadChunks, chunk_slices, open_mask, open_source, read_mask, read_window
from .grid import (
    DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_REUSE,
    TAG_BLOCK,
    TAG_SLOT,
    TAG_VALDRAW,
    BlockGrid,
    Box,
    make_block_grid,
    origin_boxes,
    seeded_rng,
)
from .order import BlockSplit, Index, Permutation, assign_blocks, split_validation
from .stream import BLOCK_TRIES, Entry, Foreground, Loaded, PatchStream, StreamSpec, ahead

DEFAULT_BUFFER_BYTES = 256 * 2**20


class ZarrPatchDataset(IterableDataset):
    """Stream of random training patches from a chunked array.

    Iterating yields raw patches (input units, ``torch.float32``) of shape
    ``(C, *patch_shape)`` (C = 1 without a ``c`` dim), endlessly unless
    ``epochs`` is set.  Use with a ``torch.utils.data.DataLoader`` (blocks are
    shared out among loader workers and distributed ranks, so no two serve the
    same stream) or with :func:`batches`.

    Streams are reproducible: the same seed (and position) gives the same
    patches, whatever the timing of the reader threads.  To resume, save
    :meth:`state_dict` (passing the number of patches consumed when loader
    workers are used) and call :meth:`load_state_dict` before iterating: the
    stream restarts at the pass and block reached, re-seeded from them, with
    nothing replayed.  Each ``iter()`` starts from the dataset's state in the
    process that iterates (loader workers get a copy at start-up).

    Parameters
    ----------
    data : xarray.DataArray, zarr.Array, dask array, numpy array or str
        The image.  A zarr array, or a DataArray from
        :func:`~n2v_chunked.io.sources.open_image` that still holds the data
        it read (it hands the zarr array over), is read through zarr, not
        dask; any other dask array through dask.  A string is opened with
        ``zarr.open_array`` (local path or fsspec URL) in each process.
    patch_shape : sequence of int, optional
        Spatial patch shape; default 64x64 (2D) or 32x32x32 (3D).
    spatial_dims : sequence of str, optional
        ``("y", "x")`` or ``("z", "y", "x")``; default 3D when the data has
        ``z``.  Other dims except ``c`` are sample axes.
    dims : sequence of str, optional
        Dim names, required unless ``data`` is a DataArray.
    chunks : optional
        Notional chunking of a numpy array (default 256 along z/y/x).
    seed : int
        Seed of the validation split, the block order and the patches.
    val_fraction : float
        Fraction of blocks held out for validation (at least one when > 0).
    buffer_bytes : int
        Bound on decoded windows held plus reads in flight, per stream.
    reuse : float
        Average number of patches covering a voxel per block load (a block
        serves ``reuse`` times its volume over the patch volume).
    min_block_bytes : int
        Smallest block worth a read (a block spans whole chunks and at least
        twice the patch).
    straddle : bool
        Let patches cross into the following blocks (uniform coverage).
    io_threads : int
        Reader threads per stream (0: read in the consuming thread).
    min_std : float, optional
        Foreground filter: skip patches whose std (input units) is below.
    mask : array-like, optional
        Foreground mask over the non-channel dims (same shape, or a coarser
        grid mapped by nearest neighbour); a patch is kept when the mean of
        the mask over its footprint is at least ``min_foreground``.
    min_foreground : float
        See ``mask``.
    max_bad_chunks : int
        Corrupt or non-finite chunks skipped (with a warning each) per stream
        before giving up with :class:`N2VError`.
    rank, world_size : int, optional
        Distributed rank and size; default from ``torch.distributed`` when
        initialised, else 0 and 1.
    epochs : int, optional
        Passes over the training blocks before the stream ends (None: endless).

    Attributes
    ----------
    grid : BlockGrid
        The blocks (``grid.bounds(b)`` gives block ``b``'s extent).
    split : BlockSplit
        The validation hold-out (``split.is_val(b)``).
    train_blocks, val_blocks : sequence of int
        Flat ids of the training and held-out validation blocks, computed
        per item (``np.asarray`` lists them all; nothing is stored per block).
    n_channels : int
        C of the patches.
    """

    def __init__(
        self,
        data: Any,
        patch_shape: Sequence[int] | None = None,
        spatial_dims: Sequence[str] | None = None,
        *,
        dims: Sequence[str] | None = None,
        chunks: Any = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reuse: float = DEFAULT_REUSE,
        min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
        straddle: bool = True,
        io_threads: int = 2,
        min_std: float | None = None,
        mask: Any = None,
        min_foreground: float = 0.25,
        max_bad_chunks: int = 10,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self._source, self.dims = open_source(data, dims, chunks)
        self._set_patch(patch_shape, spatial_dims, self._source.shape)
        self._set_grid(min_block_bytes, with_mask=mask is not None)
        self.mask = None if mask is None else open_mask(mask, self.grid.shape, self.grid.dims)
        self._set_rest(straddle, buffer_bytes, val_fraction, reuse, io_threads, min_std, min_foreground,
                       max_bad_chunks, rank, world_size, epochs, seed)

    def _set_rest(self, straddle: bool, buffer_bytes: int, val_fraction: float, reuse: float, io_threads: int,
                  min_std: float | None, min_foreground: float, max_bad_chunks: int, rank: int | None,
                  world_size: int | None, epochs: int | None, seed: int) -> None:
        """The settings every sampler shares, once its grid is set; then the split and pass 0."""
        self.straddle = bool(straddle)
        self._set_buffer(buffer_bytes)
        self.val_fraction = float(val_fraction)
        self.reuse = float(reuse)
        self.io_threads = max(0, int(io_threads))
        self.min_std = None if min_std is None else float(min_std)
        self.min_foreground = float(min_foreground)
        self.max_bad_chunks = int(max_bad_chunks)
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self._val_cache: dict[int, np.ndarray] = {}
        self._set_seed(int(seed))
        self.set_epoch(0)

    # -- set-up steps ------------------------------------------------------------

    def _set_patch(self, patch_shape: Sequence[int] | None, spatial_dims: Sequence[str] | None,
                   shape: Sequence[int]) -> None:
        """Check and set ``spatial_dims``, ``patch_shape``, the channel axis and ``n_channels``."""
        dims = self.dims
        if spatial_dims is None:
            spatial_dims = ("z", "y", "x") if "z" in dims else ("y", "x")
        spatial_dims = tuple(spatial_dims)
        if spatial_dims not in (("y", "x"), ("z", "y", "x")):
            raise AxesError(f"spatial_dims must be ('y', 'x') or ('z', 'y', 'x'), got {spatial_dims}")
        missing = [d for d in spatial_dims if d not in dims]
        if missing:
            raise AxesError(f"spatial dim(s) {missing} not in the data's dims {dims}")
        if [d for d in dims if d in spatial_dims] != list(spatial_dims):
            raise AxesError(f"spatial dims {spatial_dims} must appear in that order in the data's dims {dims}")
        if patch_shape is None:
            patch_shape = (64, 64) if len(spatial_dims) == 2 else (32, 32, 32)
        patch_shape = tuple(int(p) for p in patch_shape)
        if len(patch_shape) != len(spatial_dims) or min(patch_shape) < 1:
            raise ConfigError(f"patch_shape {patch_shape} must give a positive size for each of {spatial_dims}")
        self.spatial_dims, self.patch_shape = spatial_dims, patch_shape
        self._c_axis = dims.index("c") if "c" in dims else None
        self.n_channels = int(shape[self._c_axis]) if self._c_axis is not None else 1

    def _set_grid(self, min_block_bytes: int, with_mask: bool) -> None:
        """Group the source's chunks into blocks over the grid dims (all but ``c``)."""
        src = self._source
        self._voxel_bytes = src.dtype.itemsize * self.n_channels + (1 if with_mask else 0)
        self.grid = self._block_grid(src.shape, src.chunks, self._voxel_bytes, min_block_bytes)

    def _block_grid(self, shape: Sequence[int], chunks: Sequence[Sequence[int]], voxel_bytes: int,
                    min_block_bytes: int) -> BlockGrid:
        """The block grid of an array of ``shape`` and ``chunks`` over all dims (sets the grid axes)."""
        dims = self.dims
        self._grid_axes = [i for i, d in enumerate(dims) if d != "c"]
        gdims = tuple(dims[i] for i in self._grid_axes)
        patch_all = tuple(self.patch_shape[self.spatial_dims.index(d)] if d in self.spatial_dims else 1 for d in gdims)
        return make_block_grid(
            [shape[i] for i in self._grid_axes], [chunks[i] for i in self._grid_axes], gdims, patch_all,
            voxel_bytes=voxel_bytes, min_block_bytes=min_block_bytes,
            spatial=[d in self.spatial_dims for d in gdims],
        )

    def _set_buffer(self, buffer_bytes: int) -> None:
        """Share the buffer budget out in slots of the largest block window."""
        window = self.grid.max_window_voxels(self.straddle) * self._voxel_bytes
        self._slots_total = int(buffer_bytes) // window
        if self._slots_total < 1:
            raise ConfigError(
                f"buffer_bytes={buffer_bytes} cannot hold one block window ({window} bytes); "
                "raise buffer_bytes or use smaller blocks"
            )
        self.buffer_bytes = int(buffer_bytes)

    @property
    def name(self) -> str:
        """The source, for messages."""
        return self._source.name

    # -- blocks, schedule, state ---------------------------------------------

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        self.split = self._make_split(seed)
        self.train_blocks, self.val_blocks = self.split.train, self.split.val
        # A block's quota depends on its shape only: one per stratum, and sums over strata.
        patch = math.prod(self.grid.patch)
        self._stratum_quota = np.array([max(1, round(self.reuse * own / patch))
                                        for own in self.grid.strata.own(self.straddle)], dtype=np.int64)
        self._pass_quota = int(self._stratum_quota @ self.split.train_per_stratum)
        self._val_cache.clear()

    def _make_split(self, seed: int) -> BlockSplit:
        """The validation hold-out: ``val_fraction`` of the blocks, stratified by shape."""
        return split_validation(self.grid, self.val_fraction, seed)

    def block_quota(self, block: Index) -> Index:
        """Patches block(s) ``block`` serve per load: ``max(1, round(reuse * owned origins / patch voxels))``."""
        q = self._stratum_quota[self.grid.strata.locate(block)[0]]
        return q if isinstance(block, np.ndarray) else int(q)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at pass ``epoch`` over the training blocks."""
        self._epoch = int(epoch)
        self._served = 0
        self._resume = 0

    def state_dict(self, patches_served: int | None = None) -> dict[str, int]:
        """Where the stream stands, for resuming.

        Parameters
        ----------
        patches_served : int, optional
            Patches this process (rank) consumed since the last
            :meth:`set_epoch` / :meth:`load_state_dict`, all its loader
            workers together (e.g. steps x batch size).  Needed with loader
            workers, whose counts the main process cannot see; default the
            count iterated in this process.

        Returns
        -------
        dict
            ``seed``, ``epoch`` and ``patches_served`` over all ranks (ranks
            step together, so this rank's count times the world size).
        """
        local = self._served if patches_served is None else int(patches_served)
        served = self._resume + local * self._rank_world()[1]
        return {"seed": self.seed, "epoch": self._epoch, "patches_served": served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: later iteration skips to the pass and block
        reached, re-seeded from (seed, pass, block), without replaying patches."""
        unknown = set(state) - {"seed", "epoch", "patches_served"}
        if unknown:
            raise N2VError(f"unknown sampler state key(s): {sorted(unknown)}")
        if int(state["seed"]) != self.seed:
            self._set_seed(int(state["seed"]))
        self._epoch = int(state.get("epoch", 0))
        self._resume = int(state.get("patches_served", 0))
        self._served = 0

    def _epoch_quota(self, epoch: int, n_streams: int) -> int:
        """Patches all streams serve in pass ``epoch``."""
        if len(self.train_blocks) >= n_streams:  # each training block once: the same every pass
            return self._pass_quota
        # fewer blocks than streams: one block per stream, some served twice
        return sum(self.block_quota(assign_blocks(self.train_blocks, epoch, s, n_streams, self.seed)[0])
                   for s in range(n_streams))

    def _start_position(self, stream: int, n_streams: int) -> tuple[int, int]:
        """(pass, index into this stream's blocks of that pass) reached after the served patches.

        All streams are assumed to have served the same fraction of a pass
        (a loader takes batches from its workers in turn), and inside a pass
        quotas to accrue in proportion to the blocks loaded (blocks come in
        random order, so a stream's first blocks are a random sample of its
        shapes), so the position is arithmetic, whatever the volume.
        """
        epoch, left = self._epoch, self._resume
        if len(self.train_blocks) >= n_streams:  # every pass serves the same total
            epoch, left = epoch + left // self._pass_quota, left % self._pass_quota
        else:
            while left >= (per_pass := self._epoch_quota(epoch, n_streams)):
                epoch, left = epoch + 1, left - per_pass
        n = len(assign_blocks(self.train_blocks, epoch, stream, n_streams, self.seed))
        return epoch, left * n // self._epoch_quota(epoch, n_streams)

    def _schedule(self, stream: int, n_streams: int) -> Iterator[tuple[int, int]]:
        """(pass, block) pairs this stream loads, from the resume position on."""
        epoch, start = self._start_position(stream, n_streams)
        stop = None if self.epochs is None else self._epoch + int(self.epochs)
        while stop is None or epoch < stop:
            blocks = assign_blocks(self.train_blocks, epoch, stream, n_streams, self.seed)
            for i in range(start, len(blocks)):
                yield epoch, blocks[i]
            epoch, start = epoch + 1, 0

    def _rank_world(self) -> tuple[int, int]:
        """Distributed rank and world size: explicit, else from ``torch.distributed``, else (0, 1)."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank() if rank is None else rank
                world = torch.distributed.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world size {world}")
        return rank, world

    def _streams(self) -> tuple[int, int]:
        """(this stream, number of streams) from loader worker and distributed rank."""
        rank, world = self._rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    # -- reading blocks ---------------------------------------------------------

    def _region(self, window: Box) -> tuple[slice, ...]:
        region = [slice(None)] * len(self.dims)
        for ax, (lo, hi) in zip(self._grid_axes, window):
            region[ax] = slice(lo, hi)
        if self._c_axis is not None:
            region[self._c_axis] = slice(0, self.n_channels)
        return tuple(region)

    def _window_nbytes(self, block: int) -> int:
        return math.prod(hi - lo for lo, hi in self.grid.window(block, self.straddle)) * self._voxel_bytes

    def _load(self, epoch: int, block: int, stream: int, known_bad: frozenset, validation: bool = False) -> Loaded:
        """Read one block window and prepare its patch origins (runs in a reader thread)."""
        return self._load_from(self._source, self.grid, 0, block, epoch, stream, known_bad, validation)

    def _load_from(self, source: Any, grid: Any, offset: int, local: int, epoch: int, stream: int,
                   known_bad: frozenset, validation: bool, scale: tuple[np.ndarray, np.ndarray] | None = None,
                   ) -> Loaded:
        """Read block ``local`` of ``grid`` over ``source`` (block ``offset + local`` of this dataset).

        ``scale``: per-channel ``(a, b)``; the window becomes ``a * x + b``
        in float32 (a collection normalised per image).
        """
        block = offset + local
        straddle = self.straddle and not validation
        window = grid.window(local, straddle)
        own = grid.origin_box(local, straddle)
        mask_win = None
        if self.mask is not None:
            mask_win = read_mask(self.mask, window, grid.shape)
            core = tuple(slice(lo - w0, hi - w0 + p - 1) for (lo, hi), (w0, _), p in zip(own, window, grid.patch))
            if not mask_win[core].any():
                return Loaded(None, {}, background=True, block=block)
        data, bad = read_window(source, self._region(window), known_bad)
        # Forbidden footprint regions: other validation blocks (for training), bad chunks.
        forbidden: list[Box] = []
        for other in grid.blocks_overlapping(window):
            if other != local and (validation or self.split.is_val(offset + other)):
                forbidden.append(grid.bounds(other))
        for chunk in set(bad) | known_bad:
            ext = chunk_slices(source, chunk)
            forbidden.append(tuple((ext[ax].start, ext[ax].stop) for ax in self._grid_axes))
        boxes = origin_boxes(own, forbidden, grid.patch)
        if not boxes:
            return Loaded(None, bad, block=block)
        if self._c_axis is not None:
            data = np.moveaxis(data, self._c_axis, 0)
        else:
            data = data[None]
        if scale is not None:
            shape = (-1,) + (1,) * (data.ndim - 1)
            data = data.astype(np.float32) * scale[0].reshape(shape) + scale[1].reshape(shape)
        local_boxes = [tuple((lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, window)) for box in boxes]
        view = np.lib.stride_tricks.sliding_window_view(data, (self.n_channels, *grid.patch))
        mask_view = None
        if mask_win is not None:
            mask_view = np.lib.stride_tricks.sliding_window_view(mask_win, grid.patch)
        rng = seeded_rng(self.seed, TAG_VALDRAW if validation else TAG_BLOCK, epoch, block, stream)
        nbytes = data.nbytes + (mask_win.nbytes if mask_win is not None else 0)
        return Loaded(Entry(block, view, mask_view, local_boxes, rng, self.block_quota(block), nbytes), bad)

    # -- iteration ------------------------------------------------------------

    def stream(self, stream: int | None = None, n_streams: int | None = None) -> PatchStream:
        """A :class:`PatchStream` for this process (worker and rank from the environment unless given)."""
        if stream is None or n_streams is None:
            stream, n_streams = self._streams()
        spec = StreamSpec(
            name=self.name,
            schedule=self._schedule(stream, n_streams),
            # re-seeded from the start position: a resumed stream skips without replaying
            rng=seeded_rng(self.seed, TAG_SLOT, stream, n_streams, *self._start_position(stream, n_streams)),
            blocks_per_pass=len(assign_blocks(self.train_blocks, 0, stream, n_streams, self.seed)),
            train_blocks=len(self.train_blocks),
            slots=self._slots_total,
            io_threads=self.io_threads,
            max_bad_chunks=self.max_bad_chunks,
            window_nbytes=self._window_nbytes,
            load=self._load,
            foreground=self._foreground(),
            batch_shape=(self.n_channels, *self.patch_shape),
            draw_shape=(self.n_channels, *self.grid.patch),
        )
        return PatchStream(spec, stream, n_streams)

    def _foreground(self) -> Foreground:
        return Foreground(self.min_std, self.min_foreground, masked=self.mask is not None)

    def __iter__(self) -> Iterator[torch.Tensor]:
        s = self.stream()
        try:
            for patch in s:
                self._served += 1
                yield patch
        finally:
            s.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_val_cache"] = {}  # validation patches stay in the main process
        return state

    # -- validation -----------------------------------------------------------

    def validation_patches(self, n: int) -> np.ndarray:
        """A fixed validation set drawn once from the held-out blocks.

        Patches lie entirely inside validation blocks; the same ``n`` and
        seed always give the same array.

        Returns
        -------
        ndarray
            float32, shape ``(n, C, *patch_shape)``.
        """
        n = int(n)
        if n in self._val_cache:
            return self._val_cache[n]
        if len(self.val_blocks) == 0:
            raise ConfigError("no validation blocks: val_fraction is 0")
        shuffle = Permutation(len(self.val_blocks), self.seed, TAG_VALDRAW)  # mixes the strata
        # enough blocks for variety, not a full read
        order = [self.val_blocks[shuffle(k)] for k in range(min(len(self.val_blocks), n, 64))]
        out = np.empty((n, self.n_channels, *self.patch_shape), dtype=np.float32)
        flat = out.reshape(n, self.n_channels, *self.grid.patch)
        bad = BadChunks(self.name, self.max_bad_chunks)
        foreground = self._foreground()
        got, tries = 0, 0
        for k, block in enumerate(order):
            loaded = self._load(0, int(block), 0, bad.snapshot(), validation=True)
            bad.add(loaded.bad)
            entry = loaded.entry
            if entry is None:
                continue
            want = math.ceil((n - got) / (len(order) - k))
            misses = 0
            while want > 0 and misses < BLOCK_TRIES:
                origin = entry.next_origin()
                patch = entry.view[origin]
                if foreground.active and not foreground.accepts(entry, origin, patch):
                    misses += 1
                    tries += 1
                    continue
                flat[got] = patch
                got, want, misses = got + 1, want - 1, 0
            if got == n:
                break
        if got == 0:
            why = (f"every one holds bad chunks{bad.summary()}" if bad.reasons
                   else "the held-out data looks all-background")
            raise UnreadableDataError(f"no validation patch found in the {len(order)} validation block(s) of "
                           f"{self.name} after {tries} tries: {why}")
        if got < n:  # filters left some blocks short: repeat the accepted patches
            flat[got:] = flat[np.arange(n - got) % got]
        self._val_cache[n] = out
        return out




def batches(dataset: Iterable[torch.Tensor], batch_size: int, prefetch: int = 2,
            pin: bool = False) -> Iterator[torch.Tensor]:
    """Group patches into ``(B, C, *patch)`` float32 tensors, drawn ahead in a thread.

    A :class:`ZarrPatchDataset` is drawn straight into each batch array (no
    per-patch tensors); any other iterable of ``(C, *patch)`` patches is
    stacked.  A finite stream ends with a short last batch.

    Parameters
    ----------
    dataset : ZarrPatchDataset or iterable of tensors
        Where the patches come from.
    batch_size : int
        Patches per batch.
    prefetch : int
        Batches prepared ahead by a background thread, so that drawing
        overlaps the consumer's work (0: draw on demand in the caller).
    pin : bool
        Batches in page-locked memory when CUDA is present (for a consumer on
        a GPU): a :class:`ZarrPatchDataset` draws straight into it, other
        patches are pinned in the background thread.
    """
    if isinstance(dataset, ZarrPatchDataset):
        s = dataset.stream()
        try:
            for batch in ahead(iter(lambda: s.next_batch(batch_size, pin), None), prefetch):
                dataset._served += len(batch)
                yield batch
        finally:
            s.close()
        return

    def stacked() -> Iterator[torch.Tensor]:
        buf: list[torch.Tensor] = []
        for patch in dataset:
            buf.append(torch.as_tensor(patch))
            if len(buf) == batch_size:
                yield pinned(torch.stack(buf), pin)
                buf = []
        if buf:
            yield pinned(torch.stack(buf), pin)

    yield from ahead(stacked(), prefetch)
