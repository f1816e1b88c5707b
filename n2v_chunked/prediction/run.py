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
import dataclasses
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np
import xarray as xr
import zarr

from ..cluster import preemption
from ..cluster.common import check_not_spawn_reimport
from ..cluster.scheduling import run_distributed, run_local, scheduler_context, thread_layout
from ..model import checkpoint as ckpt
from ..errors import CollectionError, ConfigError, InputNotFoundError, N2VError, OutputExistsError, Preempted, environment_problem, first_line, rephrased
from ..engine.inference import blend_tensor
from ..model.intensity import choose_normalization, resolve_normalize
from ..io import objects
from ..io.ome import (
    check_not_input,
    check_replaceable,
    create_ome_zarr,
    mark_complete,
)
from ..cluster.progress import Progress
from ..engine.runtimes import describe as describe_runtime, resolve as resolve_runtime
from ..io.lock import output_lock
from ..io.pyramid import build_pyramid
from ..io.collections import check_consistent, collection_kind, open_collection, some_names
from ..io.sources import open_image
from ..io.listing import METADATA_THREADS, map_concurrently, strip_file
from ..io.stores import REMOTE_READ_AHEAD, is_url, local_path, location, redact
from ..zoo.spec import is_zoo_package
from .blocks import batch_prediction, get_model
from .collection import (
    CollectionImage, PredictedCollection, Stopped, image_outputs, mark_output, plan_images, run_images,
    run_record, scheduler_slots, shared_pool, start_output,
)
from ..model.checkpoint import ModelDir
from ..model.contract import BlockModel, ModelSource
from .model_source import open_source
from .options import PredictOptions
from .plan import Plan, batches, plan
from .writer import (
    MARKER_DIR, done_blocks, has_level0, has_output, marker_dir, remove_markers, sync_output, write_task,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_BLOCKS = 512  # blocks per submitted graph (~35 tasks each in 2D before fusion)


class _Bar:
    """Progress over blocks with the output rate in MPix/s (a bar, or log lines without a terminal).

    One bar counts the blocks of every image of a collection (their threads report
    concurrently); after :meth:`stop` the next block reported raises
    :class:`~n2v_chunked.prediction.collection.Stopped`.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = Progress(total, "predicting", "block", enabled=enabled)
        self.t0 = time.perf_counter()
        self.pixels = 0
        self.blocks = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def done(self, pixels: int) -> None:
        with self.lock:
            self.pixels += pixels
            self.blocks += 1
        self.bar.update(1, f"{self.mpix_per_s:.2f} MPix/s")
        self.check()

    def check(self) -> None:
        if self.stopped.is_set():
            raise Stopped()

    def stop(self) -> None:
        self.stopped.set()

    @property
    def mpix_per_s(self) -> float:
        return self.pixels / max(time.perf_counter() - self.t0, 1e-9) / 1e6

    def close(self) -> None:
        self.bar.close()


def _existing_output(out: str, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """Refuse an existing output unless asked; when resuming it, return its ``n2v_chunked`` attributes."""
    if not resume:
        check_replaceable(out, overwrite, resumable=True)  # replaced later, by the writer
        return None
    if not has_output(out):
        log.warning("nothing to resume at %s (no output there yet): starting it", redact(out))
        return None
    try:
        meta = zarr.open_group(store=objects.zarr_store(out, read_only=True), mode="r").attrs.get("n2v_chunked")
    except Exception:
        meta = None
    if not isinstance(meta, dict) or "parameters" not in meta:
        raise OutputExistsError(f"cannot resume {out}: it is not an output of n2v-chunked predict")
    return dict(meta)


def _engine(trained: BlockModel, source: ModelSource, opts: PredictOptions) -> tuple[str, str]:
    """The concrete ``(runtime, precision)``, made once on the client: workers run it, the provenance records it.

    A model whose network is a plain torch module runs on every runtime; a
    Zoo pipeline (processing or weights that are not) runs in torch fp32 only:
    said in one line under ``auto``, refused when another engine is named.
    """
    if not trained.contract.torch_module:
        if opts.runtime in ("auto", "torch") and opts.precision in ("auto", "fp32"):
            log.info("%s runs through bioimageio.core's pipeline in torch fp32 (its processing or weights do not "
                     "load as a plain torch module, so the faster runtimes cannot run it)", source)
            return "torch", "fp32"
        raise ConfigError(f"{source} runs through bioimageio.core's pipeline in fp32 only (its processing or weights "
                          f"do not load as a plain torch module); drop --runtime {opts.runtime} "
                          f"--precision {opts.precision}")
    runtime, precision = resolve_runtime(opts.runtime, opts.precision, opts.device)
    log.info("network runtime: %s", describe_runtime(runtime, precision))
    return runtime, precision


def _weights(record: dict[str, Any] | None) -> str:
    """The weights of a provenance record in one phrase: their sha256 (12 digits) and training step."""
    digest, step = (record or {}).get("digest"), (record or {}).get("step")
    return f"sha256 {digest[:12]}" + ("" if step is None else f", step {step}") if digest else "unrecorded weights"


def _check_resumable(out: str, stored: dict[str, Any], now: dict[str, Any]) -> None:
    # the same model directory retrained (train --resume keeps its model_id) would write a patchwork of two
    # weight versions: the digest of the weights that wrote the first blocks must be the one that runs now
    if (stored.get("weights") or {}).get("digest") != now["weights"]["digest"]:
        raise OutputExistsError(
            f"cannot resume {out}: its blocks were written with {_weights(stored.get('weights'))}, the model now "
            f"holds {_weights(now['weights'])}; finishing it would mix two versions of the weights: use --overwrite")
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
    model_dir: Any = None,
    options: PredictOptions | None = None,
    **kwargs: Any,
) -> xr.DataArray:
    """Denoise an image of any size block by block; write OME-Zarr or return it lazily.

    Every option is a field of :class:`~n2v_chunked.prediction.options.PredictOptions`:
    pass ``options``, or the fields as keyword arguments (they replace the
    ``options``' values), checked once.

    Parameters
    ----------
    source : str, Path or array
        Anything :func:`~n2v_chunked.io.sources.open_image` reads.
    output : str or Path, optional
        OME-Zarr to write.  None returns the lazy (dask-backed) prediction.
    model_dir : str, Path or ModelSource
        Model directory written by training, or a BioImage Model Zoo package
        (``.zip`` or a folder with ``rdf.yaml``; see :mod:`n2v_chunked.zoo.load`),
        or a prepared source (:mod:`n2v_chunked.model.contract`).
    options : PredictOptions, optional
        Every setting as one object (default: the defaults, the same as the command line's).
    **kwargs
        Fields of :class:`PredictOptions` (each one's meaning, allowed values
        and default are documented there, once), replacing ``options``' values.

    Returns
    -------
    xarray.DataArray or PredictedCollection
        The written output opened lazily (``attrs["predict_stats"]`` counts the
        blocks computed and skipped), or the lazy prediction when ``output`` is None.
        A collection (an HCS plate, a bioformats2raw container, a folder of
        images; ``select`` picks some) is written in the same layout
        (:func:`~n2v_chunked.prediction.collection.predict_collection`), which
        returns a :class:`~n2v_chunked.prediction.collection.PredictedCollection`.
    """
    check_not_spawn_reimport()  # a worker re-importing a script without the __main__ guard: stop here
    opts = PredictOptions.of(options, **kwargs)
    if model_dir is None:
        raise ConfigError("predict needs a model (--model)")
    if is_collection(source, opts):  # a plate, container or folder: the same layout out
        if output is None:
            raise ConfigError(f"{source} is a collection of images: give an output to predict it into (a plate "
                              "gives a plate, a container a container, a folder a folder)")
        return predict_collection(source, location(output), model_dir, opts)
    if opts.select is not None:
        raise ConfigError(f"--select picks images of a collection (plate, container, folder); {source} is one image")
    data, src, trained = _open(source, model_dir, opts)
    opts = as_trained(opts, trained)
    runtime, precision = _engine(trained, src, opts)
    p = plan(trained, data, opts.chunks)
    remote = isinstance(source, str) and is_url(source)
    if remote:  # one read task per working block: its chunks requested at once
        data = open_image(source, axes=opts.axes, level=opts.level, chunks=p.chunks)
    norm_record = _normalization(data, trained, src, opts)
    if opts.blend:
        _check_blend(trained)
    kw = dict(trained=trained, model_dir=src, boundary=opts.boundary, precision=precision, tta=opts.tta,
              blend=opts.blend, device=opts.device, runtime=runtime,
              norm=(norm_record["mean"], norm_record["std"]) if opts.normalize == "data" else None)
    if output is None:
        y = batch_prediction(data.data, p, (0,) * len(p.dims), p.numblocks, **kw)
        return xr.DataArray(y, dims=p.dims, attrs=dict(data.attrs))
    return _write(location(output), data, p, trained, src, opts, kw, norm_record, remote)


def is_collection(source: Any, opts: PredictOptions) -> bool:
    """Whether ``source`` is a collection of images (a plate, a container of several series, a folder of mixed images).

    A folder of TIFFs of one shape, and a container of one series, are one image, as for every command.
    """
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        kind = collection_kind(str(source))
    except InputNotFoundError:  # said where one image is opened, after the model's checks, as ever
        return False
    if kind in ("plate", "well"):
        return True
    if kind is None:
        return False
    try:  # a container or folder: one image where open_image reads it as one
        open_image(source, axes=opts.axes, level=opts.level)
    except CollectionError:
        return True
    return False


def _open(source: Any, model: Any, opts: PredictOptions) -> tuple[xr.DataArray, ModelSource, BlockModel]:
    """The input, the model's source and the model loaded on the client's CPU (which validates it).

    A Zoo package is prepared for the input (its processing frozen), so the input comes first there.
    """
    def read() -> xr.DataArray:
        return open_image(source, axes=opts.axes, level=opts.level)

    data = read() if is_zoo_package(model) else None
    if data is None:
        ckpt.check_trained(model, opts.allow_unvalidated)  # never step 0's random weights without a word
    src = open_source(model, data, halo=opts.halo)
    trained = get_model(src, src.token(), "cpu")  # cached for local CPU runs
    return (read() if data is None else data), src, trained


def as_trained(opts: PredictOptions, trained: BlockModel) -> PredictOptions:
    """``opts`` with ``normalize="auto"`` made the model's own choice (recorded, and compared on resume, as such)."""
    if opts.normalize == "model" and trained.contract.normalize == "data":
        log.warning("--normalize model: this model was trained with each image normalised by its own "
                    "statistics; its stored ones fit no image (the default, auto, uses the input's own)")
    return dataclasses.replace(opts, normalize=resolve_normalize(opts.normalize, trained.contract.normalize))


def _normalization(data: xr.DataArray, trained: BlockModel, src: ModelSource, opts: PredictOptions) -> Any:
    """The statistics the input is normalised with (recorded in the provenance); a Zoo model brings its own."""
    if isinstance(src, ModelDir):
        return choose_normalization(data, trained.mean, trained.std, opts.normalize)
    if opts.normalize != "model":
        raise ConfigError("--normalize data is for n2v_chunked models; a Zoo model brings its own preprocessing")
    return None


def _check_blend(trained: BlockModel) -> None:
    """A model without a blend weight fails here, before any output exists."""
    blend_tensor(trained)
    if trained.meta.get("mask", {}).get("replacement") == "median":
        # the weight assumes a blind prediction; a median-trained network already passes some of each pixel
        log.warning("--blend: this model was trained with median replacement, which already lets part of each "
                    "pixel through; blending may over-mix (BSD68: -0.2 to +0.5 dB)")


def _provenance(data: xr.DataArray, p: Plan, trained: BlockModel, src: ModelSource, opts: PredictOptions,
                kw: dict[str, Any], norm_record: Any) -> dict[str, Any]:
    """What the output records of its making (compared on resume, except ``engine`` and the weights)."""
    con = trained.contract
    extra = src.provenance()
    return {
        "command": "predict",
        "model_id": trained.model_id,
        "model_dir": str(src),
        **({"zoo": extra} if extra else {}),
        "weights": {"digest": con.weights_digest, "step": con.step},
        "input": redact(str(data.attrs.get("source"))),  # no URL password in the output's metadata
        "engine": describe_runtime(kw["runtime"], kw["precision"]),  # with the package version; not compared on resume
        "parameters": {
            "dims": "".join(p.dims), "shape": list(p.shape), "chunks": list(p.chunks), "halo": list(p.halo),
            "boundary": opts.boundary, "tta": bool(opts.tta), "blend": bool(opts.blend),
            "precision": kw["precision"], "runtime": kw["runtime"],
            "dtype": str(np.dtype(data.dtype if opts.dtype is None else opts.dtype)), "level": int(opts.level),
            "normalize": opts.normalize,
        },
        "normalization": norm_record,
    }


@dataclasses.dataclass
class Job:
    """One output image of a run: where it goes, its input and plan, and what is already written.

    :func:`begin` makes it (a resumed output's record and finished blocks
    read), :func:`settle` fixes its engine settings and provenance (refusing a
    resume with other settings), :func:`produce` writes it.  A single image
    is one job; a collection (:mod:`~n2v_chunked.prediction.collection`) runs
    several at once on one scheduler.
    """

    out: str
    data: xr.DataArray
    p: Plan
    stored: dict[str, Any] | None  # the output's ``n2v_chunked`` record when resuming it
    fresh: bool  # nothing to keep: created anew
    done: set[tuple[int, ...]]
    remote: bool = False
    name: str | None = None  # multiscales name of the output
    kw: dict[str, Any] = dataclasses.field(default_factory=dict)
    prov: dict[str, Any] = dataclasses.field(default_factory=dict)
    computed: int = 0  # blocks written by this run so far

    @property
    def complete(self) -> bool:
        return bool(self.stored and self.stored.get("complete"))

    @property
    def skipped(self) -> int:
        p = self.p
        return sum(1 for idx in self.done if len(idx) == len(p.dims) and all(0 <= i < n for i, n in zip(idx, p.numblocks)))

    @property
    def todo(self) -> int:
        """Blocks this run computes."""
        return 0 if self.complete else self.p.nblocks - self.skipped

    def skipped_stats(self) -> dict[str, Any]:
        return {"blocks_total": self.p.nblocks, "blocks_computed": 0, "blocks_skipped": self.p.nblocks}


def begin(out: str, data: xr.DataArray, p: Plan, trained: BlockModel, opts: PredictOptions, remote: bool = False,
          name: str | None = None) -> Job:
    """The job of writing ``data`` to ``out``: refuse an existing output unless asked, read what a resume keeps."""
    stored = _existing_output(out, opts.overwrite, opts.resume)
    if stored is not None:
        p = plan(trained, data, stored["parameters"].get("chunks") if opts.chunks is None else opts.chunks)
    fresh = stored is None or not has_level0(out)  # a kill before level 0 existed: nothing to keep
    done = done_blocks(out) if not fresh and not stored.get("complete") else set()
    return Job(out, data, p, stored, fresh, done, remote, name)


def settle(job: Job, trained: BlockModel, src: ModelSource, opts: PredictOptions, kw: dict[str, Any],
           norm_record: Any) -> None:
    """Fix the job's engine settings and provenance; refuse to resume an output begun with other settings."""
    job.kw = dict(kw)
    job.prov = _provenance(job.data, job.p, trained, src, opts, job.kw, norm_record)
    if job.stored is not None:
        _check_resumable(job.out, job.stored, job.prov)
        if opts.normalize == "data" and job.stored.get("normalization"):  # the statistics the written blocks used
            job.prov["normalization"] = job.stored["normalization"]
            job.kw["norm"] = (job.stored["normalization"]["mean"], job.stored["normalization"]["std"])


def produce(job: Job, sched: Any, opts: PredictOptions, bar: _Bar, check_lock: Callable[[], None],
            pyramid_progress: bool = True) -> dict[str, Any]:
    """Create or reopen the job's output, run its blocks, add the pyramid, mark it complete, drop the markers."""
    p, out = job.p, job.out
    if p.rechunked:
        log.info("rechunking input %s -> working chunks %s (multiples of the model's grid step %d on %s, halo %s)",
                 tuple(c[0] for c in job.data.data.chunks), p.chunks, p.multiple, "".join(p.spatial), p.halo)
    _create_or_reopen(job, opts)
    stats = _run(job, sched, opts.batch_blocks or DEFAULT_BATCH_BLOCKS, bar, check_lock)
    if opts.pyramid:
        build_pyramid(out, progress=pyramid_progress)
    sync_output(out, exclude=("0", MARKER_DIR))  # all but level 0 (synced block by block), before the flag
    check_lock()  # a run whose lock was taken over must not mark the other run's output complete
    mark_complete(out, True)
    sync_output(out, recursive=False)  # the flag itself
    remove_markers(out)
    return stats


def _write(out: str, data: xr.DataArray, p: Plan, trained: BlockModel, src: ModelSource, opts: PredictOptions,
           kw: dict[str, Any], norm_record: Any, remote: bool) -> xr.DataArray:
    """Predict into the OME-Zarr ``out`` under its lock: create or resume it, run the blocks, mark it complete."""
    check_not_input(out, data.attrs.get("source"))
    with output_lock(out) as held:  # a second run on the same output refuses instead of interleaving
        job = begin(out, data, p, trained, opts, remote)
        settle(job, trained, src, opts, kw, norm_record)
        if job.complete:
            log.info("%s is already complete; nothing to do", out)
            remove_markers(out)  # a kill between the complete flag and their removal leaves them
            return _result(out, job.skipped_stats())
        t0 = time.perf_counter()
        with scheduler_context(opts.scheduler, jobqueue_config=opts.jobqueue_config, jobs=opts.jobs,
                               device=opts.device) as sched, \
                _interrupted(out), preemption.handlers(interrupt=True):
            bar = _Bar(job.todo, opts.progress)
            try:
                stats = produce(job, sched, opts, bar, held.check, opts.progress)
            finally:
                bar.close()
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stats["runtime"] = f"{job.kw['runtime']} {job.kw['precision']}"
        log.info("predicted %s: %d block(s) computed, %d skipped, %.2f MPix/s", out, stats["blocks_computed"],
                 stats["blocks_skipped"], stats["mpix_per_s"])
        return _result(out, stats)


def _create_or_reopen(job: Job, opts: PredictOptions) -> None:
    """Create the output (a fresh run, or a resume killed before level 0 existed); a reopened one keeps its blocks."""
    out, p, data = job.out, job.p, job.data
    if job.fresh:
        create_ome_zarr(
            out, p.shape, p.dims, dtype=job.prov["parameters"]["dtype"], chunks=p.chunks,
            ngff_version=opts.ngff_version, scale=data.attrs.get("scale"), units=data.attrs.get("units"),
            translation=data.attrs.get("translation"), provenance=job.prov, overwrite=opts.overwrite or opts.resume,
            name=job.name,
        )
        sync_output(out)  # the metadata a resume needs, before any marker
        job.done = set()
    if local_path(out) is not None:
        os.makedirs(marker_dir(out), exist_ok=True)


def predict_collection(source: Any, output: str, model_dir: Any, opts: PredictOptions) -> PredictedCollection:
    """Predict every image of a plate, container or folder into an output of the same layout.

    See :mod:`~n2v_chunked.prediction.collection`: a plate gives a plate, a
    container a container, a folder a folder of ``.ome.zarr`` images named
    after the inputs' relative paths; each image is written as :func:`predict`
    writes it alone, several at once on one scheduler.

    Parameters
    ----------
    source : str or Path
        The collection (:func:`~n2v_chunked.io.collections.open_collection`).
    output : str
        The output collection.
    model_dir : str or Path
        A model directory written by training.
    opts : PredictOptions
        As for one image; ``select`` picks images.

    Returns
    -------
    PredictedCollection

    Raises
    ------
    N2VError
        Refusals before anything is written (images that disagree or do not
        fit the model, a taken output, a resume with other settings); at the
        end, the images that failed (each also reported in a line of its own).
    """
    t0 = time.perf_counter()
    if is_zoo_package(model_dir):
        raise ConfigError("collections are predicted with n2v_chunked model directories: a Zoo package prepares its "
                          "processing for one input; predict the images one by one, or train a model on them")
    coll = open_collection(source, axes=opts.axes, level=opts.level, select=opts.select)
    check_consistent(coll.images, "one model")
    ckpt.check_trained(model_dir, opts.allow_unvalidated)  # never step 0's random weights without a word
    src = open_source(model_dir, halo=opts.halo)
    trained = get_model(src, src.token(), "cpu")
    opts = as_trained(opts, trained)
    runtime, precision = _engine(trained, src, opts)
    if opts.blend:
        _check_blend(trained)
    check_not_input(output, strip_file(str(source)))
    images = [CollectionImage(im, out) for im, out in zip(coll.images, image_outputs(coll, output))]
    plan_images(images, trained, opts)  # refuses images the model cannot predict, before anything is written
    kw = dict(trained=trained, model_dir=src, boundary=opts.boundary, precision=precision, tta=opts.tta,
              blend=opts.blend, device=opts.device, runtime=runtime)
    with output_lock(output) as held:  # one lock for the collection: no second run writes any of its images
        resumed = start_output(coll, output, run_record(coll, trained, opts, kw), opts)
        opts = dataclasses.replace(opts, overwrite=False)  # the root was replaced as a whole

        def job(im: CollectionImage) -> Job:  # on a resumed collection, an image not begun yet starts without a word
            fresh = resumed and not has_output(im.out)  # nothing there, or an empty folder a kill left: replaced
            return begin(im.out, im.data, im.p, trained,
                         dataclasses.replace(opts, resume=resumed and not fresh, overwrite=fresh),
                         is_url(im.entry.path), im.name)

        for im, j in zip(images, map_concurrently(job, images, METADATA_THREADS)):
            im.job = j
        stats, failures = _write_images(output, images, trained, src, opts, kw, held.check)
        if failures:
            raise N2VError(f"{len(failures)} of {len(images)} images failed ({some_names(list(failures))}; each "
                           f"said why above); the others are written, {output} stays marked incomplete: fix the cause "
                           "and rerun with --resume to finish them")
        held.check()
        mark_output(output, coll.kind, True)
    result = PredictedCollection(output, coll.kind, {im.entry.name: im.out for im in images},
                                 {im.entry.name: stats[im.entry.name] for im in images},  # in the collection's order
                                 round(time.perf_counter() - t0, 3))
    log.info("predicted %s: %d image(s), %d block(s) computed, %d skipped", output, len(images),
             result.blocks_computed, result.blocks_skipped)
    return result


def _write_images(output: str, images: list[CollectionImage], trained: BlockModel, src: ModelSource,
                  opts: PredictOptions, kw: dict[str, Any], check_lock: Callable[[], None],
                  ) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """Write every image not finished yet, several at a time on one scheduler; ``(stats, failures)`` by name."""
    stats: dict[str, Any] = {}
    todo = []
    for im in images:
        if im.job.complete:  # finished by an earlier run
            remove_markers(im.out)  # a kill between the complete flag and their removal leaves them
            stats[im.entry.name] = im.job.skipped_stats()
        else:
            todo.append(im)
    if not todo:
        return stats, {}

    def work(im: CollectionImage) -> dict[str, Any]:
        job = im.job
        norm_record = _normalization(job.data, trained, src, opts)
        norm = (norm_record["mean"], norm_record["std"]) if opts.normalize == "data" else None
        settle(job, trained, src, opts, {**kw, "norm": norm}, norm_record)
        return produce(job, sched, opts, bar, check_lock, pyramid_progress=False)

    with scheduler_context(opts.scheduler, jobqueue_config=opts.jobqueue_config, jobs=opts.jobs,
                           device=opts.device) as sched, shared_pool(sched), \
            _interrupted(output), preemption.handlers(interrupt=True):
        bar = _Bar(sum(im.job.todo for im in todo), opts.progress)
        try:
            done, failures = run_images(todo, work, scheduler_slots(sched), bar)
        finally:
            bar.close()
    stats.update(done)
    return stats, failures


@contextlib.contextmanager
def _interrupted(out: str) -> Iterator[None]:
    """Ctrl-C, or a batch system's warning signal: one line that says what became of the output.

    The exit status is 130 for Ctrl-C and :data:`~n2v_chunked.errors.PREEMPTED_EXIT` for the
    signal (:mod:`n2v_chunked.cluster.preemption`), on which ``cluster/predict.sbatch`` requeues.
    """
    try:
        yield
    except KeyboardInterrupt:
        if preemption.requested():
            raise Preempted(f"stopped on {preemption.signal_name()}; {out} stays marked incomplete, rerun with "
                            "--resume to finish it") from None
        raise N2VError(f"interrupted; {out} stays marked incomplete, rerun with --resume to finish it",
                       exit_code=130) from None


def _result(out: str, stats: dict[str, Any]) -> xr.DataArray:
    res = open_image(out)
    res.attrs["predict_stats"] = stats
    return res


def _run(job: Job, sched: Any, batch_blocks: int, bar: _Bar, check_lock: Callable[[], None] = lambda: None,
         ) -> dict[str, Any]:
    """Predict and write every block of ``job`` not yet done, batch by batch (``check_lock`` before each).

    A remote input (``job.remote``): a local threads scheduler runs more tasks than cores.
    """
    x, p, out, done, kw = job.data.data, job.p, job.out, job.done, job.kw
    channels = p.shape[p.dims.index("c")] if "c" in p.dims else 1
    skipped = job.skipped
    run_id = uuid.uuid4().hex
    local_threads, threads = thread_layout(sched, REMOTE_READ_AHEAD if job.remote else 1)
    pixels, t0 = 0, time.perf_counter()

    def graphs() -> Iterator[list[Any]]:
        for lo, hi in batches(p.numblocks, batch_blocks):
            wanted = [idx for idx in itertools.product(*(range(a, b) for a, b in zip(lo, hi))) if idx not in done]
            if not wanted:
                continue
            check_lock()
            bar.check()
            y = batch_prediction(x, p, lo, hi, threads=threads, **kw)
            offset = tuple(int(p.bounds(ax)[lo[ax]]) for ax in range(len(lo)))
            w = y.map_blocks(
                write_task, path=out, run_id=run_id, lo=tuple(lo), offset=offset, channels=channels,
                chunks=(1,) * y.ndim, dtype=np.int64, name=f"n2v-write-{uuid.uuid4().hex}",
            )
            blocks = w.to_delayed(optimize_graph=False)  # optimised once, by compute
            yield [blocks[tuple(i - a for i, a in zip(idx, lo))] for idx in wanted]

    def block_done(n: int) -> None:
        nonlocal pixels
        job.computed += 1
        pixels += n
        bar.done(n)

    try:
        if isinstance(sched, str):
            run_local(graphs(), block_done, sched, local_threads)
        else:
            run_distributed(sched, graphs(), block_done, batch_blocks)
    except Exception as exc:
        unfinished = f"{out} stays marked incomplete"
        if not (isinstance(exc, N2VError) or environment_problem(exc)):
            exc.add_note(f"(n2v-chunked: {unfinished}; rerun with --resume once fixed)")
            raise  # a bug: its own type and traceback
        what = first_line(exc) if isinstance(exc, N2VError) else f"{type(exc).__name__}: {first_line(exc)}"
        msg = f"prediction stopped: {what}; {unfinished} (fix the cause and rerun with --resume to finish it)"
        raise (rephrased(exc, msg) if isinstance(exc, N2VError) else N2VError(msg)) from exc
    mpix = pixels / max(time.perf_counter() - t0, 1e-9) / 1e6
    return {"blocks_total": p.nblocks, "blocks_computed": job.computed, "blocks_skipped": skipped,
            "mpix_per_s": round(mpix, 4)}
