"""Chunked prediction: source -> halo plan -> per-block predict -> writer.

A volume of any size is denoised block by block with :func:`dask.array.map_overlap`
and written to OME-Zarr, so that the result equals the whole-image prediction
(:func:`n2v_chunked.inference.denoise` with the same boundary mode) to float
rounding.  Three facts make that exact:

* the halo along each spatial axis is the network's receptive-field half-width
  rounded up to a multiple of ``2**depth`` (:func:`~n2v_chunked.inference.halo_width`),
  so every output pixel of a block sees all the input it depends on;
* working chunks are multiples of ``2**depth`` too, so every block's extended
  extent starts on the pooling grid of the padded whole image;
* the image border is padded with the same index map as ``numpy.pad`` in
  ``denoise`` (dask's ``reflect`` = numpy's ``symmetric``), built per batch of
  blocks from the source itself, so batching and axes shorter than the halo
  change nothing.

Blocks are written by the tasks that compute them, chunk-aligned (no two tasks
touch one stored chunk), each followed by a marker file
``<output>/.n2v_blocks/<i>_<j>...`` that ``resume=True`` uses to skip finished
blocks.  The output is marked complete (``attributes["n2v_chunked"]["complete"]``)
only after the last block and the pyramid have landed; the markers are then
removed.

The graph is built and submitted in batches of at most ``batch_blocks`` blocks
so the scheduler's memory stays bounded for volumes of millions of chunks.  The
model is loaded once per worker process (:func:`get_model`); tasks carry only
the model directory's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import (
    ConfigError, IncompatibleModelError, N2VError, OutputExistsError, UnreadableDataError, environment_problem,
    first_line, rephrased,
)

log = logging.getLogger(__name__)

BOUNDARIES = ("reflect", "nearest", "periodic", "constant")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MARKER_DIR = ".n2v_blocks"  # hidden: OME-Zarr readers only follow the multiscales datasets
DURABLE = True  # fsync each block's chunks before its marker, the rest before the flag (local files): durable.py
DEFAULT_BATCH_BLOCKS = 512  # blocks per submitted graph (~35 tasks each in 2D before fusion)
# Default working chunk: the extended block's activations, estimated at
# inference.BYTES_PER_PIXEL_FEATURE, stay below this.  For the paper's 2D U-Net
# (32 features) that is 1024^2 blocks (1072^2 with the halo, 91% useful pixels),
# about 1.2 GB measured peak per block on CPU.
BLOCK_ACTIVATION_BYTES = 2.5 * 2**30
# Local layouts (benchmarks/predict.py --compare-schedulers, 2 idle cores, 2048^2
# frames): one block per core with one torch thread each beat one block at a
# time with torch on both cores, in-process (0.49-0.51 vs 0.43-0.44 MPix/s) and
# as a LocalCluster (0.42-0.45 vs 0.40), at the cost of one block's activations
# (about 1.2 GB by default) per core.  None = one per core.
LOCAL_DASK_THREADS: int | None = None  # scheduler="threads": torch gets cores // threads each
LOCAL_WORKERS: int | None = None  # scheduler="local": LocalCluster processes of 1 thread each


# ----------------------------------------------------------------------------
# The plan: halo, working chunks, block grid.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How an array is cut into blocks for prediction.

    Attributes
    ----------
    dims : tuple of str
        Axis names of the data (canonical order, a subset of ``tczyx``).
    shape : tuple of int
        Data shape.
    spatial : tuple of str
        The model's spatial axes (``("y", "x")`` or ``("z", "y", "x")``); other
        axes except ``c`` are sample axes (``t``, and ``z`` for a 2D model).
    halo : tuple of int
        Halo per axis: receptive-field half-width rounded up to a multiple of
        :attr:`multiple` on spatial axes, 0 elsewhere.
    chunks : tuple of int
        Working chunk per axis, also the output's Zarr chunk shape.
    grid : tuple of tuple of int
        The dask chunks of the working array: regular ``chunks``, except that a
        last chunk smaller than the halo is merged into the one before it (a
        block must supply a whole halo to its neighbour).  Every block is a
        union of whole output chunks.
    rechunked : bool
        Whether ``grid`` differs from the input's dask chunks.
    multiple : int
        ``2**depth`` of the model.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    spatial: tuple[str, ...]
    halo: tuple[int, ...]
    chunks: tuple[int, ...]
    grid: tuple[tuple[int, ...], ...]
    rechunked: bool
    multiple: int

    @property
    def numblocks(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.grid)

    @property
    def nblocks(self) -> int:
        return math.prod(self.numblocks)

    def bounds(self, axis: int) -> np.ndarray:
        """Block boundaries along ``axis`` (``numblocks[axis] + 1`` offsets)."""
        return np.concatenate([[0], np.cumsum(self.grid[axis])]).astype(int)

    def block_slices(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The region of block ``index`` of the grid."""
        out = []
        for ax, i in enumerate(index):
            b = self.bounds(ax)
            out.append(slice(int(b[i]), int(b[i + 1])))
        return tuple(out)


def model_spatial_dims(trained: Any) -> tuple[str, ...]:
    """The spatial axes a model works on: ``yx`` (2D) or ``zyx`` (3D)."""
    return ("z", "y", "x")[3 - trained.config.dims :]


def check_compatible(trained: Any, dims: Sequence[str], shape: Sequence[int]) -> tuple[str, ...]:
    """Raise :class:`N2VError` unless the model can predict data of these dims and shape.

    Returns the model's spatial axes.
    """
    cfg = trained.config
    sizes = dict(zip(dims, shape))
    spatial = model_spatial_dims(trained)
    missing = [d for d in spatial if d not in sizes]
    if missing:
        have = "".join(dims)
        raise IncompatibleModelError(
            f"model is {cfg.dims}D (axes {''.join(spatial)}) but the input has axes {have}: "
            f"no {''.join(missing)} axis (n2v-chunked info shows the input's axes)"
        )
    channels = sizes.get("c", 1)
    if channels != cfg.in_channels:
        raise IncompatibleModelError(f"model was trained for {cfg.in_channels} channel(s) but the input has {channels}")
    m = 2**cfg.depth
    small = [f"{d}={sizes[d]}" for d in spatial if sizes[d] < m]
    if small:
        raise IncompatibleModelError(
            f"input axis {', '.join(small)} is smaller than 2**depth = {m} of the model; "
            "such an image is too small for this network"
        )
    return spatial


def _chunk_list(chunks: Any, dims: Sequence[str], spatial: Sequence[str]) -> dict[str, int]:
    """User chunks (one per axis, one per spatial axis, or a dict) as ``{dim: size}``."""
    if chunks is None:
        return {}
    if isinstance(chunks, dict):
        out = {str(k).lower(): v for k, v in chunks.items()}
        bad = sorted(set(out) - set(dims))
        if bad:
            raise ConfigError(f"chunks name axes {bad} that the input (axes {''.join(dims)}) lacks")
    else:
        values = list(chunks)
        if len(values) == len(dims):
            out = dict(zip(dims, values))
        elif len(values) == len(spatial):
            out = dict(zip(spatial, values))
        else:
            also = f" or {len(spatial)} (axes {''.join(spatial)})" if len(spatial) != len(dims) else ""
            raise ConfigError(f"chunks {values} must give {len(dims)} sizes, one per axis {''.join(dims)}{also}")
    try:
        out = {k: int(v) for k, v in out.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"chunks must be integers, got {chunks}") from None
    if any(v < 1 for v in out.values()):
        raise ConfigError(f"chunks must be positive, got {chunks}")
    return out


def _default_spatial_chunks(
    sizes: Sequence[int], halo: Sequence[int], m: int, features: int, store: Sequence[int | None]
) -> list[int]:
    """Near-cubic working chunks whose extended block fits the activation budget.

    Axes that fit in one block (with the budget left by the others) take their
    whole size; the rest share the budget equally.  Where the stored chunk is a
    multiple of ``m`` and fits, a block is a whole number of stored chunks (no
    chunk is read twice); otherwise the axis is split into equal blocks, so no
    thin last block wastes a halo.
    """
    from .inference import BYTES_PER_PIXEL_FEATURE

    budget = BLOCK_ACTIVATION_BYTES / (BYTES_PER_PIXEL_FEATURE * features)
    n = len(sizes)
    whole: set[int] = set()
    side = 0
    while True:
        free = [i for i in range(n) if i not in whole]
        if not free:
            break
        fixed = math.prod(sizes[i] + 2 * halo[i] for i in whole)
        ext = (budget / fixed) ** (1.0 / len(free))
        side = max(m, int((ext - 2 * max(halo[i] for i in free)) // m) * m)
        fits = {i for i in free if sizes[i] <= side}
        if not fits:
            break
        whole |= fits
    out = []
    for i in range(n):
        if i in whole:
            out.append(sizes[i])
            continue
        c = max(side, halo[i])
        s = store[i]
        if s and s % m == 0 and halo[i] <= s <= c:
            c = (c // s) * s
        else:
            k = math.ceil(sizes[i] / c)
            c = max(halo[i], -(-math.ceil(sizes[i] / k) // m) * m)
        out.append(min(c, sizes[i]))
    return out


def _samples_per_block(
    trained: Any, dims: Sequence[str], shape: Sequence[int], spatial: Sequence[str],
    sp_chunks: Sequence[int], halo: Sequence[int],
) -> int:
    """Samples (t, or z for a 2D model) per block so one block's activations fit the budget."""
    from .inference import BYTES_PER_PIXEL_FEATURE

    per = math.prod(
        min(c, shape[dims.index(d)]) + 2 * halo[dims.index(d)] for d, c in zip(spatial, sp_chunks)
    )
    per *= shape[dims.index("c")] if "c" in dims else 1
    budget = BLOCK_ACTIVATION_BYTES / (BYTES_PER_PIXEL_FEATURE * trained.config.features)
    return max(1, int(budget // per))


def _grid(size: int, chunk: int, halo: int) -> tuple[int, ...]:
    """Regular chunks along one axis; a tail shorter than the halo joins the block before it."""
    full, tail = divmod(size, chunk)
    blocks = [chunk] * full
    if tail:
        if blocks and tail < halo:
            blocks[-1] += tail
        else:
            blocks.append(tail)
    return tuple(blocks)


def plan(trained: Any, data_array: xr.DataArray, chunks: Any = None) -> Plan:
    """Halo and working chunks for predicting ``data_array`` with ``trained``.

    Parameters
    ----------
    trained : checkpoint.Trained
        The loaded model.
    data_array : xarray.DataArray
        Input with canonical dims (as from :func:`~n2v_chunked.sources.open_image`).
    chunks : sequence of int or dict, optional
        Working (and output) chunks: one size per axis of the data, one per
        spatial axis of the model, or ``{dim: size}``.  Spatial sizes are
        rounded up to a multiple of ``2**depth`` and to at least the halo;
        ``c`` is always one chunk.  Default: sized so one block's activations
        take about :data:`BLOCK_ACTIVATION_BYTES`, aligned to the stored chunks.

    Returns
    -------
    Plan
    """
    dims = tuple(str(d) for d in data_array.dims)
    shape = tuple(int(s) for s in data_array.shape)
    spatial = check_compatible(trained, dims, shape)
    from .inference import halo_width

    m = 2**trained.config.depth
    hw = dict(zip(spatial, getattr(trained, "halo", None) or halo_width(trained)))  # a Zoo model declares its own
    halo = tuple(hw.get(d, 0) for d in dims)
    user = _chunk_list(chunks, dims, spatial)
    data = data_array.data
    src = tuple(c[0] for c in data.chunks) if isinstance(data, da.Array) else shape
    sp_idx = [dims.index(d) for d in spatial]
    if all(d in user for d in spatial):
        sp_chunks = [user[d] for d in spatial]
    else:
        sp_chunks = _default_spatial_chunks(
            [shape[i] for i in sp_idx], [halo[i] for i in sp_idx], m, trained.config.features, [src[i] for i in sp_idx]
        )
        sp_chunks = [user.get(d, c) for d, c in zip(spatial, sp_chunks)]
    work: list[int] = []
    for ax, d in enumerate(dims):
        n = shape[ax]
        if d in spatial:
            asked = sp_chunks[spatial.index(d)]
            c = max(-(-asked // m) * m, halo[ax])
            if c >= n:
                c = n  # one block spans the axis: no halo exchange, any size
            elif d in user and c != asked:
                log.warning("chunk %d along %s rounded up to %d (a multiple of 2**depth = %d, at least the halo %d)",
                            asked, d, c, m, halo[ax])
        elif d == "c":
            if d in user and user[d] != n:
                log.warning("chunk %d along c ignored: every block holds all %d channel(s)", user[d], n)
            c = n
        else:  # sample axes: as asked, else as many as the activation budget allows
            c = user.get(d) or _samples_per_block(trained, dims, shape, spatial, sp_chunks, halo)
            c = min(c, n)
        work.append(c)
    grid = tuple(_grid(n, c, h) for n, c, h in zip(shape, work, halo))
    current = tuple(tuple(int(v) for v in c) for c in data.chunks) if isinstance(data, da.Array) else None
    return Plan(dims, shape, spatial, halo, tuple(work), grid, current != grid, m)


plan_halo = plan  # the name docs/design.md gives it


# ----------------------------------------------------------------------------
# Per worker: the model cache and the per-block prediction.
# ----------------------------------------------------------------------------

_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def model_token(model_dir: str | os.PathLike[str]) -> str:
    """A token that changes when the model directory's config or weights change."""
    from . import checkpoint as ckpt

    if not isinstance(model_dir, (str, os.PathLike)):  # a prepared Zoo model (zoo_import.ZooRef)
        return model_dir.token()
    p = Path(model_dir)
    parts = []
    for name in (ckpt.CONFIG, ckpt.WEIGHTS_BEST, ckpt.WEIGHTS_LAST):
        with contextlib.suppress(OSError):
            st = (p / name).stat()
            parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def get_model(model_dir: str | os.PathLike[str], token: str = "", device: str | None = None) -> Any:
    """The model of ``model_dir`` on ``device``, loaded once per process.

    The cache key is ``(model_dir, token, device)`` with ``token`` from
    :func:`model_token`, so a long-lived worker picks up a retrained model.
    """
    import torch

    from . import checkpoint as ckpt

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    zoo = not isinstance(model_dir, (str, os.PathLike))  # a prepared Zoo model (zoo_import.ZooRef)
    key = (model_dir.key if zoo else str(Path(model_dir).absolute()), token, str(dev))
    trained = _MODELS.get(key)
    if trained is None:
        with _MODELS_LOCK:
            trained = _MODELS.get(key)
            if trained is None:
                if zoo:
                    from .zoo_import import load

                    trained = load(model_dir, dev)
                else:
                    trained = ckpt.load_model(model_dir, device=dev)
                for k in [k for k in _MODELS if k[0] == key[0] and k[2] == key[2]]:
                    del _MODELS[k]  # an older version of the same directory
                _MODELS[key] = trained
    return trained


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def predict_block(
    block: np.ndarray,
    model_dir: str | os.PathLike[str],
    *,
    dims: Sequence[str],
    halo: Sequence[int],
    precision: str = "fp32",
    tta: bool = False,
    blend: bool = False,
    device: str | None = None,
    token: str = "",
    runtime: str = "torch",
    threads: int | None = None,
    max_pixels: int | None = None,
    norm: tuple[Sequence[float], Sequence[float]] | None = None,
) -> np.ndarray:
    """Denoise one block extended by its halo; return the block without the halo.

    Parameters
    ----------
    block : numpy.ndarray
        Input in input units with axes ``dims``, extended by ``halo[i]`` on both
        sides of every spatial axis (image borders already padded).
    model_dir : str or Path
        Model directory (loaded once per process, see :func:`get_model`).
    dims : sequence of str
        Axis names of ``block``.
    halo : sequence of int
        Halo per axis (0 on non-spatial axes).
    precision, tta, blend, max_pixels, runtime
        See :func:`n2v_chunked.inference.run_network`.
    device : str, optional
        Torch device; CUDA when available, else CPU.
    token : str
        Model cache token (:func:`model_token`).
    threads : int, optional
        Torch intra-op threads for this process (left as is when None).
    norm : (mean, std), optional
        Per-channel statistics to normalise with instead of the model's
        (``predict(normalize="data")``: the whole input's, the same for every block).

    Returns
    -------
    numpy.ndarray
        Float32 prediction in input units, shape of ``block`` minus the halos.
    """
    from .inference import run_network

    trained = get_model(model_dir, token, worker_device(device))
    _set_torch_threads(threads)
    dims = tuple(dims)
    spatial = model_spatial_dims(trained)
    x = np.asarray(block, dtype=np.float32)
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:  # they would spread over the receptive field and poison the block
        raise UnreadableDataError(f"input has {bad} NaN/Inf value(s) in this block or its halo; replace them before denoising")
    no_c = "c" not in dims
    if no_c:  # a single-channel input without a c axis
        x, dims, halo = x[..., None], dims + ("c",), tuple(halo) + (0,)
    samples = [i for i, d in enumerate(dims) if d != "c" and d not in spatial]
    sp = [dims.index(d) for d in spatial]
    order = samples + [dims.index("c")] + sp  # model layout (N, C, *spatial), N = all samples
    xt = x.transpose(order)
    lead = xt.shape[: len(samples)]
    c = xt.shape[len(samples)]
    xt = xt.reshape((math.prod(lead), c) + xt.shape[len(samples) + 1 :])
    shape = (1, -1) + (1,) * len(spatial)
    mean, std = (trained.mean, trained.std) if norm is None else (np.asarray(v, np.float32) for v in norm)
    mean, std = mean.reshape(shape), std.reshape(shape)
    y = run_network(trained, (xt - mean) / std, precision=precision, tta=tta, blend=blend, max_pixels=max_pixels,
                    runtime=runtime)
    crop = tuple(slice(halo[i], y.shape[2 + k] - halo[i]) for k, i in enumerate(sp))
    y = y[(slice(None), slice(None), *crop)] * std + mean
    y = y.reshape(lead + (c,) + y.shape[2:]).transpose(np.argsort(order))
    if no_c:
        y = y[..., 0]
    return np.ascontiguousarray(y, dtype=np.float32)


def _predict_task(
    block: np.ndarray, block_info: dict | None = None, *, lo: Sequence[int], halo_blocks: Sequence[bool],
    threads: Any = None, **kwargs: Any,
) -> np.ndarray:
    """``map_overlap`` task: :func:`predict_block`, with failures naming the block."""
    loc = block_info[0]["chunk-location"] if block_info else (0,) * block.ndim
    index = tuple(int(l + c - hb) for l, c, hb in zip(lo, loc, halo_blocks))
    kwargs["token"] = kwargs.pop("model_token", "")  # dask reserves ``token`` for task names
    try:
        return predict_block(block, threads=_resolve_threads(threads), **kwargs)
    except N2VError as exc:
        raise rephrased(exc, f"block {index}: {exc}") from exc
    except Exception as exc:
        if environment_problem(exc):  # e.g. CUDA out of memory: smaller --chunks help
            raise N2VError(f"block {index}: {type(exc).__name__}: {first_line(exc)}") from exc
        exc.add_note(f"(n2v-chunked: while predicting block {index})")
        raise  # a bug: its own type and traceback


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by SLURM's allocation.

    SLURM without a task/affinity or cgroup plugin leaves the mask at the whole
    node; ``SLURM_CPUS_PER_TASK`` then says what the job was given.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(ValueError):
        cpus = min(cpus, int(os.environ.get("SLURM_CPUS_PER_TASK", "")))
    return max(1, cpus)


def _resolve_threads(threads: Any) -> int | None:
    """Torch threads for this process: an int, or ``{host: dask threads on host}`` from the client."""
    if not isinstance(threads, dict):
        return threads
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    cpus = usable_cpus()
    total = threads.get(get_address_host(worker.address), worker.state.nthreads)
    return max(1, cpus // max(1, total))


# ----------------------------------------------------------------------------
# The graph of one batch of blocks: padded input region -> map_overlap.
# ----------------------------------------------------------------------------

# A segment of an axis of the extended region: a (start, stop, step) slice of
# the source, (i, i + 1, 1, n) = source position i repeated n times ("nearest"),
# or an int = that many positions of constant fill.
Segment = Any


@functools.lru_cache(maxsize=8)
def _pad_index(n: int, h: int, mode: str) -> np.ndarray:
    """Source index of each position of an axis of length ``n`` padded by ``h`` (``numpy.pad``); -1 = fill."""
    from .inference import NUMPY_PAD_MODE

    kw = {"constant_values": -1} if mode == "constant" else {}
    return np.pad(np.arange(n), h, mode=NUMPY_PAD_MODE[mode], **kw)


def _runs(idx: np.ndarray) -> list[Segment]:
    """Split source indices into monotonic unit-step runs (slices) and fill runs."""
    out: list[Segment] = []
    i, n = 0, len(idx)
    while i < n:
        j = i + 1
        if idx[i] < 0:
            while j < n and idx[j] < 0:
                j += 1
            out.append(j - i)
        elif j < n and idx[j] == idx[i]:  # "nearest" repeats the edge: one segment, not one per position
            while j < n and idx[j] == idx[i]:
                j += 1
            out.append((int(idx[i]), int(idx[i]) + 1, 1, j - i))
        else:
            step = -1 if j < n and idx[j] == idx[i] - 1 else 1
            while j < n and idx[j] >= 0 and idx[j] == idx[j - 1] + step:
                j += 1
            out.append((int(idx[i]), int(idx[j - 1]) + step, step))
        i = j
    return out


def _segments(n: int, a: int, b: int, h: int, mode: str) -> list[Segment]:
    """Source segments of ``[a - h, b + h)`` along an axis of length ``n``, borders padded like ``numpy.pad``."""
    lo, hi = a - h, b + h
    segs: list[Segment] = []
    if lo < 0:
        segs += _runs(_pad_index(n, h, mode)[lo + h : h])
    segs.append((max(lo, 0), min(hi, n), 1))
    if hi > n:
        segs += _runs(_pad_index(n, h, mode)[n + h : hi + h])
    return segs


def _seg_len(s: Segment) -> int:
    return s if isinstance(s, int) else s[3] if len(s) == 4 else abs(s[1] - s[0])


def _seg_slice(s: Segment) -> slice:
    start, stop, step = s[:3]
    return slice(start, stop if stop >= 0 else None, step)


def _batch_input(
    x: da.Array, p: Plan, lo: Sequence[int], hi: Sequence[int], boundary: str, fill: np.ndarray
) -> tuple[da.Array, dict[int, int]]:
    """Blocks ``lo..hi`` of the grid extended by the halo, as one dask array.

    Along a spatial axis with several blocks the result has chunks
    ``(h, *blocks, h)``: the outer two are halo donors for ``map_overlap``
    (never predicted themselves).  A spatial axis that is a single block is one
    chunk already padded by ``h`` on both sides.  Only the region's source
    chunks enter the graph, so its size is bounded by the batch.

    Returns the array and the ``map_overlap`` depth per axis.
    """
    per_axis: list[list[Segment]] = []
    target: list[tuple[int, ...]] = []
    depth: dict[int, int] = {}
    for ax, h in enumerate(p.halo):
        b = p.bounds(ax)
        a0, b0 = int(b[lo[ax]]), int(b[hi[ax]])
        blocks = p.grid[ax][lo[ax] : hi[ax]]
        if not h:
            per_axis.append([(a0, b0, 1)])
            target.append(blocks)
        else:
            per_axis.append(_segments(p.shape[ax], a0, b0, h, boundary))
            if p.numblocks[ax] > 1:
                target.append((h, *blocks, h))
                depth[ax] = h
            else:
                target.append((p.shape[ax] + 2 * h,))
    if boundary == "constant":
        x = x.astype(np.float32)  # the fill is the channel mean, i.e. 0 after normalisation as in denoise()

    def piece(combo: tuple[Segment, ...]) -> da.Array:
        lengths = tuple(_seg_len(s) for s in combo)
        if any(isinstance(s, int) for s in combo):
            chunks = tuple(min(n, c) for n, c in zip(lengths, p.chunks))
            return da.broadcast_to(da.from_array(fill, chunks=fill.shape), lengths, chunks=chunks)
        part = x[tuple(_seg_slice(s) for s in combo)]
        return da.broadcast_to(part, lengths) if part.shape != lengths else part

    def nest(ax: int, prefix: tuple[Segment, ...]) -> Any:
        if ax == len(per_axis):
            return piece(prefix)
        return [nest(ax + 1, prefix + (s,)) for s in per_axis[ax]]

    if all(len(s) == 1 for s in per_axis):
        arr = piece(tuple(s[0] for s in per_axis))
    else:
        arr = da.block(nest(0, ()))
    return arr.rechunk(tuple(target), method="tasks"), depth  # tasks: a small, cullable graph (no p2p barrier)


def _fill_value(mean: np.ndarray, dims: Sequence[str]) -> np.ndarray:
    """The constant-boundary fill: each channel's ``mean`` (0 after normalisation, as in ``denoise``)."""
    shape = [1] * len(dims)
    mean = np.asarray(mean, np.float32)
    if "c" in dims:
        shape[list(dims).index("c")] = -1
        return mean.reshape(shape)
    return np.full(shape, mean[0], dtype=np.float32)


def batch_prediction(
    x: da.Array,
    p: Plan,
    lo: Sequence[int],
    hi: Sequence[int],
    *,
    trained: Any,
    model_dir: str,
    boundary: str = "reflect",
    precision: str = "fp32",
    tta: bool = False,
    blend: bool = False,
    device: str | None = None,
    threads: Any = None,
    norm: tuple[Sequence[float], Sequence[float]] | None = None,
    runtime: str = "torch",
) -> da.Array:
    """Lazy prediction of blocks ``lo..hi`` (exclusive) of the plan's grid.

    ``map_overlap`` runs :func:`predict_block` on every block extended by the
    halo; the result has the blocks' region and chunks (``plan.grid``).
    ``norm`` replaces the model's statistics (see :func:`predict_block`).
    """
    fill = _fill_value(trained.mean if norm is None else norm[0], p.dims)
    xin, depth = _batch_input(x, p, lo, hi, boundary, fill)
    out_chunks = tuple(
        ((p.halo[ax], *p.grid[ax][lo[ax] : hi[ax]], p.halo[ax]) if ax in depth else
         (p.shape[ax],) if p.halo[ax] else p.grid[ax][lo[ax] : hi[ax]])
        for ax in range(len(p.dims))
    )
    y = da.map_overlap(
        _predict_task, xin, depth=depth, boundary="none", trim=False, allow_rechunk=False,
        chunks=out_chunks, dtype=np.float32, meta=np.empty((0,) * xin.ndim, np.float32),
        lo=tuple(lo), halo_blocks=tuple(ax in depth for ax in range(xin.ndim)), threads=threads,
        model_dir=os.fspath(model_dir) if isinstance(model_dir, os.PathLike) else model_dir, dims=p.dims, halo=p.halo, precision=precision, tta=tta, blend=blend,
        device=device, model_token=model_token(model_dir), token="n2v-predict", norm=norm, runtime=runtime,
    )
    # drop the halo donors (chunk-aligned: their tasks are culled, never run)
    crop = tuple(slice(p.halo[ax], -p.halo[ax]) if ax in depth else slice(None) for ax in range(y.ndim))
    return y[crop]


def _batches(numblocks: Sequence[int], batch_blocks: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Hyper-rectangles of at most ``batch_blocks`` blocks covering the grid, outer axes split first."""
    tile = list(numblocks)
    for ax in range(len(tile)):
        if math.prod(tile) <= batch_blocks:
            break
        tile[ax] = max(1, batch_blocks // math.prod(tile[ax + 1 :]))
    for starts in itertools.product(*(range(0, n, t) for n, t in zip(numblocks, tile))):
        yield starts, tuple(min(s + t, n) for s, t, n in zip(starts, tile, numblocks))


# ----------------------------------------------------------------------------
# The writer: each block's task writes its own (whole) chunks, then a marker.
# ----------------------------------------------------------------------------

_OUTPUTS: dict[str, tuple[str, Any]] = {}
_OUTPUTS_LOCK = threading.Lock()


def _output_array(path: str, run_id: str) -> Any:
    """Level 0 of the output, opened once per process and run."""
    cached = _OUTPUTS.get(path)
    if cached is None or cached[0] != run_id:
        import zarr

        with _OUTPUTS_LOCK:
            cached = _OUTPUTS.get(path)
            if cached is None or cached[0] != run_id:
                cached = (run_id, zarr.open_array(store=f"{path.rstrip('/')}/0", mode="r+"))
                _OUTPUTS[path] = cached
    return cached[1]


def _markers(path: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, f"{root.rstrip('/')}/{MARKER_DIR}"


def _marker_name(index: Sequence[int]) -> str:
    return "_".join(str(int(i)) for i in index)


def done_blocks(path: str | os.PathLike[str]) -> set[tuple[int, ...]]:
    """Grid indices of the blocks an unfinished run has written (their markers)."""
    fs, mdir = _markers(str(path))
    try:
        names = fs.ls(mdir, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    out = set()
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        with contextlib.suppress(ValueError):
            out.add(tuple(int(v) for v in base.split("_")))
    return out


def _sync_output(path: str, **kwargs: Any) -> None:
    """:func:`~n2v_chunked.durable.sync_tree` of a local output (object stores need none)."""
    from .durable import sync_tree
    from .sources import is_url

    if DURABLE and not is_url(path):
        sync_tree(path, **kwargs)


def _remove_markers(path: str) -> None:
    fs, mdir = _markers(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(mdir, recursive=True)


def _has_level0(path: str) -> bool:
    import zarr

    try:
        zarr.open_array(store=f"{path.rstrip('/')}/0", mode="r")
    except Exception:  # no array metadata there (zarr raises several types for that)
        return False
    return True


def _write_task(
    block: np.ndarray, block_info: dict | None = None, *, path: str, run_id: str, lo: Sequence[int],
    offset: Sequence[int], channels: int,
) -> np.ndarray:
    """Store one predicted block in its (whole) output chunks, then mark it done."""
    from .durable import sync_region, write_marker
    from .ome import cast_block
    from .stores import with_retries

    info = block_info[0]
    region = tuple(slice(o + s, o + e) for o, (s, e) in zip(offset, info["array-location"]))
    index = tuple(l + c for l, c in zip(lo, info["chunk-location"]))

    def write() -> None:
        arr = _output_array(path, run_id)
        arr[region] = cast_block(block, arr.dtype)
        if DURABLE:  # the marker must never outlive its data, even across a node loss
            sync_region(arr, region)
        fs, mdir = _markers(path)  # written only after the data is in the store
        write_marker(fs, f"{mdir}/{_marker_name(index)}")

    try:  # transient store errors are retried with back-off; the marker comes last, so a retry is safe
        with_retries(write, f"block {index}: writing {path}")
    except N2VError:
        raise
    except OSError as exc:  # the store: disk full, permissions, network
        raise N2VError(f"block {index}: cannot write {path}: {type(exc).__name__}: {first_line(exc)}") from exc
    return np.full((1,) * block.ndim, block.size // channels, dtype=np.int64)


# ----------------------------------------------------------------------------
# Executing batches: distributed (futures, two batches in flight) or local.
# ----------------------------------------------------------------------------


class _Bar:
    """Progress over blocks with the output rate in MPix/s (a bar, or log lines without a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from .progress import Progress

        self.bar = Progress(total, "predicting", "block", enabled=enabled)
        self.t0 = time.perf_counter()
        self.pixels = 0
        self.blocks = 0

    def done(self, pixels: int) -> None:
        self.pixels += pixels
        self.blocks += 1
        self.bar.update(1, f"{self.mpix_per_s:.2f} MPix/s")

    @property
    def mpix_per_s(self) -> float:
        return self.pixels / max(time.perf_counter() - self.t0, 1e-9) / 1e6

    def close(self) -> None:
        self.bar.close()


def _run_local(batches: Iterator[list[Any]], bar: _Bar, scheduler: str, threads: int) -> None:
    from dask.callbacks import Callback

    class Progress(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
            if isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith("n2v-write-"):
                bar.done(int(np.sum(result)))

    with Progress():
        for tasks in batches:
            dask.compute(*tasks, scheduler=scheduler, num_workers=threads)


def _run_distributed(client: Any, batches: Iterator[list[Any]], bar: _Bar, window: int) -> None:
    """Keep about two batches' futures in flight so workers never wait for the next graph."""
    from distributed import as_completed

    ac = as_completed(with_results=False)
    pending = 0
    live: set[Any] = set()
    exhausted = False

    def feed() -> None:
        nonlocal pending, exhausted
        while not exhausted and pending < window:
            tasks = next(batches, None)
            if tasks is None:
                exhausted = True
                return
            futures = client.compute(tasks)
            ac.update(futures)
            live.update(futures)
            pending += len(futures)

    feed()
    try:
        for fut in ac:
            pending -= 1
            live.discard(fut)
            # result() raises the task's error, and waits for a future that was lost with a dead
            # worker and is being recomputed (as_completed may yield it before it finishes again)
            bar.done(int(np.sum(fut.result())))
            feed()
    finally:
        if live:
            client.cancel(list(live))


def _default_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _host_threads(client: Any) -> dict[str, int]:
    """Dask threads per worker host, so each process gives torch its share of the cores."""
    out: dict[str, int] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        host = w.get("host", "")
        out[host] = out.get(host, 0) + int(w.get("nthreads", 1))
    return out


def local_layout(device: str | None = None) -> tuple[int | None, int]:
    """LocalCluster ``(worker processes, threads per worker)`` for predicting on ``device``.

    On CPU: one single-threaded process per core (:data:`LOCAL_WORKERS`).  On
    CUDA: one process per GPU, with the cores shared out as threads that read,
    pad and write blocks while the GPU computes.  One process per core would
    give every core its own CUDA context on the same GPU (about 0.5 GB each)
    and have them all size their batches from the same free memory.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 or (device is not None and not str(device).startswith("cuda")):
        return LOCAL_WORKERS, 1
    if device is not None and str(device).startswith("cuda:"):
        gpus = 1  # one named GPU
    return gpus, max(1, usable_cpus() // gpus)


def worker_device(device: str | None) -> str | None:
    """The torch device of this dask worker: a named one, else GPU ``worker name mod GPU count``.

    LocalCluster names its workers 0, 1, ...; with one process per GPU
    (:func:`local_layout`) each then drives its own GPU.
    """
    import torch

    if device is not None or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


@contextlib.contextmanager
def scheduler_context(
    scheduler: Any = None, *, jobqueue_config: str | None = None, jobs: int | None = None,
    device: str | None = None,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` or a local dask scheduler name.

    ``None`` uses the active distributed client if there is one, else local
    threads; ``"sync"``/``"threads"`` force a local scheduler; a ``Client`` is
    used as is; ``"local"``, ``"tcp://..."`` and ``"slurm"`` go through
    :func:`n2v_chunked.cluster.cluster_client` (which prints the dashboard link).
    """
    if scheduler is None:
        client = _default_client()
        yield client if client is not None else "threads"
        return
    if not isinstance(scheduler, str):
        yield scheduler
        return
    if scheduler in ("sync", "synchronous", "single-threaded"):
        yield "sync"
        return
    if scheduler == "threads":
        yield "threads"
        return
    from .cluster import cluster_client

    kw: dict[str, Any] = {"jobqueue_config": jobqueue_config}
    if jobs is not None:
        kw["jobs"] = jobs
    if scheduler in ("local", ""):
        workers, threads = local_layout(device)
        kw.update(n_workers=workers, threads_per_worker=threads)
    cm = cluster_client(scheduler, **kw)
    with cm as client:
        yield client


# ----------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------


def _check_options(boundary: str, precision: str, ngff_version: str, dtype: Any, batch_blocks: int | None,
                   resume: bool, overwrite: bool) -> None:
    if boundary not in BOUNDARIES:
        raise ConfigError(f"unknown boundary mode {boundary!r}; use one of {', '.join(BOUNDARIES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if str(ngff_version) not in ("0.4", "0.5"):
        raise ConfigError(f"NGFF version must be 0.4 or 0.5, got {ngff_version}")
    if dtype is not None:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise ConfigError(f"unknown dtype {dtype!r}") from None
        if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)):
            raise ConfigError(f"output dtype must be a float or integer type, got {dt}")
    if batch_blocks is not None and batch_blocks < 1:
        raise ConfigError(f"batch_blocks must be >= 1, got {batch_blocks}")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")


def _existing_output(out: str, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """Refuse an existing output unless asked; when resuming it, return its ``n2v_chunked`` attributes."""
    import fsspec

    from .sources import ZARR_MARKERS

    fs, root = fsspec.core.url_to_fs(out)
    if not fs.exists(root) or (resume and fs.isdir(root) and not fs.ls(root)):  # killed before its metadata
        return None
    if resume:
        import zarr

        try:
            meta = zarr.open_group(store=out, mode="r").attrs.get("n2v_chunked")
        except Exception:
            meta = None
        if not isinstance(meta, dict) or "parameters" not in meta:
            raise OutputExistsError(f"cannot resume {out}: it is not an output of n2v-chunked predict")
        return dict(meta)
    if not overwrite:
        raise OutputExistsError(f"output {out} exists; pass --overwrite to replace it (or --resume to finish an interrupted run)")
    if not fs.isdir(root):
        raise OutputExistsError(f"refusing to overwrite {out}: it is a file, not a Zarr store")
    if fs.ls(root) and not any(fs.exists(f"{root}/{m}") for m in ZARR_MARKERS):
        raise OutputExistsError(f"refusing to overwrite {out}: it is a non-empty folder but not a Zarr store")
    return None


def _resolve_runtime(runtime: str, precision: str, device: str | None) -> tuple[str, str]:
    """``auto`` made concrete once, on the client: workers run it and the provenance records it."""
    from .runtime import describe, resolve

    runtime, precision = resolve(runtime, precision, device)
    log.info("network runtime: %s", describe(runtime, precision))
    return runtime, precision


def _check_resumable(out: str, stored: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [k for k in ("model_id", "input") if stored.get(k) != now.get(k)]
    # older outputs: model normalisation; started before runtimes existed: torch (resumable with --runtime torch)
    sp, np_ = {"normalize": "model", "runtime": "torch", **stored.get("parameters", {})}, now["parameters"]
    diff += [k for k in sorted(set(sp) | set(np_)) if sp.get(k) != np_.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {stored.get(k, sp.get(k))!r} -> {now.get(k, np_.get(k))!r}" for k in diff)
        raise OutputExistsError(f"cannot resume {out}: it was started with other settings ({detail}); use --overwrite")


def predict(
    source: Any,
    output: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    *,
    chunks: Any = None,
    boundary: str = "reflect",
    tta: bool = False,
    blend: bool = False,
    precision: str = "fp32",
    runtime: str = "torch",
    resume: bool = False,
    overwrite: bool = False,
    scheduler: Any = None,
    ngff_version: str = "0.5",
    dtype: Any = "float32",
    axes: str | None = None,
    level: int = 0,
    batch_blocks: int | None = None,
    progress: bool = True,
    device: str | None = None,
    pyramid: bool = True,
    jobqueue_config: str | None = None,
    jobs: int | None = None,
    halo: Any = None,
    normalize: str = "model",
) -> xr.DataArray:
    """Denoise an image of any size block by block; write OME-Zarr or return it lazily.

    Parameters
    ----------
    source : str, Path or array
        Anything :func:`~n2v_chunked.sources.open_image` reads.
    output : str or Path, optional
        OME-Zarr to write.  None returns the lazy (dask-backed) prediction.
    model_dir : str or Path
        Model directory written by training, or a BioImage Model Zoo package
        (``.zip`` or a folder with ``rdf.yaml``; see :mod:`n2v_chunked.zoo_import`).
    chunks : sequence of int or dict, optional
        Working and output chunks (see :func:`plan`).
    boundary : {"reflect", "nearest", "periodic", "constant"}
        Image border extension (dask's names; ``reflect`` is numpy's ``symmetric``).
    tta : bool
        Average the 8 rotations/flips of the YX plane.
    blend : bool
        Mix the prediction with the noisy input with the model's weight
        (:func:`n2v_chunked.checkpoint.blend_weight`): higher PSNR under
        pixel-independent noise, at the price of some visible grain.
    precision : {"fp32", "bf16", "fp16", "auto"}
        Arithmetic of the network (the CLI's default is ``auto``; here fp32,
        which ``denoise`` shares, so chunked == whole image by default).
    runtime : {"torch", "openvino", "onnxruntime", "auto"}
        Engine of the network (:mod:`n2v_chunked.runtime`; the CLI's default is ``auto``).
    resume : bool
        Finish an interrupted run into ``output``: blocks already written are skipped.
    overwrite : bool
        Replace an existing output.
    scheduler : None, str or distributed.Client
        None: the active distributed client, else local threads.  ``"sync"``,
        ``"threads"``, ``"local"`` (a LocalCluster), ``"tcp://host:port"`` or
        ``"slurm"`` (see :func:`scheduler_context`).
    ngff_version : {"0.5", "0.4"}
        Output format.
    dtype : dtype-like or None
        Output type (float32; None keeps the input's; integers are rounded and clipped).
    axes : str, optional
        Axis letters for inputs without metadata.
    level : int
        Resolution level of a multiscale input.
    batch_blocks : int, optional
        Blocks per submitted graph (:data:`DEFAULT_BATCH_BLOCKS`).
    progress : bool
        Progress bar (blocks, MPix/s, ETA).
    device : str, optional
        Torch device of the workers (CUDA when available).
    pyramid : bool
        Add downsampled levels once level 0 is complete.
    jobqueue_config, jobs
        For ``scheduler="slurm"``.
    halo : int or sequence of int, optional
        Zoo models only: halo per spatial axis instead of the declared one.
    normalize : {"model", "data"}
        Normalise with the model's stored statistics (a warning when the
        input's are far from them), or with the input's own, sampled once per
        run (:func:`n2v_chunked.intensity.choose_normalization`); recorded in
        the output's provenance (``normalization``).

    Returns
    -------
    xarray.DataArray
        The written output opened lazily (``attrs["predict_stats"]`` counts the
        blocks computed and skipped), or the lazy prediction when ``output`` is None.
    """
    from .intensity import choose_normalization
    from .ome import build_pyramid, check_not_input, create_ome_zarr, mark_complete
    from .runtime import describe as describe_runtime
    from .sources import open_image

    from .cluster import check_not_spawn_reimport

    check_not_spawn_reimport()  # a worker re-importing a script without the __main__ guard: stop here
    ngff_version = str(ngff_version)
    _check_options(boundary, precision, ngff_version, dtype, batch_blocks, resume, overwrite)
    if model_dir is None:
        raise ConfigError("predict needs a model (--model)")
    from .zoo_import import is_zoo_package, prepare

    if is_zoo_package(model_dir):  # the second block-function provider: any Zoo model (zoo_import.py)
        data = open_image(source, axes=axes, level=level)
        model_dir = prepare(model_dir, data, halo=halo)
    elif halo is not None:
        raise ConfigError("--halo is for Zoo models; an n2v_chunked model directory knows its exact receptive field")
    if isinstance(model_dir, (str, os.PathLike)):
        runtime, precision = _resolve_runtime(runtime, precision, device)
    elif runtime in ("auto", "torch") and precision in ("auto", "fp32"):
        runtime, precision = "torch", "fp32"  # bioimageio.core's own pipeline runs a Zoo model, in float32
    else:
        raise ConfigError(f"a Zoo model runs through bioimageio.core's pipeline in fp32; --runtime {runtime} "
                          f"--precision {precision} is for n2v_chunked models")
    trained = get_model(model_dir, model_token(model_dir), "cpu")  # validates it; cached for local CPU runs
    if isinstance(model_dir, (str, os.PathLike)):
        data = open_image(source, axes=axes, level=level)
        model_dir = str(Path(model_dir).absolute())
    p = plan(trained, data, chunks)
    if isinstance(model_dir, str):  # ours; a Zoo model freezes its own processing (zoo_import.prepare)
        norm_record = choose_normalization(data, trained.mean, trained.std, normalize)
    elif normalize != "model":
        raise ConfigError("--normalize data is for n2v_chunked models; a Zoo model brings its own preprocessing")
    else:
        norm_record = None
    norm = (norm_record["mean"], norm_record["std"]) if normalize == "data" else None
    if blend:
        from .inference import blend_tensor

        blend_tensor(trained)  # a model without a blend weight fails here, before any output exists
        if trained.meta.get("mask", {}).get("replacement") == "median":
            # the weight assumes a blind prediction; a median-trained network already passes some of each pixel
            log.warning("--blend: this model was trained with median replacement, which already lets part of each "
                        "pixel through; blending may over-mix (BSD68: -0.2 to +0.5 dB)")
    kw = dict(trained=trained, model_dir=model_dir, boundary=boundary, precision=precision, tta=tta, blend=blend,
              device=device, norm=norm, runtime=runtime)
    if output is None:
        y = batch_prediction(data.data, p, (0,) * len(p.dims), p.numblocks, **kw)
        return xr.DataArray(y, dims=p.dims, attrs=dict(data.attrs))

    from .lock import output_lock
    from .ome import location
    from .stores import redact

    out = location(output)
    check_not_input(out, data.attrs.get("source"))
    with output_lock(out) as held:  # a second run on the same output refuses instead of interleaving
        out_dtype = np.dtype(data.dtype if dtype is None else dtype)
        stored = _existing_output(out, overwrite, resume)
        if stored is not None:
            p = plan(trained, data, stored["parameters"].get("chunks") if chunks is None else chunks)
        prov = {
            "command": "predict",
            "model_id": trained.model_id,
            "model_dir": str(model_dir),
            **({} if isinstance(model_dir, str) else {"zoo": model_dir.provenance()}),
            "input": redact(str(data.attrs.get("source"))),  # no URL password in the output's metadata
            "engine": describe_runtime(runtime, precision),  # with the package version; not compared on resume
            "parameters": {
                "dims": "".join(p.dims), "shape": list(p.shape), "chunks": list(p.chunks), "halo": list(p.halo),
                "boundary": boundary, "tta": bool(tta), "blend": bool(blend), "precision": precision,
                "runtime": runtime,
                "dtype": str(out_dtype), "level": int(level), "normalize": normalize,
            },
            "normalization": norm_record,
        }
        if stored is not None:
            _check_resumable(out, stored, prov)
            if normalize == "data" and stored.get("normalization"):  # the statistics the written blocks used
                prov["normalization"] = stored["normalization"]
                kw["norm"] = (stored["normalization"]["mean"], stored["normalization"]["std"])
            if stored.get("complete"):
                log.info("%s is already complete; nothing to do", out)
                _remove_markers(out)  # a kill between the complete flag and their removal leaves them
                return _result(out, {"blocks_total": p.nblocks, "blocks_computed": 0, "blocks_skipped": p.nblocks})
        if p.rechunked:
            log.info("rechunking input %s -> working chunks %s (multiples of 2**depth = %d on %s, halo %s)",
                     tuple(c[0] for c in data.data.chunks), p.chunks, p.multiple, "".join(p.spatial), p.halo)
        t0 = time.perf_counter()
        with scheduler_context(scheduler, jobqueue_config=jobqueue_config, jobs=jobs, device=device) as sched, \
                _interrupted(out):
            if stored is None or not _has_level0(out):  # a kill before level 0 existed: nothing to keep
                create_ome_zarr(
                    out, p.shape, p.dims, dtype=out_dtype, chunks=p.chunks, ngff_version=ngff_version,
                    scale=data.attrs.get("scale"), units=data.attrs.get("units"),
                    translation=data.attrs.get("translation"), provenance=prov, overwrite=overwrite or resume,
                )
                done: set[tuple[int, ...]] = set()
                _sync_output(out)  # the metadata a resume needs, before any marker
            else:
                done = done_blocks(out)
            fs, mdir = _markers(out)
            fs.makedirs(mdir, exist_ok=True)
            stats = _run(data.data, p, out, done, sched, batch_blocks or DEFAULT_BATCH_BLOCKS, progress, kw,
                         held.check)
            if pyramid:
                build_pyramid(out, progress=progress)
            _sync_output(out, exclude=("0", MARKER_DIR))  # all but level 0 (synced block by block), before the flag
            held.check()  # a run whose lock was taken over must not mark the other run's output complete
            mark_complete(out, True)
            _sync_output(out, recursive=False)  # the flag itself
        _remove_markers(out)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stats["runtime"] = f"{runtime} {precision}"
        log.info("predicted %s: %d block(s) computed, %d skipped, %.2f MPix/s", out, stats["blocks_computed"],
                 stats["blocks_skipped"], stats["mpix_per_s"])
        return _result(out, stats)


@contextlib.contextmanager
def _interrupted(out: str) -> Iterator[None]:
    """Ctrl-C: one line that says what became of the output (exit status 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise N2VError(f"interrupted; {out} stays marked incomplete, rerun with --resume to finish it",
                       exit_code=130) from None


def _result(out: str, stats: dict[str, Any]) -> xr.DataArray:
    from .sources import open_image

    res = open_image(out)
    res.attrs["predict_stats"] = stats
    return res


def _run(
    x: da.Array, p: Plan, out: str, done: set[tuple[int, ...]], sched: Any, batch_blocks: int, progress: bool,
    kw: dict[str, Any], check_lock: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Predict and write every block not in ``done``, batch by batch (``check_lock`` before each)."""
    channels = p.shape[p.dims.index("c")] if "c" in p.dims else 1
    skipped = sum(1 for idx in done if len(idx) == len(p.dims) and all(0 <= i < n for i, n in zip(idx, p.numblocks)))
    todo = p.nblocks - skipped
    run_id = uuid.uuid4().hex
    local = isinstance(sched, str)
    cpus = usable_cpus()
    local_threads = 1 if sched == "sync" else (LOCAL_DASK_THREADS or cpus)
    threads: Any = max(1, cpus // local_threads) if local else _host_threads(sched)

    def graphs() -> Iterator[list[Any]]:
        for lo, hi in _batches(p.numblocks, batch_blocks):
            wanted = [idx for idx in itertools.product(*(range(a, b) for a, b in zip(lo, hi))) if idx not in done]
            if not wanted:
                continue
            check_lock()
            y = batch_prediction(x, p, lo, hi, threads=threads, **kw)
            offset = tuple(int(p.bounds(ax)[lo[ax]]) for ax in range(len(lo)))
            w = y.map_blocks(
                _write_task, path=out, run_id=run_id, lo=tuple(lo), offset=offset, channels=channels,
                chunks=(1,) * y.ndim, dtype=np.int64, name=f"n2v-write-{uuid.uuid4().hex}",
            )
            blocks = w.to_delayed(optimize_graph=False)  # optimised once, by compute
            yield [blocks[tuple(i - a for i, a in zip(idx, lo))] for idx in wanted]

    bar = _Bar(todo, progress)
    try:
        if local:
            _run_local(graphs(), bar, sched, local_threads)
        else:
            _run_distributed(sched, graphs(), bar, batch_blocks)
    except Exception as exc:
        unfinished = f"{out} stays marked incomplete"
        if not (isinstance(exc, N2VError) or environment_problem(exc)):
            exc.add_note(f"(n2v-chunked: {unfinished}; rerun with --resume once fixed)")
            raise  # a bug: its own type and traceback
        what = first_line(exc) if isinstance(exc, N2VError) else f"{type(exc).__name__}: {first_line(exc)}"
        msg = f"prediction stopped: {what}; {unfinished} (fix the cause and rerun with --resume to finish it)"
        raise (rephrased(exc, msg) if isinstance(exc, N2VError) else N2VError(msg)) from exc
    finally:
        bar.close()
    return {"blocks_total": p.nblocks, "blocks_computed": bar.blocks, "blocks_skipped": skipped,
            "mpix_per_s": round(bar.mpix_per_s, 4)}
