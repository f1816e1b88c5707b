"""Block geometry of the patch sampler: blocks, strata of equally shaped blocks, patch origins.

Every dim except ``c`` is a *grid dim*.  Spatial grid dims have the patch
extent; all others (``t``, ``z`` for a 2D model, extra axes) have extent 1, so
sample axes need no special case.  A block *owns* the patch origins inside it.
With ``straddle`` a block's window also holds ``patch - 1`` voxels of the
following blocks, so patches cross block borders and every voxel is equally
likely to be sampled; training patches never reach into held-out validation
blocks or bad chunks, because those regions are cut out of the allowed origins
(:func:`origin_boxes`).  Blocks are never listed: a grid keeps its block
edges per dim and groups blocks of equal shape into a few :class:`Strata`,
which :mod:`~n2v_chunked.sampling.order` splits and orders per block.

Pure functions of shapes and seeds: no array is read here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Iterable, Sequence, Union

import numpy as np

from ..errors import ConfigError

Box = tuple[tuple[int, int], ...]  # per grid dim: [lo, hi)

# Block size and reuse set the decode cost per patch.  A block's window also
# decodes the neighbouring chunks its straddling patches reach, which is 2.25x
# the block's own chunks for 512^2 blocks of 256^2 chunks and 1.56x for 1024^2.
# Measured (benchmarks/sampler.py, 2 cores, 64x64 patches, 256^2 Blosc chunks):
# 1 MiB / reuse 8: 0.28x in-memory crops; 4 MiB / reuse 16: 0.62x, with the
# 256 MiB buffer still holding about 50 blocks to mix from.
DEFAULT_MIN_BLOCK_BYTES = 4 * 2**20
DEFAULT_REUSE = 16.0
MIN_BLOCKS = 10  # below this, chunks are split so that validation can be held out

# Tags that keep the random streams of different purposes independent.
TAG_VAL, TAG_PERM, TAG_BLOCK, TAG_SLOT, TAG_VALDRAW = 1, 2, 3, 4, 5


def seeded_rng(*key: int) -> np.random.Generator:
    """An independent random generator for ``key`` (seed, purpose tag, pass, block, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Blocks of an array along its grid dims (all dims except ``c``).

    Attributes
    ----------
    dims : tuple of str
        Grid dims in array order.
    shape : tuple of int
        Array extent along each grid dim.
    patch : tuple of int
        Patch extent along each grid dim (1 on sample dims).
    edges : tuple of tuple of int
        Block boundaries per grid dim, from 0 to the extent.
    chunk_edges : tuple of tuple of int
        Storage chunk boundaries per grid dim.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    edges: tuple[tuple[int, ...], ...]
    chunk_edges: tuple[tuple[int, ...], ...]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks along each grid dim."""
        return tuple(len(e) - 1 for e in self.edges)

    @property
    def n_blocks(self) -> int:
        """Total number of blocks."""
        return math.prod(self.grid_shape)

    def bounds(self, block: int) -> Box:
        """Extent ``((lo, hi), ...)`` of flat block ``block``."""
        idx = np.unravel_index(block, self.grid_shape)
        return tuple((int(e[i]), int(e[i + 1])) for e, i in zip(self.edges, idx))

    def window(self, block: int, straddle: bool) -> Box:
        """Region read for a block: the block plus ``patch - 1`` voxels after it."""
        if not straddle:
            return self.bounds(block)
        return tuple((lo, min(hi + p - 1, n)) for (lo, hi), p, n in zip(self.bounds(block), self.patch, self.shape))

    def origin_box(self, block: int, straddle: bool) -> Box:
        """Patch origins owned by a block (before cutting out forbidden regions)."""
        b = self.bounds(block)
        if straddle:
            return tuple((lo, min(hi, n - p + 1)) for (lo, hi), p, n in zip(b, self.patch, self.shape))
        return tuple((lo, hi - p + 1) for (lo, hi), p in zip(b, self.patch))

    def blocks_overlapping(self, region: Box) -> list[int]:
        """Flat ids of the blocks that intersect ``region``."""
        ranges = []
        for (lo, hi), e in zip(region, self.edges):
            first = int(np.searchsorted(e, lo, side="right")) - 1
            last = int(np.searchsorted(e, hi, side="left"))
            ranges.append(range(max(first, 0), min(last, len(e) - 1)))
        return [int(np.ravel_multi_index(i, self.grid_shape)) for i in itertools.product(*ranges)]

    def max_window_voxels(self, straddle: bool) -> int:
        """Upper bound on the voxels of any block window (per channel)."""
        ext = [max(np.diff(e)) + (p - 1 if straddle else 0) for e, p in zip(self.edges, self.patch)]
        return math.prod(min(x, n) for x, n in zip(ext, self.shape))

    @functools.cached_property
    def strata(self) -> Strata:
        """The blocks grouped by shape (:class:`Strata`), built once from the per-dim edges."""
        return Strata.of(self)


Index = Union[int, np.ndarray]  # one index (block, stratum, rank, ...) or an int array of them


@dataclasses.dataclass(frozen=True, eq=False)
class Strata:
    """Blocks grouped by shape, addressed without listing them.

    Along each grid dim, the block indices with equal width and equal
    straddling origin extent (the last block's is ``patch - 1`` shorter) form
    a *class*; a *stratum* is one class per dim, so its blocks have the same
    owned origins (straddling or not) and the same patch quota.  There are
    few: interior and edge blocks per dim.  A block's *rank* numbers it
    inside its stratum (C order over its classes' members).  Memory is per
    dim (block indices), never per block.

    Attributes
    ----------
    grid_shape : tuple of int
        Blocks per grid dim.
    patch : tuple of int
        Patch extent per grid dim.
    extents : tuple of ndarray
        Per dim, ``(n_classes, 2)``: block width and straddling origin extent of each class.
    members : tuple of ndarray
        Per dim, the block indices ordered by class.
    starts : tuple of ndarray
        Per dim, where each class begins in ``members`` (and the end).
    cls, pos : tuple of ndarray
        Per dim, each block index's class and its position among the class's members.
    """

    grid_shape: tuple[int, ...]
    patch: tuple[int, ...]
    extents: tuple[np.ndarray, ...]
    members: tuple[np.ndarray, ...]
    starts: tuple[np.ndarray, ...]
    cls: tuple[np.ndarray, ...]
    pos: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, grid: BlockGrid) -> Strata:
        """The strata of ``grid``.

        Examples
        --------
        Straddling blocks of 64 along an extent of 200 with 16-voxel patches:
        the last block (72 wide) owns 72 - 15 origins:

        >>> grid = BlockGrid(("x",), (200,), (16,), ((0, 64, 128, 200),), ((0, 200),))
        >>> s = grid.strata
        >>> s.extents[0].tolist(), s.sizes.tolist(), s.own(straddle=True)
        ([[64, 64], [72, 57]], [2, 1], [64, 57])
        """
        per_dim = [_classes(np.asarray(e), n, p) for e, n, p in zip(grid.edges, grid.shape, grid.patch)]
        return cls(grid.grid_shape, grid.patch, *(tuple(x) for x in zip(*per_dim)))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def classes(self) -> tuple[int, ...]:
        """Classes per dim."""
        return tuple(len(e) for e in self.extents)

    @property
    def sizes(self) -> np.ndarray:
        """Blocks in each stratum (C order over the per-dim classes)."""
        return _outer([np.diff(s) for s in self.starts])

    def own(self, straddle: bool) -> list[int]:
        """Patch origins a block of each stratum owns (before cutting out forbidden regions)."""
        ext = [e[:, 1] if straddle else e[:, 0] - p + 1 for e, p in zip(self.extents, self.patch)]
        return [int(v) for v in _outer(ext)]

    def locate(self, block: Index) -> tuple[Index, Index]:
        """(stratum, rank) of flat block id(s) ``block``."""
        idx = np.unravel_index(block, self.grid_shape)
        stratum, rank = 0, 0
        for i, classes, starts, cls, pos in zip(idx, self.classes, self.starts, self.cls, self.pos):
            c = cls[i]
            stratum = stratum * classes + c
            rank = rank * (starts[c + 1] - starts[c]) + pos[i]
        return stratum, rank

    def block(self, stratum: Index, rank: Index) -> Index:
        """Flat block id(s) of rank ``rank`` in stratum ``stratum``."""
        c = np.unravel_index(stratum, self.classes)
        idx: list[Index] = [0] * len(c)
        for d in reversed(range(len(c))):
            start, size = self.starts[d][c[d]], self.starts[d][c[d] + 1] - self.starts[d][c[d]]
            idx[d] = self.members[d][start + rank % size]
            rank = rank // size
        flat = np.ravel_multi_index(idx, self.grid_shape)
        return flat if isinstance(flat, np.ndarray) else int(flat)


def _classes(edges: np.ndarray, n: int, p: int) -> tuple[np.ndarray, ...]:
    """One dim's classes: extents, members, starts, class and position of each block index."""
    lo, hi = edges[:-1], edges[1:]
    keys = np.stack([hi - lo, np.minimum(hi, n - p + 1) - lo], axis=1)
    extents, cls = np.unique(keys, axis=0, return_inverse=True)
    cls = cls.reshape(-1)
    members = np.argsort(cls, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(cls, minlength=len(extents)))])
    pos = np.empty_like(members)
    pos[members] = np.arange(len(members)) - starts[cls[members]]
    return extents, members, starts, cls, pos


def _outer(per_dim: Sequence[np.ndarray]) -> np.ndarray:
    """Products over dims of one value per class, for every combination (C order)."""
    out = np.ones((), dtype=np.int64)
    for v in per_dim:
        out = np.multiply.outer(out, np.asarray(v, dtype=np.int64))
    return out.reshape(-1)


def _group_edges(chunk_edges: Sequence[int], target: int, min_extent: int) -> tuple[int, ...]:
    """Group consecutive chunks into blocks of at least ``target`` voxels."""
    edges = [0]
    for e in chunk_edges[1:]:
        if e - edges[-1] >= target:
            edges.append(int(e))
    if edges[-1] != chunk_edges[-1]:
        edges.append(int(chunk_edges[-1]))
    # A short tail cannot hold a patch: merge it into its neighbour.
    if len(edges) > 2 and edges[-1] - edges[-2] < min_extent:
        del edges[-2]
    return tuple(edges)


def _split_edges(edges: Sequence[int], parts: int, min_extent: int) -> tuple[int, ...]:
    """Split each block into up to ``parts`` equal parts of at least ``min_extent`` voxels."""
    out = [0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = max(1, min(parts, (hi - lo) // min_extent))
        out.extend(int(lo + (hi - lo) * j // k) for j in range(1, k + 1))
    return tuple(out)


def make_block_grid(
    shape: Sequence[int],
    chunks: Sequence[Sequence[int]],
    dims: Sequence[str],
    patch: Sequence[int],
    *,
    voxel_bytes: int = 4,
    min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
    spatial: Sequence[bool] | None = None,
) -> BlockGrid:
    """Group storage chunks into blocks.

    Along spatial dims a block spans whole chunks and at least twice the patch,
    grown round-robin until it holds
    ``min_block_bytes``; along sample dims a block is one chunk.  A last block
    shorter than the patch is merged into its neighbour, so every block can
    hold a patch.  Arrays with fewer than ``MIN_BLOCKS`` chunk-aligned blocks
    are split inside chunks (small images are cheap to re-decode).

    Parameters
    ----------
    shape : sequence of int
        Extent along each grid dim.
    chunks : sequence of sequence of int
        Chunk sizes along each grid dim (dask style).
    dims : sequence of str
        Grid dim names (for messages).
    patch : sequence of int
        Patch extent per grid dim (1 on sample dims).
    voxel_bytes : int
        Bytes per grid voxel (item size times channels).
    min_block_bytes : int
        Smallest block worth a read.
    spatial : sequence of bool, optional
        Which grid dims are spatial (default: those with patch extent > 1).

    Returns
    -------
    BlockGrid

    Examples
    --------
    A 4096x4096 float32 image in 256x256 chunks, 64x64 patches: blocks of
    whole chunks, at least twice the patch, grown (x first) until they hold
    1 MiB, so 512x512:

    >>> chunks = ((256,) * 16, (256,) * 16)
    >>> grid = make_block_grid((4096, 4096), chunks, ("y", "x"), (64, 64), min_block_bytes=2**20)
    >>> grid.grid_shape, grid.bounds(1)
    ((8, 8), ((0, 512), (512, 1024)))

    With fewer than ``MIN_BLOCKS`` blocks (here 2x2 of 1024x1024), blocks are
    split so that validation can be held out:

    >>> make_block_grid((1024, 1024), ((256,) * 4, (256,) * 4), ("y", "x"), (64, 64),
    ...                 min_block_bytes=2**20).grid_shape
    (4, 4)
    """
    shape = tuple(int(n) for n in shape)
    patch = tuple(int(p) for p in patch)
    spatial = tuple(spatial) if spatial is not None else tuple(p > 1 for p in patch)
    for d, n, p in zip(dims, shape, patch):
        if n < p:
            raise ConfigError(f"volume is smaller than the patch along axis '{d}': size {n} < patch {p}")
    cedges = tuple(tuple(int(x) for x in np.concatenate([[0], np.cumsum(c)])) for c in chunks)
    csize = [max(c) for c in chunks]
    groups = [max(1, math.ceil(2 * p / c)) if s else 1 for p, c, s in zip(patch, csize, spatial)]
    # Grow spatial dims round-robin (smallest extent first) until a block is worth a read.
    while voxel_bytes * math.prod(min(g * c, n) for g, c, n in zip(groups, csize, shape)) < min_block_bytes:
        growable = [i for i in range(len(shape)) if spatial[i] and groups[i] * csize[i] < shape[i]]
        if not growable:
            break
        i = min(growable, key=lambda i: (groups[i] * csize[i], -i))
        groups[i] += 1
    edges = tuple(
        _group_edges(e, min(g * c, n), p) for e, g, c, n, p in zip(cedges, groups, csize, shape, patch)
    )
    # Too few blocks to hold out validation: split blocks inside chunks, as
    # little as needed (each part re-decodes its chunks).
    parts, grouped = 1, edges
    while math.prod(len(e) - 1 for e in edges) < MIN_BLOCKS:
        parts += 1
        split = tuple(_split_edges(e, parts, 2 * p) if s else e for e, p, s in zip(grouped, patch, spatial))
        if split == edges:
            break
        edges = split
    return BlockGrid(tuple(dims), shape, patch, edges, cedges)


# ----------------------------------------------------------------------------
# Patch positions
# ----------------------------------------------------------------------------


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def _subtract(box: Box, cut: Box) -> list[Box]:
    """``box`` minus ``cut`` as disjoint boxes."""
    if _intersect(box, cut) is None:
        return [box]
    out, cur = [], list(box)
    for d, ((lo, hi), (clo, chi)) in enumerate(zip(box, cut)):
        if lo < clo:
            out.append(tuple(cur[:d] + [(lo, clo)] + cur[d + 1:]))
        if chi < hi:
            out.append(tuple(cur[:d] + [(chi, hi)] + cur[d + 1:]))
        cur[d] = (max(lo, clo), min(hi, chi))
    return out


def origin_boxes(own: Box, forbidden: Iterable[Box], patch: Sequence[int]) -> list[Box]:
    """Origins in ``own`` whose patch footprint avoids every forbidden region.

    A patch at origin ``o`` covers ``[o, o + p)``; it touches region
    ``[a, b)`` iff ``a - p < o < b``, so each region removes the box
    ``[a - p + 1, b)`` of origins.
    """
    boxes = [own] if all(lo < hi for lo, hi in own) else []
    for region in forbidden:
        cut = tuple((a - p + 1, b) for (a, b), p in zip(region, patch))
        boxes = [piece for box in boxes for piece in _subtract(box, cut)]
    return boxes


def draw_origins(rng: np.random.Generator, boxes: Sequence[Box], n: int) -> np.ndarray:
    """``n`` origins drawn uniformly from the union of disjoint ``boxes``, shape ``(n, ndim)``."""
    lo = np.array([[b[0] for b in box] for box in boxes], dtype=np.int64)
    hi = np.array([[b[1] for b in box] for box in boxes], dtype=np.int64)
    vol = np.prod(hi - lo, axis=1).astype(np.float64)
    k = rng.choice(len(boxes), size=n, p=vol / vol.sum()) if len(boxes) > 1 else np.zeros(n, dtype=np.int64)
    return rng.integers(lo[k], hi[k])

