"""Seeded orders of blocks, computed per block: the validation hold-out and each stream's blocks per pass.

Nothing here lists the blocks.  A :class:`Permutation` maps an index to its
image and back in a few microseconds without a table, so a volume of 21
million blocks costs what one of ten does: the hold-out is the first
positions of a seeded permutation inside each stratum of equally shaped
blocks (:class:`~n2v_chunked.sampling.grid.Strata`), a pass is a seeded
permutation of the training blocks dealt out round-robin to the streams, and
totals over blocks (patches per pass) are sums over the few strata.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np

from ..errors import ConfigError
from .grid import TAG_PERM, TAG_VAL, BlockGrid, Index, Strata, seeded_rng

_MASK = 2**64 - 1
_ROUNDS = 8  # alternating rounds: each half is updated four times


def _hash(v: Index, key: int) -> Index:
    """64-bit mix of ``v`` under ``key`` (SplitMix64's finaliser), for an int or a uint64 array."""
    z = (v + key) & _MASK
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 31)


class Permutation:
    """A seeded bijection on ``range(n)``, evaluated per index: no table.

    A Feistel network on the digits of a two-digit mixed-radix number
    (radices ``a = ceil(sqrt(n))`` and ``b = ceil(n / a)``): each round adds a
    keyed hash of one digit to the other, modulo its radix, which is
    invertible whatever the hash.  That permutes ``range(a * b)``, which holds
    ``n`` with fewer than ``a`` to spare; an image at or beyond ``n`` is
    mapped again (cycle-walking) until it falls in range, which keeps the map
    a bijection on ``range(n)`` and takes one step on average.

    Parameters
    ----------
    n : int
        Size of the domain.
    *key : int
        Seed, purpose tag, pass, ...: equal keys give equal permutations.

    Examples
    --------
    >>> p = Permutation(10, 0, 2)
    >>> order = [p(i) for i in range(10)]
    >>> sorted(order) == list(range(10)), [p.index(b) for b in order] == list(range(10))
    (True, True)
    >>> bool((p(np.arange(10)) == order).all())  # an array of indices at once
    True
    """

    def __init__(self, n: int, *key: int) -> None:
        self.n = int(n)
        if self.n < 0:
            raise ValueError(f"a permutation of {n} items")
        self._a = math.isqrt(self.n - 1) + 1 if self.n > 1 else 1
        self._b = max(1, -(-self.n // self._a))
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(_ROUNDS, np.uint64)
        self._keys = tuple(int(k) for k in state)

    def __len__(self) -> int:
        return self.n

    def __call__(self, i: Index) -> Index:
        """The image of index ``i`` (an int, or an int array of indices)."""
        return self._walk(i, inverse=False)

    def index(self, x: Index) -> Index:
        """The index whose image is ``x``: the inverse permutation."""
        return self._walk(x, inverse=True)

    def _walk(self, i: Index, inverse: bool) -> Index:
        if isinstance(i, np.ndarray):
            if i.size and (i.min() < 0 or i.max() >= self.n):
                raise IndexError(f"index out of range({self.n})")
            x = self._rounds(i.astype(np.uint64), inverse)
            while (out := x >= self.n).any():
                x[out] = self._rounds(x[out], inverse)
            return x.astype(np.int64)
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range({self.n})")
        x = self._rounds(i, inverse)
        while x >= self.n:
            x = self._rounds(x, inverse)
        return x

    def _rounds(self, x: Index, inverse: bool) -> Index:
        """One pass of the network over ``range(a * b)`` (or its inverse)."""
        a, b = self._a, self._b
        hi, lo = x // b, x % b
        rounds = list(enumerate(self._keys))
        for r, key in reversed(rounds) if inverse else rounds:
            if r % 2 == 0:
                step = _hash(lo, key) % a
                hi = (hi + (a - step if inverse else step)) % a
            else:
                step = _hash(hi, key) % b
                lo = (lo + (b - step if inverse else step)) % b
        return hi * b + lo

    def __repr__(self) -> str:
        return f"Permutation(n={self.n})"


# ----------------------------------------------------------------------------
# Lazy sequences of block ids
# ----------------------------------------------------------------------------


class BlockIds(Sequence):
    """A sequence of block ids computed per item; ``np.asarray`` lists them all.

    Indexing takes an int (negative counts from the end) or an int array;
    iteration computes the ids a few thousand at a time.
    """

    def __init__(self, n: int) -> None:
        self._n = int(n)

    def _at(self, i: Index) -> Index:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._at(np.arange(self._n)[i])
        if isinstance(i, (np.ndarray, list)):
            i = np.asarray(i, dtype=np.int64)
            return self._at(np.where(i < 0, i + self._n, i))
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"block index {i} out of range({self._n})")
        return int(self._at(i + self._n if i < 0 else i))

    def __iter__(self) -> Iterator[int]:
        for lo in range(0, self._n, 4096):
            yield from self._at(np.arange(lo, min(lo + 4096, self._n))).tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._at(np.arange(self._n)).astype(dtype or np.int64, copy=False)

    def tolist(self) -> list[int]:
        return list(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self._n})"


class SplitIds(BlockIds):
    """The training or the held-out blocks of a :class:`BlockSplit`, in stratum order."""

    def __init__(self, split: BlockSplit, held_out: bool) -> None:
        super().__init__(split.n_val if held_out else split.n_blocks - split.n_val)
        self._split, self._held_out = split, held_out

    def _at(self, i: Index) -> Index:
        return self._split.block(i, self._held_out)

    def __contains__(self, block: object) -> bool:
        if not isinstance(block, (int, np.integer)) or not 0 <= block < self._split.n_blocks:
            return False
        return self._split.is_val(int(block)) == self._held_out


class StreamIds(BlockIds):
    """Blocks of one stream in one pass: ``train[perm(start + step * i)]``."""

    def __init__(self, train: Sequence, perm: Permutation, start: int, step: int, n: int) -> None:
        super().__init__(n)
        self._train, self._perm, self._start, self._step = train, perm, int(start), int(step)

    def _at(self, i: Index) -> Index:
        return self._train[self._perm(self._start + self._step * i)]


# ----------------------------------------------------------------------------
# Validation hold-out, passes
# ----------------------------------------------------------------------------


class BlockSplit:
    """Blocks held out for validation, chosen per stratum of equally shaped blocks.

    Stratum ``k`` (``c_k`` blocks) holds out ``v_k`` of them: the blocks at
    the first ``v_k`` positions of a seeded :class:`Permutation` of its
    ranks (or, given ``held_strata``, all of the strata marked held out).  The ``v_k`` add up to ``n_val`` and each is ``n_val * c_k /
    n_blocks`` rounded up or down (systematic rounding with a seeded offset,
    so every block is held out with the same probability).  Knowing each
    stratum's count, totals over the training blocks (patches per pass) are
    sums over the strata, and whether a block is held out is one inverse
    permutation.

    Attributes
    ----------
    n_blocks, n_val : int
        Blocks, and blocks held out.
    val_per_stratum, train_per_stratum : ndarray of int
        Held-out and training blocks of each stratum.
    train, val : BlockIds
        The training and held-out block ids (lazy sequences).
    """

    def __init__(self, strata: Strata, fraction: float, seed: int, held_strata: np.ndarray | None = None) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
        n = strata.n_blocks
        sizes = strata.sizes.tolist()
        if held_strata is not None:  # whole strata held out (a collection's split by image)
            val_cum = [0, *itertools.accumulate(s if held else 0 for s, held in zip(sizes, held_strata))]
            n_val = val_cum[-1]
        else:
            n_val = 0 if fraction == 0 else max(1, int(round(fraction * n)))
            offset = int(seeded_rng(seed, TAG_VAL).integers(n))
            # Python ints: n_val * blocks before can pass 2**63 on a huge volume.
            cum = [0, *itertools.accumulate(sizes)]
            val_cum = [(n_val * c + offset) // n for c in cum]
        if n - n_val < 1:
            raise ConfigError(
                f"cannot hold out validation data: the array has only {n} block(s); "
                "use val_fraction=0 or smaller chunks"
            )
        self.strata, self.seed, self.n_blocks, self.n_val = strata, int(seed), n, n_val
        self.val_per_stratum = np.diff(val_cum).astype(np.int64)
        self.train_per_stratum = strata.sizes - self.val_per_stratum
        self._val_cum = np.array(val_cum, dtype=np.int64)
        self._train_cum = np.concatenate([[0], np.cumsum(self.train_per_stratum)])
        self._perms: dict[int, Permutation] = {}
        self.train, self.val = SplitIds(self, held_out=False), SplitIds(self, held_out=True)

    def _perm(self, k: int) -> Permutation:
        """Stratum ``k``'s permutation of its ranks (its first ``v_k`` positions are held out)."""
        if k not in self._perms:
            self._perms[k] = Permutation(int(self.strata.sizes[k]), self.seed, TAG_VAL, k)
        return self._perms[k]

    def block(self, i: Index, held_out: bool) -> Index:
        """Block id of held-out (or training) block number ``i``, numbered stratum by stratum."""
        cum = self._val_cum if held_out else self._train_cum
        k = np.searchsorted(cum, i, side="right") - 1
        pos = i - cum[k] + (0 if held_out else self.val_per_stratum[k])
        if not isinstance(i, np.ndarray):
            return self.strata.block(int(k), self._perm(int(k))(int(pos)))
        rank = np.empty_like(pos)
        for s in np.unique(k).tolist():
            rank[k == s] = self._perm(s)(pos[k == s])
        return self.strata.block(k, rank)

    def is_val(self, block: Index) -> Index:
        """Whether ``block`` is held out (a bool, or a bool array)."""
        k, rank = self.strata.locate(block)
        if not isinstance(block, np.ndarray):
            return bool(self._perm(int(k)).index(int(rank)) < self.val_per_stratum[k])
        out = np.empty(len(block), dtype=bool)
        for s in np.unique(k).tolist():
            out[k == s] = self._perm(s).index(rank[k == s]) < self.val_per_stratum[s]
        return out


def _row(n: int) -> BlockGrid:
    """``n`` equal blocks in a row: the grid behind :func:`split_validation` of a count."""
    edges = tuple(range(n + 1))
    return BlockGrid(("i",), (n,), (1,), (edges,), (edges,))


def split_validation(blocks: BlockGrid | int, fraction: float, seed: int) -> BlockSplit:
    """Hold out a deterministic random fraction of blocks for validation.

    Parameters
    ----------
    blocks : BlockGrid or int
        The blocks (or their count, for blocks of one shape).
    fraction : float
        Fraction held out: ``round(fraction * n_blocks)`` blocks, at least
        one when > 0, spread over the strata of equally shaped blocks in
        proportion to their size.
    seed : int
        Seed of the split.

    Returns
    -------
    BlockSplit

    Examples
    --------
    >>> split = split_validation(20, 0.1, seed=0)
    >>> len(split.train), len(split.val)
    (18, 2)
    >>> sorted(list(split.train) + list(split.val)) == list(range(20))
    True
    >>> [bool(split.is_val(b)) for b in split.val], split_validation(20, 0.1, seed=0).val.tolist() == split.val.tolist()
    ([True, True], True)
    """
    grid = _row(int(blocks)) if isinstance(blocks, (int, np.integer)) else blocks
    return BlockSplit(grid.strata, float(fraction), int(seed))


def assign_blocks(train: Sequence, epoch: int, stream: int, n_streams: int, seed: int) -> StreamIds:
    """Blocks that stream ``stream`` of ``n_streams`` loads in pass ``epoch``, in order.

    Every pass is a fresh seeded permutation of the training blocks dealt
    out round-robin (position ``i`` of stream ``s`` is the permutation's
    ``s + i * n_streams``-th block), so streams never share a block (unless
    there are fewer blocks than streams, when each stream gets one block).

    Examples
    --------
    >>> train = np.arange(10, 20)
    >>> a, b = (assign_blocks(train, 0, s, 2, seed=0) for s in (0, 1))
    >>> len(a), len(b), sorted(list(a) + list(b)) == list(range(10, 20))
    (5, 5, True)
    """
    n = len(train)
    perm = Permutation(n, seed, TAG_PERM, epoch)
    if n >= n_streams:
        return StreamIds(train, perm, stream, n_streams, len(range(stream, n, n_streams)))
    return StreamIds(train, perm, stream % n, 0, 1)
