"""Block geometry of the patch sampler: blocks, validation hold-out, patch origins.

Every dim except ``c`` is a *grid dim*.  Spatial grid dims have the patch
extent; all others (``t``, ``z`` for a 2D model, extra axes) have extent 1, so
sample axes need no special case.  A block *owns* the patch origins inside it.
With ``straddle`` a block's window also holds ``patch - 1`` voxels of the
following blocks, so patches cross block borders and every voxel is equally
likely to be sampled; training patches never reach into held-out validation
blocks or bad chunks, because those regions are cut out of the allowed origins
(:func:`origin_boxes`).

Pure functions of shapes and seeds: no array is read here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from ..errors import N2VError

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
            raise N2VError(f"volume is smaller than the patch along axis '{d}': size {n} < patch {p}")
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


def split_validation(n_blocks: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a deterministic random fraction of blocks for validation.

    Parameters
    ----------
    n_blocks : int
        Number of blocks.
    fraction : float
        Fraction held out (at least one block when > 0).
    seed : int
        Seed of the split.

    Returns
    -------
    train, val : ndarray of int
        Sorted flat block ids.

    Examples
    --------
    >>> train, val = split_validation(20, 0.1, seed=0)
    >>> len(train), len(val)
    (18, 2)
    >>> sorted(train.tolist() + val.tolist()) == list(range(20))
    True
    >>> bool((split_validation(20, 0.1, seed=0)[1] == val).all())  # the same seed, the same split
    True
    """
    if not 0.0 <= fraction < 1.0:
        raise N2VError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n_blocks)))
    if n_blocks - n_val < 1:
        raise N2VError(
            f"cannot hold out validation data: the array has only {n_blocks} block(s); "
            "use val_fraction=0 or smaller chunks"
        )
    perm = seeded_rng(seed, TAG_VAL).permutation(n_blocks)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def assign_blocks(train: np.ndarray, epoch: int, stream: int, n_streams: int, seed: int) -> np.ndarray:
    """Blocks that stream ``stream`` of ``n_streams`` loads in pass ``epoch``.

    Every pass is a fresh permutation of the training blocks dealt out
    round-robin, so streams never share a block (unless there are fewer
    blocks than streams, when each stream gets one block).
    """
    perm = train[seeded_rng(seed, TAG_PERM, epoch).permutation(len(train))]
    if len(perm) >= n_streams:
        return perm[stream::n_streams]
    return perm[[stream % len(perm)]]


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

