"""Per-block prediction: the worker's model cache, :func:`predict_block`, and the graph of a batch of blocks.

Blocks know a model only by its contract and its source
(:mod:`n2v_chunked.model.contract`): which kind of model it is (a model
directory, a Zoo package) is the source's business.

:func:`batch_prediction` builds the lazy prediction of a hyper-rectangle of the
plan's grid: the region extended by the halo, its image borders padded from the
source itself (:func:`n2v_chunked.engine.padding.pad_index`, the same rule as
:func:`n2v_chunked.engine.inference.denoise`), then :func:`dask.array.map_overlap` of
:func:`predict_block`.  The model is loaded once per worker process
(:func:`get_model`); tasks carry only the model's (small, picklable) source.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Sequence

import dask.array as da
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph
import numpy as np
import torch

from ..cluster.scheduling import resolve_threads, worker_device
from ..engine.inference import run_network
from ..engine.padding import pad_index
from ..errors import N2VError, UnreadableDataError, environment_problem, first_line, rephrased
from ..model.contract import BlockModel, ModelSource
from .model_source import open_source
from .plan import Plan, model_spatial_dims

_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def model_token(source: ModelSource | str | os.PathLike[str]) -> str:
    """A token that changes when the model's files (config, weights) change."""
    return open_source(source).token()


def get_model(source: ModelSource | str | os.PathLike[str], token: str = "", device: str | None = None) -> BlockModel:
    """The model of ``source`` (a :class:`~n2v_chunked.model.contract.ModelSource`) on ``device``, loaded once per process.

    The cache key is ``(source.key, token, device)`` with ``token`` from
    :func:`model_token`, so a long-lived worker picks up a retrained model.
    """
    source = open_source(source)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (source.key, token, str(dev))
    trained = _MODELS.get(key)
    if trained is None:
        with _MODELS_LOCK:
            trained = _MODELS.get(key)
            if trained is None:
                trained = source.load(dev)
                for k in [k for k in _MODELS if k[0] == key[0] and k[2] == key[2]]:
                    del _MODELS[k]  # an older version of the same model
                _MODELS[key] = trained
    return trained


def _set_torch_threads(threads: int | None) -> None:
    if threads:
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
    model_dir : ModelSource, str or Path
        The model's source (:mod:`~n2v_chunked.model.contract`; a path is a
        model directory), loaded once per process (:func:`get_model`).
    dims : sequence of str
        Axis names of ``block``.
    halo : sequence of int
        Halo per axis (0 on non-spatial axes).
    precision, tta, blend, max_pixels, runtime
        See :func:`n2v_chunked.engine.inference.run_network`.
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
        return predict_block(block, threads=resolve_threads(threads), **kwargs)
    except N2VError as exc:
        raise rephrased(exc, f"block {index}: {exc}") from exc
    except Exception as exc:
        if environment_problem(exc):  # e.g. CUDA out of memory: smaller --chunks help
            raise N2VError(f"block {index}: {type(exc).__name__}: {first_line(exc)}") from exc
        exc.add_note(f"(n2v-chunked: while predicting block {index})")
        raise  # a bug: its own type and traceback


# A segment of an axis of the extended region: a (start, stop, step) slice of
# the source, (i, i + 1, 1, n) = source position i repeated n times ("nearest"),
# or an int = that many positions of constant fill.
Segment = Any


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
        segs += _runs(pad_index(n, h, mode)[lo + h : h])
    segs.append((max(lo, 0), min(hi, n), 1))
    if hi > n:
        segs += _runs(pad_index(n, h, mode)[n + h : hi + h])
    return segs


def _seg_len(s: Segment) -> int:
    return s if isinstance(s, int) else s[3] if len(s) == 4 else abs(s[1] - s[0])


def _seg_slice(s: Segment) -> slice:
    start, stop, step = s[:3]
    return slice(start, stop if stop >= 0 else None, step)


def _detached(a: da.Array) -> da.Array:
    """``a`` with a graph of its own tasks only, cut loose from the whole source's.

    dask culls a graph that holds any old-style layer (``map_overlap``'s,
    ``concatenate``'s) by first listing every key of every layer, the source's
    one task per stored chunk included: 10^8 keys per batch on a 100 TB volume.
    A source cut to the batch's region keeps that list as small as the batch.
    """
    tasks = dict(a.dask.cull(set(flatten(a.__dask_keys__()))))
    return da.Array(HighLevelGraph.from_collections(a.name, tasks), a.name, a.chunks, meta=a._meta)


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
        part = _detached(x[tuple(_seg_slice(s) for s in combo)])
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
    model_dir: ModelSource | str,
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
        model_dir=open_source(model_dir), dims=p.dims, halo=p.halo, precision=precision, tta=tta, blend=blend,
        device=device, model_token=model_token(model_dir), token="n2v-predict", norm=norm, runtime=runtime,
    )
    # drop the halo donors (chunk-aligned: their tasks are culled, never run)
    crop = tuple(slice(p.halo[ax], -p.halo[ax]) if ax in depth else slice(None) for ax in range(y.ndim))
    return y[crop]
