"""The patch sampler over a collection of images: :class:`CollectionPatchDataset`.

One model trains on all images of a plate, container or folder
(:mod:`n2v_chunked.io.collections`).  The images' blocks are numbered one
after the other into one block space, so everything the single-image sampler
does per block (the validation split, seeded passes dealt out to streams,
the bounded buffer, resume) works unchanged: a pass loads every training
block of every image once, and a block serves patches in proportion to its
volume, so every pixel of the collection is equally likely whatever the size
of its image.

Nothing here reads a pixel before it is needed: the block grids come from
the listing's shapes and chunks (metadata), an image is opened when a block
of it is first loaded, and the statistics read a bounded sample
(:data:`COLLECTION_STATS_REGIONS` regions over the whole collection,
:data:`IMAGE_STATS_REGIONS` per image).  Memory is the buffer plus a few
numbers per image.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import numpy as np
from torch.utils.data import IterableDataset

from ..errors import CollectionError, ConfigError
from ..io.collections import ImageEntry, check_consistent, some_names
from ..io.sources import open_image
from ..model.normalization import channel_stats, pooled_stats
from .access import open_source
from .dataset import DEFAULT_BUFFER_BYTES, ZarrPatchDataset
from .grid import DEFAULT_MIN_BLOCK_BYTES, DEFAULT_REUSE, TAG_VAL, BlockGrid, Box, Index, seeded_rng
from .order import BlockSplit, Permutation, split_validation
from .stream import Loaded

#: Regions sampled for the collection's statistics, spread over the images in proportion to their size.
COLLECTION_STATS_REGIONS = 64
COLLECTION_STATS_BYTES = 64 * 2**20
#: Regions sampled per image for per-image statistics, within a budget that keeps them small (each
#: decodes a chunk: 8 regions of a 2048^2 field of 512^2 chunks take about 50 ms, benchmarks/collections.py);
#: an image within the budget is read whole (exact).
IMAGE_STATS_REGIONS = 8
IMAGE_STATS_BYTES = 2**20
VAL_BY = ("block", "image")
NORMALIZE_PER = ("collection", "image")


class CollectionStrata:
    """The strata of several block grids, numbered one grid after the other (the interface of
    :class:`~n2v_chunked.sampling.grid.Strata` that the split and the quotas use)."""

    def __init__(self, grids: Sequence[BlockGrid], offsets: np.ndarray) -> None:
        self._grids, self._offsets = grids, offsets
        counts = [len(g.strata.sizes) for g in grids]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first stratum of each grid
        self.sizes = np.concatenate([g.strata.sizes for g in grids]).astype(np.int64)
        self.n_blocks = int(offsets[-1])

    def own(self, straddle: bool) -> list[int]:
        return [v for g in self._grids for v in g.strata.own(straddle)]

    def grid_of(self, stratum: Index) -> Index:
        """The grid (image) stratum(s) ``stratum`` belong to."""
        return np.searchsorted(self.starts, stratum, side="right") - 1

    def locate(self, block: Index) -> tuple[Index, Index]:
        """(stratum, rank) of block id(s) ``block``."""
        if not isinstance(block, np.ndarray):
            i = int(np.searchsorted(self._offsets, block, side="right") - 1)
            k, rank = self._grids[i].strata.locate(int(block - self._offsets[i]))
            return int(self.starts[i] + k), int(rank)
        images = np.searchsorted(self._offsets, block, side="right") - 1
        stratum, rank = np.empty_like(block), np.empty_like(block)
        for i in np.unique(images).tolist():
            sel = images == i
            k, r = self._grids[i].strata.locate(block[sel] - self._offsets[i])
            stratum[sel], rank[sel] = np.asarray(k) + self.starts[i], r
        return stratum, rank

    def block(self, stratum: Index, rank: Index) -> Index:
        """Block id(s) of rank ``rank`` in stratum ``stratum``."""
        if not isinstance(stratum, np.ndarray) and not isinstance(rank, np.ndarray):
            i = int(self.grid_of(stratum))
            return int(self._offsets[i] + self._grids[i].strata.block(int(stratum - self.starts[i]), int(rank)))
        stratum, rank = np.broadcast_arrays(np.asarray(stratum), np.asarray(rank))
        images, out = self.grid_of(stratum), np.empty(stratum.shape, np.int64)
        for i in np.unique(images).tolist():
            sel = images == i
            out[sel] = self._offsets[i] + np.asarray(self._grids[i].strata.block(stratum[sel] - self.starts[i], rank[sel]))
        return out


class CollectionGrid:
    """The block grids of a collection's images as one block space (the parts of
    :class:`~n2v_chunked.sampling.grid.BlockGrid` the sampler uses)."""

    def __init__(self, grids: Sequence[BlockGrid]) -> None:
        self.grids = list(grids)
        self.offsets = np.concatenate([[0], np.cumsum([g.n_blocks for g in self.grids])]).astype(np.int64)
        self.patch = self.grids[0].patch
        self.n_blocks = int(self.offsets[-1])
        self.strata = CollectionStrata(self.grids, self.offsets)

    def locate(self, block: int) -> tuple[int, int]:
        """(image, block of that image's grid) of block ``block``."""
        i = int(np.searchsorted(self.offsets, block, side="right") - 1)
        return i, int(block - self.offsets[i])

    def window(self, block: int, straddle: bool) -> Box:
        i, local = self.locate(block)
        return self.grids[i].window(local, straddle)

    def max_window_voxels(self, straddle: bool) -> int:
        return max(g.max_window_voxels(straddle) for g in self.grids)


def allocate(sizes: Sequence[int], n: int, seed: int) -> np.ndarray:
    """``n`` draws over items in proportion to ``sizes`` (systematic sampling): the count each item gets.

    Examples
    --------
    >>> allocate([100, 300], 4, seed=0).tolist()
    [1, 3]
    """
    cum = np.cumsum(np.asarray(sizes, dtype=np.float64))
    offset = seeded_rng(seed, TAG_VAL, n).random()
    points = (np.arange(n) + offset) * cum[-1] / n
    return np.bincount(np.searchsorted(cum, points, side="right"), minlength=len(cum))[: len(cum)]


class CollectionPatchDataset(ZarrPatchDataset):
    """Stream of random training patches from all images of a collection.

    As :class:`~n2v_chunked.sampling.dataset.ZarrPatchDataset` (iteration,
    :func:`~n2v_chunked.sampling.dataset.batches`, loader workers, ranks,
    resume, :meth:`validation_patches`), over the images' blocks numbered one
    after the other.  Images are opened when a block of theirs is first read.

    Parameters
    ----------
    images : sequence of ImageEntry
        The images (:func:`~n2v_chunked.io.collections.open_collection`);
        their axes and channels must agree, and each must hold a patch.
    patch_shape, spatial_dims
        As for :class:`ZarrPatchDataset` (patch required).
    axes, level, storage_options
        How each image is opened (as the listing opened it).
    val_by : {"block", "image"}
        Hold out ``val_fraction`` of the blocks of every image (stratified
        by block shape over the collection), or whole images: ``val_fraction``
        of them, at least one.
    normalize_per : {"collection", "image"}
        ``"image"``: each image's patches are normalised with that image's
        own statistics (:meth:`image_stats`), then mapped to the units of
        :attr:`reference` (:meth:`collection_stats` unless set), so that a
        training loop normalising with the reference sees each image
        normalised by its own.  ``"collection"``: patches in input units.
    seed, val_fraction, buffer_bytes, reuse, min_block_bytes, straddle, io_threads, min_std, max_bad_chunks, rank, world_size, epochs
        As for :class:`ZarrPatchDataset`.

    Attributes
    ----------
    opened : int
        Images opened in this process so far (their metadata; chunks are read per block).
    """

    def __init__(
        self,
        images: Sequence[ImageEntry],
        patch_shape: Sequence[int],
        spatial_dims: Sequence[str] | None = None,
        *,
        axes: str | None = None,
        level: int = 0,
        storage_options: dict[str, Any] | None = None,
        val_by: str = "block",
        normalize_per: str = "collection",
        seed: int = 0,
        val_fraction: float = 0.1,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reuse: float = DEFAULT_REUSE,
        min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
        straddle: bool = True,
        io_threads: int = 2,
        min_std: float | None = None,
        max_bad_chunks: int = 10,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
    ) -> None:
        IterableDataset.__init__(self)
        if val_by not in VAL_BY:
            raise ConfigError(f"val_by must be one of {', '.join(VAL_BY)}, got {val_by!r}")
        if normalize_per not in NORMALIZE_PER:
            raise ConfigError(f"normalize_per must be one of {', '.join(NORMALIZE_PER)}, got {normalize_per!r}")
        self.images = tuple(images)
        if not self.images:
            raise CollectionError("a collection to train on needs at least one image")
        check_consistent(self.images)
        self.val_by, self.normalize_per = val_by, normalize_per
        self._open_args = (axes, int(level), dict(storage_options or {}))
        self.dims = tuple(self.images[0].axes)
        self._set_patch(patch_shape, spatial_dims, self.images[0].shape)
        self._refuse_small()
        self._set_grids(min_block_bytes)
        self.mask = None
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self._stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._members: dict[int, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self._set_rest(straddle, buffer_bytes, val_fraction, reuse, io_threads, min_std, 0.25,
                       max_bad_chunks, rank, world_size, epochs, seed)

    # -- set-up ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"the collection of {len(self.images)} image(s)"

    def _refuse_small(self) -> None:
        """Refuse, naming them, the images that cannot hold a patch."""
        small = [im.name for im in self.images
                 if any(im.shape[self.dims.index(d)] < p for d, p in zip(self.spatial_dims, self.patch_shape))]
        if small:
            patch = "x".join(str(p) for p in self.patch_shape)
            raise CollectionError(f"{len(small)} image(s) are smaller than the {patch} patch ({some_names(small)}): "
                                  "leave them out with --select, or train with a smaller --patch")

    def _set_grids(self, min_block_bytes: int) -> None:
        """Each image's block grid from its listed shape and chunks (nothing opened)."""
        self.grid = CollectionGrid([
            self._block_grid(im.shape, im.chunks or tuple((n,) for n in im.shape),
                             np.dtype(im.dtype).itemsize * self.n_channels, min_block_bytes)
            for im in self.images])
        # the buffer's unit: a window of the widest dtype (float32 once normalised per image)
        widest = max(np.dtype(im.dtype).itemsize for im in self.images)
        self._voxel_bytes = (4 if self.normalize_per == "image" else widest) * self.n_channels

    def _make_split(self, seed: int) -> BlockSplit:
        if self.val_by == "block" or self.val_fraction == 0:
            return split_validation(self.grid, self.val_fraction, seed)  # type: ignore[arg-type]
        n = len(self.images)
        n_val = max(1, int(round(self.val_fraction * n)))
        if n_val >= n:
            raise ConfigError(f"a validation split by image needs at least {n_val + 1} images to hold out {n_val} "
                              f"and train on the rest; the collection has {n}: use --val-by block")
        perm = Permutation(n, seed, TAG_VAL)
        held = np.zeros(n, dtype=bool)
        held[[perm(k) for k in range(n_val)]] = True
        strata = self.grid.strata
        return BlockSplit(strata, self.val_fraction, seed, held[strata.grid_of(np.arange(len(strata.sizes)))])

    @property
    def held_out_images(self) -> list[str]:
        """Names of the images held out whole for validation (``val_by="image"``)."""
        if self.val_by != "image":
            return []
        counts = np.add.reduceat(self.split.val_per_stratum, self.grid.strata.starts[:-1])
        return [im.name for im, c in zip(self.images, counts) if c]

    # -- images, opened on demand ------------------------------------------

    def share_images(self, other: CollectionPatchDataset) -> None:
        """Use ``other``'s opened images and per-image statistics (samplers of one run over the same images)."""
        if other.images != self.images:
            raise ConfigError("share_images needs a sampler over the same images")
        self._members, self._stats, self._lock = other._members, other._stats, other._lock

    def _member(self, i: int) -> tuple[Any, Any]:
        """Image ``i`` as (DataArray, sampler source), opened on first use."""
        with self._lock:
            if i not in self._members:
                im = self.images[i]
                axes, level, options = self._open_args
                arr = open_image(im.path, axes, level, storage_options=options)
                if tuple(arr.shape) != tuple(im.shape):
                    raise CollectionError(f"image {im.name} changed since it was listed: shape "
                                          f"{tuple(arr.shape)}, listed {tuple(im.shape)}")
                self._members[i] = (arr, open_source(arr, None, None)[0])
                self.opened += 1
            return self._members[i]

    def image_stats(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of image ``i`` from a bounded sample (cached)."""
        if i not in self._stats:
            arr = self._member(i)[0]
            stats = channel_stats(arr, max_bytes=IMAGE_STATS_BYTES, max_regions=IMAGE_STATS_REGIONS, seed=self.seed)
            with self._lock:
                self._stats[i] = stats
        return self._stats[i]

    def collection_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the whole collection, from a bounded sample.

        :data:`COLLECTION_STATS_REGIONS` regions are dealt out to the images
        in proportion to their size (so at most that many images are read,
        however many there are); each image's share is sampled as
        :func:`~n2v_chunked.model.normalization.channel_stats` samples one
        image, and the shares are pooled, weighted by their regions.
        """
        n = COLLECTION_STATS_REGIONS
        counts = allocate([math.prod(im.shape) for im in self.images], n, self.seed)
        parts = []
        for i in np.flatnonzero(counts).tolist():
            k = int(counts[i])
            mean, std = channel_stats(self._member(i)[0], max_bytes=max(COLLECTION_STATS_BYTES * k // n, 1), max_regions=k,
                                      seed=self.seed)
            parts.append((k, mean, std))
        return pooled_stats(*zip(*parts))

    def _scale(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Image ``i``'s per-channel map to the reference units (``normalize_per="image"``), else None."""
        if self.normalize_per != "image":
            return None
        if self.reference is None:
            raise ConfigError("normalize_per='image' needs the dataset's reference statistics: set .reference "
                              "(e.g. to collection_stats()) before drawing patches")
        mean, std = self.image_stats(i)
        ref_mean, ref_std = (np.asarray(v, np.float64) for v in self.reference)
        a = ref_std / std
        return a.astype(np.float32), (ref_mean - mean * a).astype(np.float32)

    def _load(self, epoch: int, block: int, stream: int, known_bad: frozenset, validation: bool = False) -> Loaded:
        """Read one block of one image; bad chunks are keyed ``(image, *chunk)``."""
        i, local = self.grid.locate(block)
        source = self._member(i)[1]
        mine = frozenset(k[1:] for k in known_bad if k[0] == i)
        loaded = self._load_from(source, self.grid.grids[i], int(self.grid.offsets[i]), local, epoch, stream, mine,
                                 validation, self._scale(i))
        loaded.bad = {(i, *k): f"(image {self.images[i].name}) {why}" for k, why in loaded.bad.items()}
        return loaded

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_members"], state["_lock"] = {}, None  # reopened in each loader worker
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
