"""Planning a collection: listing a virtual HCS plate from its metadata (issue 26, first layer).

The plate is a ``virtual://`` NGFF 0.5 plate (``tests/virtual_store.py``):
rows x columns wells of ``--fields`` fields, each a uint16 ``(y, x)`` image of
``--size`` x ``--size`` pixels in ``--chunk`` chunks, whose metadata and chunks
are computed from their keys (nothing on disk).  Each metadata read can be
made to wait ``--latency-ms``, as an object store's round trip does.  Prints
one JSON line per measurement:

* ``setup``: CPU model, cores, load average, the plate;
* ``planning``: per latency and thread count, seconds (wall and CPU) that
  :func:`~n2v_chunked.io.collections.open_collection` takes to list every image
  (shape, axes, channels, dtype), the metadata objects read, and the chunks
  read and listings made (both must be 0: planning reads metadata only);
  ``met``: under the target (``--target-s``, 10 s).

* ``training``: per number of images (``--train-images``: the first N fields
  of the plate, picked with ``--select``; all of them without), seconds from
  calling :func:`~n2v_chunked.fit` to its first training step (target
  ``--train-target-s``, 30 s, flat in the number of images), split into the
  listing, the statistics and the sampler with its validation patches (until
  the training loop starts) and the loop's start (network, initial
  validation, first checkpoint); images opened and chunks read before the
  first step, and peak RSS (after a discarded warm-up run on a tiny plate,
  which pays the process's imports and first convolutions);
* ``training_ratio``: start-up at the most images over the fewest.

Per-block prediction overhead comes with prediction on collections.

Usage::

    python benchmarks/collections.py                                  # 96 wells x 4 fields, 0 and 20 ms
    python benchmarks/collections.py --rows 1 --columns 2 --fields 2 --size 64 --latency-ms 0 \
        --train-images 1 4 --features 4 --val-patches 16 --no-warm-up                                # a smoke run
"""

from __future__ import annotations

import os
import sys

# run as a script, this file's folder comes first on the path, where its name would hide the standard
# library's ``collections`` (only sys and os may be imported before this line)
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent

sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def cpu_model() -> str | None:
    """``Model name`` of ``lscpu`` (None where it is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def planning(url: str, threads: int) -> dict[str, Any]:
    """List the plate at ``url`` once; seconds, reads, and what was listed."""
    import virtual_store as vs

    from n2v_chunked.io.collections import open_collection

    vs.COUNTS.reset()
    t, c = time.perf_counter(), time.process_time()
    coll = open_collection(url, threads=threads)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"images": len(coll.images), "wells": len(coll.wells), "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3), "ms_per_image": round(1000 * wall / max(len(coll.images), 1), 2),
            "metadata_reads": vs.COUNTS.metadata_reads, "chunk_reads": vs.COUNTS.chunk_reads,
            "listings": vs.COUNTS.listings, "bytes_listed": coll.nbytes}


def training(url: str, images: list[str], total: int, model_dir: str, features: int, val_patches: int) -> dict[str, Any]:
    """``fit`` on the first ``len(images)`` fields of the plate at ``url``, stopped at its first step."""
    import resource

    import virtual_store as vs

    import n2v_chunked
    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.sampling import collection as sampling_collection
    from n2v_chunked.training import fit as fit_module, loop

    marks: dict[str, float] = {}
    opened = [0]

    class FirstStep(Exception):
        pass

    def mark(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            if name == "first_step":
                marks[name] = time.perf_counter()
                raise FirstStep
            out = fn(*a, **k)
            marks.setdefault(name, time.perf_counter())
            return out
        return wrapped

    def counted(*a: Any, **k: Any) -> Any:
        opened[0] += 1
        return real_open(*a, **k)

    real_open, real_list, real_train = (sampling_collection.open_image, fit_module.open_collection,
                                        fit_module.train)
    sampling_collection.open_image = counted
    fit_module.open_collection = mark("listed", real_list)
    fit_module.train = lambda *a, **k: (marks.setdefault("sampler", time.perf_counter()), real_train(*a, **k))[1]
    real_step = loop.Trainer.step
    loop.Trainer.step = mark("first_step", real_step)
    vs.COUNTS.reset()
    select = None if len(images) == total else ",".join(images)
    t0 = time.perf_counter()
    try:
        n2v_chunked.fit(url, model_dir, select=select,
                        model_cfg=ModelConfig(features=features),
                        train_cfg=TrainConfig(steps=1, val_patches=val_patches), progress=False)
    except FirstStep:
        pass
    finally:
        sampling_collection.open_image, fit_module.open_collection, fit_module.train = real_open, real_list, real_train
        loop.Trainer.step = real_step
    first = marks["first_step"] - t0
    return {"images": len(images), "startup_s": round(first, 3), "listing_s": round(marks["listed"] - t0, 3),
            "sampler_s": round(marks["sampler"] - marks["listed"], 3),
            "loop_start_s": round(marks["first_step"] - marks["sampler"], 3), "images_opened": opened[0],
            "chunk_reads": vs.COUNTS.chunk_reads, "listings": vs.COUNTS.listings,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def field_names(rows: int, columns: int, fields: int) -> list[str]:
    """The plate's images in its order (``A/1/0``, ``A/1/1``, ...)."""
    return [f"{r}/{c + 1}/{f}" for r in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:rows] for c in range(columns)
            for f in range(fields)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="plate rows (default 8)")
    ap.add_argument("--columns", type=int, default=12, help="plate columns (default 12)")
    ap.add_argument("--fields", type=int, default=4, help="fields per well (default 4)")
    ap.add_argument("--size", type=int, default=2048, help="field side in pixels (default 2048)")
    ap.add_argument("--chunk", type=int, default=512, help="chunk side in pixels (default 512)")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0],
                    help="wait per metadata read, one run each (default 0 20)")
    ap.add_argument("--threads", type=int, nargs="+",
                    help="metadata reads in flight, one run each (default: the library's, METADATA_THREADS)")
    ap.add_argument("--target-s", type=float, default=10.0, help="planning target in seconds (default 10)")
    ap.add_argument("--train-images", type=int, nargs="*", default=[1, 24, 384],
                    help="images to train on, one start-up measurement each (default 1 24 384; none: skip)")
    ap.add_argument("--features", type=int, default=32, help="network features for training (default 32)")
    ap.add_argument("--val-patches", type=int, default=256, help="validation patches (default 256)")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="skip the discarded warm-up run (the first figure then includes the imports)")
    ap.add_argument("--train-target-s", type=float, default=30.0,
                    help="training start-up target in seconds (default 30)")
    args = ap.parse_args()
    if not (1 <= args.rows <= 26 and args.columns >= 1 and args.fields >= 1 and args.size >= 1 and args.chunk >= 1):
        raise SystemExit("collections: rows must be 1-26 and columns, fields, size, chunk positive")
    if any(ms < 0 for ms in args.latency_ms) or any(t < 1 for t in args.threads or []):
        raise SystemExit("collections: latencies must be >= 0 and thread counts >= 1")
    if any(not 1 <= n <= args.rows * args.columns * args.fields for n in args.train_images):
        raise SystemExit("collections: --train-images must be between 1 and the plate's images")
    import virtual_store as vs

    from n2v_chunked.io.collections import METADATA_THREADS

    images = args.rows * args.columns * args.fields
    emit(measure="setup", cpu=cpu_model(), cores=len(os.sched_getaffinity(0)), load_average=os.getloadavg()[0],
         wells=args.rows * args.columns, fields=args.fields, images=images, shape=[args.size, args.size],
         chunks=[args.chunk, args.chunk], dtype="uint16", ngff="0.5")
    for latency in args.latency_ms:
        for threads in args.threads or [METADATA_THREADS]:
            # a fresh name per run: nothing cached between runs
            url = vs.add_plate(f"plate-{latency:g}-{threads}", args.rows, args.columns, args.fields,
                               (args.size, args.size), (args.chunk, args.chunk))
            vs.LATENCY_S = latency / 1000
            rec = planning(url, threads)
            emit(measure="planning", latency_ms=latency, threads=threads, target_s=args.target_s,
                 met=rec["seconds"] < args.target_s and rec["chunk_reads"] == 0 and rec["images"] == images, **rec)
    if args.train_images:
        import tempfile

        vs.LATENCY_S = 0.0
        names = field_names(args.rows, args.columns, args.fields)
        runs = []
        with tempfile.TemporaryDirectory() as workdir:
            if args.warm_up:  # a first run pays the process's one-off costs (imports, the first convolutions)
                training(vs.add_plate("warm-up", 1, 1, 1, (64, 64), (32, 32)), ["A/1/0"], 1, os.path.join(workdir, "warm-up"),
                         args.features, 16)
            for n in args.train_images:
                url = vs.add_plate(f"train-{n}", args.rows, args.columns, args.fields, (args.size, args.size),
                                   (args.chunk, args.chunk))
                rec = training(url, names[:n], images, os.path.join(workdir, f"model-{n}"), args.features,
                               args.val_patches)
                runs.append(rec)
                emit(measure="training", target_s=args.train_target_s, met=rec["startup_s"] < args.train_target_s,
                     **rec)
        few, most = runs[0], runs[-1]
        emit(measure="training_ratio", images=[few["images"], most["images"]],
             startup=round(most["startup_s"] / few["startup_s"], 2),
             images_opened=[few["images_opened"], most["images_opened"]])


if __name__ == "__main__":
    main()
