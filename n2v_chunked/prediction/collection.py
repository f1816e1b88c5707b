"""Predicting a collection (issue 26): a plate into a plate, a container into a container, a folder into a folder.

:func:`~n2v_chunked.prediction.run.predict_collection` (which ``predict`` calls for a
collection) lists the collection (:func:`~n2v_chunked.io.collections.open_collection`;
``select`` picks images), refuses up front, in one line naming them, images
that disagree in axes or channels or do not fit the model, writes the
output's layout (plate, well and field metadata; bioformats2raw's layout and
``OME/METADATA.ome.xml``; a folder) with the root flagged incomplete, and
then writes every image with the one per-image writer of
:mod:`~n2v_chunked.prediction.run` (``begin``, ``settle``, ``produce``):
each output image is the OME-Zarr that predicting that image alone writes,
with its completion flag and block markers.

This module holds the collection's part: its images and their outputs
(:func:`plan_images`), the output's layout and record (:func:`start_output`),
and running the images side by side (:func:`run_images`).

**Busy across images.** One scheduler serves the whole collection.  Each
image runs in a thread of its own that feeds its batches of blocks to that
scheduler; another image starts while the running ones have fewer than
:data:`BUSY` blocks per scheduler thread left (at most :data:`IMAGES_IN_FLIGHT`
at once), so the next image's blocks are queued before the last one's finish
and no worker waits between images.  On the local threads scheduler the
images share one thread pool (``dask.config`` ``pool``), so they never run
more tasks than cores.  One progress display counts the blocks of all images.

**Resume and failures.** The root records the run (``attributes["n2v_chunked"]``
of a plate or container, :data:`~n2v_chunked.io.collections.RECORD` in a
folder) and is marked complete only when every image is; ``resume`` skips
complete images and resumes the others block by block.  An image that fails
is reported in one line and the others go on; the run then ends with an
error naming the failed images, the root still flagged incomplete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import dask
import xarray as xr
import zarr

from .. import __version__
from ..cluster.scheduling import host_threads, thread_layout
from ..errors import ConfigError, IncompatibleModelError, N2VError, OutputExistsError, environment_problem, first_line
from ..io import objects
from ..io.collections import RECORD, Collection, ImageEntry, some_names
from ..io.listing import METADATA_THREADS, join, map_concurrently, strip_file
from ..io.ngff import ome_metadata, read_multiscales
from ..io.ome import check_replaceable, mark_complete
from ..io.sources import open_image
from ..io.stores import is_url, local_path, redact
from ..model.contract import BlockModel
from .options import PredictOptions
from .plan import Plan, plan
from .writer import has_output

log = logging.getLogger(__name__)

IMAGES_IN_FLIGHT = 32  # images written at once, at most (a thread each, feeding its batches)
BUSY = 4  # start another image while the running ones have fewer blocks left than BUSY x the scheduler's threads
_SUFFIX = re.compile(r"(\.ome)?(\.[A-Za-z0-9]+)?$")  # an image file's or store's suffix: a.ome.tif, b.zarr, c.png
_OPTIONS = ("boundary", "tta", "blend", "dtype", "level", "normalize", "ngff_version")  # compared on resume


@dataclasses.dataclass(frozen=True)
class PredictedCollection:
    """What :func:`predict_collection` wrote.

    Attributes
    ----------
    path : str
        The output collection.
    kind : str
        ``plate``, ``well``, ``container`` or ``folder``, as the input.
    images : dict
        Output path of each image, by its name in the collection (``B/3/0``, ``2``, ``day1/a.tif``).
    stats : dict
        Per image: ``blocks_total``, ``blocks_computed``, ``blocks_skipped`` (a finished image: all skipped).
    seconds : float
        Wall time of the run.
    """

    path: str
    kind: str
    images: dict[str, str]
    stats: dict[str, dict[str, Any]]
    seconds: float

    @property
    def blocks_computed(self) -> int:
        return sum(s["blocks_computed"] for s in self.stats.values())

    @property
    def blocks_skipped(self) -> int:
        return sum(s["blocks_skipped"] for s in self.stats.values())

    def open(self, name: str) -> xr.DataArray:
        """The output image of input image ``name``, opened lazily."""
        return open_image(self.images[name])


@dataclasses.dataclass
class CollectionImage:
    """An image of the collection: its entry, its output, its input and plan, and once begun its job."""

    entry: ImageEntry
    out: str
    data: xr.DataArray | None = None
    p: Plan | None = None
    name: str | None = None  # the input's multiscales name, kept
    job: Any = None  # the image's run.Job


class Stopped(BaseException):
    """A collection run was asked to stop (Ctrl-C, a batch system's signal, a kill): not an image's failure."""


# ----------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------


def image_outputs(coll: Collection, output: str) -> list[str]:
    """Where each image goes: its own path in a plate, well or container; ``NAME.ome.zarr`` in a folder."""
    if coll.kind != "folder":
        return [join(output, im.name) for im in coll.images]
    names = [_SUFFIX.sub("", im.name) + ".ome.zarr" for im in coll.images]
    seen: dict[str, str] = {}
    for im, name in zip(coll.images, names):
        if name in seen:
            raise ConfigError(f"{seen[name]} and {im.name} would both be written to {join(output, name)}: "
                              "leave one out with --select")
        seen[name] = im.name
    return [join(output, n) for n in names]


def plan_images(images: list[CollectionImage], trained: BlockModel, opts: PredictOptions) -> None:
    """Open and plan each image (metadata only, concurrently); refuse those the model cannot predict in one line."""
    def one(im: CollectionImage) -> str | None:
        data = open_image(im.entry.path, axes=opts.axes, level=opts.level)
        try:
            p = plan(trained, data, opts.chunks)
        except IncompatibleModelError as exc:
            return str(exc)
        if is_url(im.entry.path):  # one read task per working block: its chunks requested at once
            data = open_image(im.entry.path, axes=opts.axes, level=opts.level, chunks=p.chunks)
        im.data, im.p, im.name = data, p, _multiscales_name(im.entry)
        return None

    problems: dict[str, list[str]] = {}
    for im, problem in zip(images, map_concurrently(one, images, METADATA_THREADS)):
        if problem is not None:
            problems.setdefault(problem, []).append(im.entry.name)
    if problems:
        parts = [f"{some_names(names)}: {problem}" for problem, names in problems.items()]
        raise IncompatibleModelError(f"{sum(map(len, problems.values()))} of {len(images)} images do not fit the "
                                     f"model ({'; '.join(parts)}); leave them out with --select")


def _multiscales_name(entry: ImageEntry) -> str | None:
    """The input image's multiscales ``name`` (OME-Zarr), kept on its output."""
    if entry.format != "ome-zarr":
        return None
    try:
        group = zarr.open_group(store=objects.zarr_store(entry.path, read_only=True), mode="r")
        name = read_multiscales(group)[0].get("name")
    except Exception:  # a name is a convenience: an image without one is written without one
        return None
    return str(name) if name else None


# ----------------------------------------------------------------------------
# The output's layout and record.
# ----------------------------------------------------------------------------


def run_record(coll: Collection, trained: BlockModel, opts: PredictOptions, kw: dict[str, Any]) -> dict[str, Any]:
    """What the root records of the run (all of it is compared on resume, but ``complete`` and ``version``)."""
    con = trained.contract
    return {
        "complete": False, "version": __version__, "command": "predict", "collection": coll.kind,
        "input": redact(coll.source), "selection": coll.selection, "images": [im.name for im in coll.images],
        "model_id": trained.model_id, "weights": {"digest": con.weights_digest, "step": con.step},
        "options": {**{k: str(getattr(opts, k)) for k in _OPTIONS}, "runtime": kw["runtime"],
                    "precision": kw["precision"]},
    }


def start_output(coll: Collection, out: str, record: dict[str, Any], opts: PredictOptions) -> bool:
    """Replace, refuse or resume the output root, then write its layout flagged incomplete; whether it resumes."""
    resumed = False
    if opts.resume:
        if has_output(out):
            _check_resumable(out, coll.kind, record)
            resumed = True
        else:
            log.warning("nothing to resume at %s (no output there yet): starting it", redact(out))
    elif has_output(out):
        ours = coll.kind == "folder" and _read_record(out, "folder") is not None
        if not (ours and opts.overwrite):  # our folder of images may be replaced; anything else as one image
            check_replaceable(out, opts.overwrite, resumable=True)
        objects.remove_tree(out)
    if coll.kind == "folder":
        if local_path(out) is not None:
            os.makedirs(out, exist_ok=True)
        _write_json(join(out, RECORD), record)
    else:
        _write_layout(coll, out, record, opts.ngff_version)
    return resumed


def _check_resumable(out: str, kind: str, record: dict[str, Any]) -> None:
    stored = _read_record(out, kind)
    if stored is None:
        raise OutputExistsError(f"cannot resume {out}: it is not an output of n2v-chunked predict on a {kind}")
    keys = [k for k in record if k not in ("complete", "version")]
    diff = [k for k in keys if stored.get(k) != record[k]]
    if diff:
        detail = ", ".join(f"{k}: {_short(stored.get(k))} -> {_short(record[k])}" for k in diff)
        raise OutputExistsError(f"cannot resume {out}: it was started with other settings ({detail}); use --overwrite")


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"{len(value)} images ({some_names([str(v) for v in value])})"
    if isinstance(value, dict) and "digest" in value:
        return f"sha256 {str(value['digest'])[:12]}"
    return repr(value)


def _read_record(out: str, kind: str) -> dict[str, Any] | None:
    """The run's record at the output root (a folder's :data:`RECORD`, a plate's or container's attributes)."""
    if kind == "folder":
        raw = objects.read(join(out, RECORD))
        return json.loads(raw) if raw else None
    try:
        meta = zarr.open_group(store=objects.zarr_store(out, read_only=True), mode="r").attrs.get("n2v_chunked")
    except Exception:  # no group there: not ours
        return None
    return dict(meta) if isinstance(meta, dict) else None


def _write_json(path: str, record: dict[str, Any]) -> None:
    objects.write(path, json.dumps(record, indent=1).encode())


def mark_output(out: str, kind: str, complete: bool) -> None:
    """Flag the root complete (the images' flags are their own)."""
    if kind == "folder":
        record = _read_record(out, kind) or {}
        _write_json(join(out, RECORD), {**record, "complete": complete})
    else:
        mark_complete(out, complete)


def _ngff(key: str, value: Any, version: str) -> dict[str, Any]:
    """Group attributes holding NGFF metadata ``key`` (``plate``, ``well``, ...) in ``version``'s place."""
    if version == "0.4":
        return {key: {**value, "version": "0.4"} if isinstance(value, dict) else value}
    if key == "plate":  # as ome-zarr-py writes it (ome-zarr-models warns without)
        value = {**value, "version": "0.5"}
    return {"ome": {"version": "0.5", key: value}}


def _metadata(path: str, key: str) -> dict[str, Any]:
    """NGFF metadata ``key`` of the group at ``path``, without its version (written anew in the output's)."""
    attrs = zarr.open_group(store=objects.zarr_store(path, read_only=True), mode="r").attrs.asdict()
    value, _ = ome_metadata(attrs, key)
    return {k: v for k, v in (value or {}).items() if k != "version"}


def _write_layout(coll: Collection, out: str, record: dict[str, Any], version: str) -> None:
    """The groups above the images with their metadata, as the input's, narrowed to the selected images."""
    src = strip_file(coll.source)
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(store=objects.zarr_store(out), mode="a", zarr_format=fmt)
    if coll.kind == "container":
        root.attrs.update({**_ngff("bioformats2raw.layout", 3, version), "n2v_chunked": record})
        _write_ome_folder(coll, src, out, root, version)
        return
    fields: dict[str, list[str]] = {}
    for im in coll.images:
        well, field = im.name.rsplit("/", 1) if "/" in im.name else ("", im.name)
        fields.setdefault(well, []).append(field)
    wells = list(fields)
    meta = map_concurrently(lambda w: _metadata(join(src, w), "well"), wells, METADATA_THREADS)
    for well, wmeta in zip(wells, meta):
        wmeta["images"] = [i for i in wmeta.get("images") or [] if str(i.get("path", "")).strip("/") in fields[well]]
        group = root
        for part in filter(None, well.split("/")):  # the row, then the column
            group = group.require_group(part)
        group.attrs.update(_ngff("well", wmeta, version))
    if coll.kind == "plate":
        plate = _metadata(src, "plate")
        plate["wells"] = [w for w in plate.get("wells") or [] if str(w.get("path", "")).strip("/") in fields]
        if "field_count" in plate:
            plate["field_count"] = max(len(f) for f in fields.values())
        root.attrs.update({**_ngff("plate", plate, version), "n2v_chunked": record})
    else:  # one well: its metadata is the root's
        root.attrs.update({"n2v_chunked": record})


def _write_ome_folder(coll: Collection, src: str, out: str, root: Any, version: str) -> None:
    """bioformats2raw's ``OME`` group: the series' paths and ``METADATA.ome.xml``, narrowed to the selection."""
    paths = [im.name for im in coll.images]
    root.require_group("OME").attrs.update(_ngff("series", paths, version))
    xml = objects.read(join(src, "OME/METADATA.ome.xml"))
    if xml is None:
        return
    if len(coll.images) < coll.total:
        xml = _keep_images(xml, [im.index for im in coll.images if im.index is not None])
    objects.write(join(out, "OME/METADATA.ome.xml"), xml)


def _keep_images(xml: bytes, keep: Sequence[int]) -> bytes:
    """OME-XML with only the ``Image`` elements at ``keep`` (series order), so the names match the series."""
    root = ET.fromstring(xml)
    if root.tag.startswith("{"):
        ET.register_namespace("", root.tag[1:].split("}", 1)[0])
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    for i, el in enumerate(images):
        if i not in keep:
            root.remove(el)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# ----------------------------------------------------------------------------
# Running the images.
# ----------------------------------------------------------------------------


def scheduler_slots(sched: Any) -> int:
    """Tasks the scheduler runs at once: its threads (1 for ``sync``)."""
    if sched == "sync":
        return 1
    if isinstance(sched, str):
        return thread_layout(sched)[0]
    return max(1, sum(host_threads(sched).values()))


class shared_pool:
    """On the local threads scheduler, one thread pool for every image's computations (never more tasks than cores)."""

    def __init__(self, sched: Any) -> None:
        self.pool = ThreadPoolExecutor(thread_layout(sched)[0], thread_name_prefix="n2v-dask") \
            if sched == "threads" else None
        self.config: Any = None

    def __enter__(self) -> None:
        if self.pool is not None:
            self.config = dask.config.set(pool=self.pool)
            self.config.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.config.__exit__(*exc)
            self.pool.shutdown(wait=False, cancel_futures=True)


def run_images(images: list[CollectionImage], work: Callable[[CollectionImage], dict[str, Any]], slots: int,
               bar: Any) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """Run ``work`` on each image in a thread of its own, keeping the scheduler's ``slots`` busy across images.

    An image starts while the running ones have fewer than :data:`BUSY` x
    ``slots`` blocks left (one at a time on the ``sync`` scheduler).  An
    image's error is reported in one line and the others go on; a
    :class:`BaseException` (Ctrl-C, a batch system's signal, a kill) stops
    them all at their next block (``bar.stop()``: the next block reported raises
    :class:`Stopped`) and is raised.
    """
    limit = 1 if slots == 1 else IMAGES_IN_FLIGHT
    pending = collections.deque(images)
    running: dict[str, Any] = {}  # name -> its run.Job
    results: dict[str, Any] = {}
    failures: dict[str, BaseException] = {}
    fatal: list[BaseException] = []
    cond = threading.Condition()

    def target(im: CollectionImage) -> None:
        name = im.entry.name
        try:
            res = work(im)
        except Stopped:
            res = None
        except Exception as exc:
            res = None
            failures[name] = exc
            what = first_line(exc) if isinstance(exc, N2VError) else f"{type(exc).__name__}: {first_line(exc)}"
            log.error("image %s failed: %s", name, what, exc_info=not reported(exc))
        except BaseException as exc:  # a kill: everything stops
            res = None
            fatal.append(exc)
        with cond:
            if res is not None:
                results[name] = res
            running.pop(name, None)
            cond.notify_all()

    def left() -> int:
        return sum(job.todo - job.computed for job in running.values())

    def stop_all() -> None:
        bar.stop()
        with cond:
            while running:
                cond.wait(0.5)

    try:
        with cond:
            while (pending or running) and not fatal:
                while pending and len(running) < limit and (not running or left() < BUSY * slots):
                    im = pending.popleft()
                    assert im.job is not None
                    running[im.entry.name] = im.job
                    threading.Thread(target=target, args=(im,), name=f"n2v-image-{im.entry.name}", daemon=True).start()
                cond.wait(0.2)
    except BaseException:  # Ctrl-C or a batch system's signal in this (the main) thread
        stop_all()
        raise
    if fatal:
        stop_all()
        raise fatal[0]
    bugs = [exc for exc in failures.values() if not reported(exc)]
    if bugs:
        raise bugs[0]  # a bug: its own type and traceback, after the other images finished
    return results, failures


def reported(exc: BaseException) -> bool:
    """An error a user can act on (ours, or the machine's), as opposed to a bug."""
    return isinstance(exc, N2VError) or environment_problem(exc)
