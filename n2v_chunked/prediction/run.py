"""Orchestration: :func:`predict` reads a source, plans the halo, runs the blocks and writes OME-Zarr.

A volume of any size is denoised block by block with :func:`dask.array.map_overlap`
and written to OME-Zarr, so that the result equals the whole-image prediction
(:func:`n2v_chunked.engine.inference.denoise` with the same boundary mode) to float
rounding.  Three facts make that exact:

* the halo along each spatial axis is the network's receptive-field half-width
  rounded up to a multiple of ``2**depth`` (:func:`n2v_chunked.model.unet.halo_width`),
  so every output pixel of a block sees all the input it depends on;
* working chunks are multiples of ``2**depth`` too (:func:`~n2v_chunked.prediction.plan.plan`),
  so every block's extended extent starts on the pooling grid of the padded whole image;
* the image border is padded with the same index map as ``numpy.pad`` in
  ``denoise`` (:mod:`n2v_chunked.engine.padding`), built per batch of blocks from the
  source itself (:mod:`n2v_chunked.prediction.blocks`), so batching and axes
  shorter than the halo change nothing.

Each block's task writes its own chunks and a marker (:mod:`n2v_chunked.prediction.writer`);
``resume=True`` skips the marked blocks.  The output is marked complete
(``attributes["n2v_chunked"]["complete"]``) only after the last block and the
pyramid have landed; the markers are then removed.

The graph is built and submitted in batches of at most ``batch_blocks`` blocks
so the scheduler's memory stays bounded for volumes of millions of chunks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ..cluster.common import check_not_spawn_reimport
from ..cluster.scheduling import run_distributed, run_local, scheduler_context, thread_layout
from ..engine.inference import blend_tensor
from ..errors import ConfigError, N2VError, OutputExistsError, environment_problem, first_line, rephrased
from ..io import objects
from ..model.intensity import choose_normalization
from ..io.ome import (
    check_dtype,
    check_ngff_version,
    check_not_input,
    check_replaceable,
    create_ome_zarr,
    mark_complete,
)
from ..cluster.progress import Progress
from ..engine.padding import BOUNDARIES
from ..engine.runtimes import describe as describe_runtime
from ..engine.runtimes import resolve as resolve_runtime
from ..io.lock import output_lock
from ..io.pyramid import build_pyramid
from ..io.sources import open_image
from ..io.stores import REMOTE_READ_AHEAD, is_url, local_path, location, redact
from ..zoo.load import prepare
from ..zoo.spec import is_zoo_package
from .blocks import batch_prediction, get_model, model_token
from .plan import Plan, batches, plan
from .writer import MARKER_DIR, done_blocks, has_level0, marker_dir, remove_markers, sync_output, write_task

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEFAULT_BATCH_BLOCKS = 512  # blocks per submitted graph (~35 tasks each in 2D before fusion)


class _Bar:
    """Progress over blocks with the output rate in MPix/s (a bar, or log lines without a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
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


def _check_options(boundary: str, precision: str, ngff_version: str, dtype: Any, batch_blocks: int | None,
                   resume: bool, overwrite: bool) -> None:
    if boundary not in BOUNDARIES:
        raise ConfigError(f"unknown boundary mode {boundary!r}; use one of {', '.join(BOUNDARIES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    check_ngff_version(ngff_version)
    if dtype is not None:
        check_dtype(dtype)
    if batch_blocks is not None and batch_blocks < 1:
        raise ConfigError(f"batch_blocks must be >= 1, got {batch_blocks}")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")


def _existing_output(out: str, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """Refuse an existing output unless asked; when resuming it, return its ``n2v_chunked`` attributes."""
    if not resume:
        check_replaceable(out, overwrite, resumable=True)  # replaced later, by the writer
        return None
    if not objects.listdir(out, 1) and not objects.is_file(out):
        return None  # nothing there, or killed before its metadata
    try:
        meta = zarr.open_group(store=objects.zarr_store(out, read_only=True), mode="r").attrs.get("n2v_chunked")
    except Exception:
        meta = None
    if not isinstance(meta, dict) or "parameters" not in meta:
        raise OutputExistsError(f"cannot resume {out}: it is not an output of n2v-chunked predict")
    return dict(meta)


def _resolve_runtime(runtime: str, precision: str, device: str | None) -> tuple[str, str]:
    """``auto`` made concrete once, on the client: workers run it and the provenance records it."""
    runtime, precision = resolve_runtime(runtime, precision, device)
    log.info("network runtime: %s", describe_runtime(runtime, precision))
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
        Anything :func:`~n2v_chunked.io.sources.open_image` reads.
    output : str or Path, optional
        OME-Zarr to write.  None returns the lazy (dask-backed) prediction.
    model_dir : str or Path
        Model directory written by training, or a BioImage Model Zoo package
        (``.zip`` or a folder with ``rdf.yaml``; see :mod:`n2v_chunked.zoo.load`).
    chunks : sequence of int or dict, optional
        Working and output chunks (see :func:`plan`).
    boundary : {"reflect", "nearest", "periodic", "constant"}
        Image border extension (dask's names; ``reflect`` is numpy's ``symmetric``).
    tta : bool
        Average the 8 rotations/flips of the YX plane.
    blend : bool
        Mix the prediction with the noisy input with the model's weight
        (:func:`n2v_chunked.model.checkpoint.blend_weight`): higher PSNR under
        pixel-independent noise, at the price of some visible grain.
    precision : {"fp32", "bf16", "fp16", "auto"}
        Arithmetic of the network (the CLI's default is ``auto``; here fp32,
        which ``denoise`` shares, so chunked == whole image by default).
    runtime : {"torch", "openvino", "onnxruntime", "auto"}
        Engine of the network (:mod:`n2v_chunked.engine.runtimes`; the CLI's default is ``auto``).
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
        run (:func:`n2v_chunked.model.intensity.choose_normalization`); recorded in
        the output's provenance (``normalization``).

    Returns
    -------
    xarray.DataArray
        The written output opened lazily (``attrs["predict_stats"]`` counts the
        blocks computed and skipped), or the lazy prediction when ``output`` is None.
    """
    check_not_spawn_reimport()  # a worker re-importing a script without the __main__ guard: stop here
    ngff_version = str(ngff_version)
    _check_options(boundary, precision, ngff_version, dtype, batch_blocks, resume, overwrite)
    if model_dir is None:
        raise ConfigError("predict needs a model (--model)")
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
    remote = isinstance(source, str) and is_url(source)
    if remote and isinstance(model_dir, str):  # one read task per working block: its chunks requested at once
        data = open_image(source, axes=axes, level=level, chunks=p.chunks)
    if isinstance(model_dir, str):  # ours; a Zoo model freezes its own processing (zoo_import.prepare)
        norm_record = choose_normalization(data, trained.mean, trained.std, normalize)
    elif normalize != "model":
        raise ConfigError("--normalize data is for n2v_chunked models; a Zoo model brings its own preprocessing")
    else:
        norm_record = None
    norm = (norm_record["mean"], norm_record["std"]) if normalize == "data" else None
    if blend:
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
                remove_markers(out)  # a kill between the complete flag and their removal leaves them
                return _result(out, {"blocks_total": p.nblocks, "blocks_computed": 0, "blocks_skipped": p.nblocks})
        if p.rechunked:
            log.info("rechunking input %s -> working chunks %s (multiples of 2**depth = %d on %s, halo %s)",
                     tuple(c[0] for c in data.data.chunks), p.chunks, p.multiple, "".join(p.spatial), p.halo)
        t0 = time.perf_counter()
        with scheduler_context(scheduler, jobqueue_config=jobqueue_config, jobs=jobs, device=device) as sched, \
                _interrupted(out):
            if stored is None or not has_level0(out):  # a kill before level 0 existed: nothing to keep
                create_ome_zarr(
                    out, p.shape, p.dims, dtype=out_dtype, chunks=p.chunks, ngff_version=ngff_version,
                    scale=data.attrs.get("scale"), units=data.attrs.get("units"),
                    translation=data.attrs.get("translation"), provenance=prov, overwrite=overwrite or resume,
                )
                done: set[tuple[int, ...]] = set()
                sync_output(out)  # the metadata a resume needs, before any marker
            else:
                done = done_blocks(out)
            if local_path(out) is not None:
                os.makedirs(marker_dir(out), exist_ok=True)
            stats = _run(data.data, p, out, done, sched, batch_blocks or DEFAULT_BATCH_BLOCKS, progress, kw,
                         held.check, read_ahead=remote)
            if pyramid:
                build_pyramid(out, progress=progress)
            sync_output(out, exclude=("0", MARKER_DIR))  # all but level 0 (synced block by block), before the flag
            held.check()  # a run whose lock was taken over must not mark the other run's output complete
            mark_complete(out, True)
            sync_output(out, recursive=False)  # the flag itself
        remove_markers(out)
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
    res = open_image(out)
    res.attrs["predict_stats"] = stats
    return res


def _run(
    x: da.Array, p: Plan, out: str, done: set[tuple[int, ...]], sched: Any, batch_blocks: int, progress: bool,
    kw: dict[str, Any], check_lock: Callable[[], None] = lambda: None, read_ahead: bool = False,
) -> dict[str, Any]:
    """Predict and write every block not in ``done``, batch by batch (``check_lock`` before each).

    ``read_ahead`` (a remote input): a local threads scheduler runs more tasks than cores.
    """
    channels = p.shape[p.dims.index("c")] if "c" in p.dims else 1
    skipped = sum(1 for idx in done if len(idx) == len(p.dims) and all(0 <= i < n for i, n in zip(idx, p.numblocks)))
    todo = p.nblocks - skipped
    run_id = uuid.uuid4().hex
    local_threads, threads = thread_layout(sched, REMOTE_READ_AHEAD if read_ahead else 1)

    def graphs() -> Iterator[list[Any]]:
        for lo, hi in batches(p.numblocks, batch_blocks):
            wanted = [idx for idx in itertools.product(*(range(a, b) for a, b in zip(lo, hi))) if idx not in done]
            if not wanted:
                continue
            check_lock()
            y = batch_prediction(x, p, lo, hi, threads=threads, **kw)
            offset = tuple(int(p.bounds(ax)[lo[ax]]) for ax in range(len(lo)))
            w = y.map_blocks(
                write_task, path=out, run_id=run_id, lo=tuple(lo), offset=offset, channels=channels,
                chunks=(1,) * y.ndim, dtype=np.int64, name=f"n2v-write-{uuid.uuid4().hex}",
            )
            blocks = w.to_delayed(optimize_graph=False)  # optimised once, by compute
            yield [blocks[tuple(i - a for i, a in zip(idx, lo))] for idx in wanted]

    bar = _Bar(todo, progress)
    try:
        if isinstance(sched, str):
            run_local(graphs(), bar.done, sched, local_threads)
        else:
            run_distributed(sched, graphs(), bar.done, batch_blocks)
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
