"""Synthetic microscopy volumes: noisy Voronoi cell membranes in Zarr.

The clean image is a tiling of cells (a Voronoi diagram of jittered grid
points) with bright membranes where two cells meet and a dim, per-cell
interior; it is computed for any region on its own (the seed point of grid
cell ``k`` is a hash of ``(seed, k)``), so a volume of any size is written
chunk by chunk in memory bounded by a few chunks.  Noise is Poisson-Gaussian
(shot noise approximated by a Gaussian of variance equal to the signal, plus
read noise), drawn per chunk from ``(seed, chunk index)``, so the result does
not depend on the writing order or the number of threads.

Usage::

    python benchmarks/synthetic.py out.zarr --shape 4096 4096 --chunks 256 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import zarr



def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _uniform(seed: int, cells: Sequence[np.ndarray], salt: int) -> np.ndarray:
    """A uniform [0, 1) value per integer cell coordinate vector (broadcast arrays)."""
    h = np.uint64((seed * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)
    for c in cells:
        h = _mix(np.asarray(c).astype(np.int64).astype(np.uint64) ^ _mix(np.asarray(h)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def membranes(
    lo: Sequence[int],
    hi: Sequence[int],
    *,
    cell_size: float = 24.0,
    thickness: float = 1.5,
    seed: int = 0,
) -> np.ndarray:
    """Clean signal (about 0.1 to 1.1) over the region ``[lo, hi)`` of an endless tiling.

    Parameters
    ----------
    lo, hi : sequence of int
        Region corners (2 or 3 spatial dims).
    cell_size : float
        Grid spacing of the cell centres (mean cell diameter), in voxels.
    thickness : float
        Membrane half-width, in voxels.
    seed : int
        Geometry seed.

    Returns
    -------
    ndarray
        float32 of shape ``hi - lo``.
    """
    nd = len(lo)
    shape = tuple(b - a for a, b in zip(lo, hi))
    # Cell centres and levels on the small grid of cells around the region.
    cmin = [int(math.floor(a / cell_size)) - 1 for a in lo]
    cmax = [int(math.floor((b - 1) / cell_size)) + 1 for b in hi]
    cells = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(cmin, cmax)], indexing="ij")
    # Jitter inside the central 70% of each grid cell keeps a voxel's nearest
    # two centres within its 3^d neighbourhood of cells.
    centres = [((cells[d] + 0.15 + 0.7 * _uniform(seed, cells, d)) * cell_size).astype(np.float32) for d in range(nd)]
    levels = _uniform(seed, cells, nd).astype(np.float32)
    coords, base = [], []
    for d, (a, b) in enumerate(zip(lo, hi)):
        view = [1] * nd
        view[d] = b - a
        c = (np.arange(a, b, dtype=np.float32) + 0.5).reshape(view)
        coords.append(c)
        base.append((np.floor(c / cell_size).astype(np.int64) - cmin[d]))
    d1 = np.full(shape, np.inf, dtype=np.float32)
    d2 = np.full(shape, np.inf, dtype=np.float32)
    level = np.zeros(shape, dtype=np.float32)
    dist = np.empty(shape, dtype=np.float32)
    for off in itertools.product((-1, 0, 1), repeat=nd):
        idx = tuple(b + o for b, o in zip(base, off))
        dist[...] = 0
        for d in range(nd):
            dist += np.square(coords[d] - centres[d][idx])
        np.sqrt(dist, out=dist)
        closer = dist < d1
        np.minimum(d2, dist, out=d2)
        np.copyto(d2, d1, where=closer)
        np.copyto(level, levels[idx], where=closer)
        np.copyto(d1, dist, where=closer)
    membrane = np.exp(-np.square((d2 - d1) / (2 * thickness)))
    return (0.1 + 0.25 * level + 0.75 * membrane).astype(np.float32)


def _chunk_ids(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*[range(math.ceil(n / c)) for n, c in zip(shape, chunks)]))


def make_volume(
    path: Any,
    shape: Sequence[int],
    chunks: Sequence[int],
    *,
    spatial_ndim: int | None = None,
    dtype: str = "float32",
    cell_size: float = 24.0,
    thickness: float = 1.5,
    peak: float = 100.0,
    read_noise: float = 5.0,
    seed: int = 0,
    cname: str = "lz4",
    clevel: int = 5,
    threads: int = 1,
    return_truth: bool = False,
    max_truth_bytes: int = 2**30,
    overwrite: bool = True,
) -> Any:
    """Write a noisy synthetic volume to a Zarr (v3, Blosc) array, chunk by chunk.

    Parameters
    ----------
    path : str or zarr store
        Where to write the array.
    shape, chunks : sequence of int
        Array and chunk shape.  The last ``spatial_ndim`` dims are spatial;
        leading dims (time, channels) get independent cell layouts.
    spatial_ndim : int, optional
        2 or 3 (default: 3 when the array has 3+ dims, else 2).
    dtype : str
        ``float32`` or an integer type (values rounded and clipped).
    cell_size, thickness, seed
        Geometry, see :func:`membranes`.
    peak : float
        Photons at a membrane (sets the signal-to-noise ratio).
    read_noise : float
        Std of the Gaussian camera noise, in photons.
    cname, clevel : str, int
        Blosc compressor and level (byte shuffle).
    threads : int
        Chunks computed at once (memory grows with it).
    return_truth : bool
        Also return the clean image (float32, photons); small volumes only.
    max_truth_bytes : int
        Refuse ``return_truth`` above this size.
    overwrite : bool
        Replace an existing array.

    Returns
    -------
    zarr.Array, or (zarr.Array, ndarray) with ``return_truth``.
    """
    shape, chunks = tuple(int(n) for n in shape), tuple(int(c) for c in chunks)
    nd = spatial_ndim or (3 if len(shape) >= 3 else 2)
    if return_truth and 4 * math.prod(shape) > max_truth_bytes:
        raise ValueError(f"ground truth of {4 * math.prod(shape)} bytes exceeds max_truth_bytes={max_truth_bytes}")
    params = dict(shape=list(shape), chunks=list(chunks), spatial_ndim=nd, dtype=dtype, cell_size=cell_size,
                  thickness=thickness, peak=peak, read_noise=read_noise, seed=seed, cname=cname, clevel=clevel)
    z = zarr.create_array(
        store=path, shape=shape, chunks=chunks, dtype=dtype, overwrite=overwrite, fill_value=0,
        compressors=[zarr.codecs.BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle")],
    )
    truth = np.empty(shape, dtype=np.float32) if return_truth else None
    out_dtype = np.dtype(dtype)

    def one(idx: tuple[int, ...]) -> None:
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, shape))
        lead = region[: len(shape) - nd]
        block = np.empty(tuple(s.stop - s.start for s in region), dtype=np.float32)
        rng = np.random.default_rng([seed, *idx])
        for k in itertools.product(*[range(s.start, s.stop) for s in lead]):
            # Each time point / channel gets its own cell layout.
            geo_seed = seed if not k else seed + 1_000_003 * (1 + int(np.ravel_multi_index(k, shape[: len(lead)])))
            clean = peak * membranes([s.start for s in region[-nd:]], [s.stop for s in region[-nd:]],
                                     cell_size=cell_size, thickness=thickness, seed=geo_seed)
            local = tuple(i - s.start for i, s in zip(k, lead))
            if truth is not None:
                truth[tuple(k) + region[-nd:]] = clean
            noise = rng.standard_normal(clean.shape, dtype=np.float32)
            block[local] = clean + np.sqrt(clean + read_noise**2) * noise
        if out_dtype.kind in "ui":
            info = np.iinfo(out_dtype)
            block = np.clip(np.rint(block), info.min, info.max)
        z[region] = block.astype(out_dtype)

    ids = _chunk_ids(shape, chunks)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(ids), 4 * threads):  # bounded number of chunks in flight
                list(pool.map(one, ids[start: start + 4 * threads]))
    else:
        for idx in ids:
            one(idx)
    z.attrs["synthetic"] = params
    return (z, truth) if return_truth else z


def ensure_volume(path: str, shape: Sequence[int], chunks: Sequence[int], **kwargs: Any) -> Any:
    """Open the volume at ``path`` if it was written with the same parameters, else write it."""
    try:
        z = zarr.open_array(path, mode="r")
        want = dict(shape=list(shape), chunks=list(chunks))
        have = z.attrs.get("synthetic")
        if have and all(have.get(k) == v for k, v in want.items()) and all(
            have.get(k) == v for k, v in kwargs.items() if k not in ("threads",)
        ):
            return z
    except Exception:  # noqa: BLE001 - absent or unreadable: write it
        pass
    return make_volume(path, shape, chunks, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output Zarr path")
    p.add_argument("--shape", type=int, nargs="+", required=True)
    p.add_argument("--chunks", type=int, nargs="+", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    z = make_volume(args.out, args.shape, args.chunks, dtype=args.dtype, seed=args.seed, threads=args.threads)
    print(json.dumps({"path": args.out, "shape": list(z.shape), "nbytes": int(z.nbytes),
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
