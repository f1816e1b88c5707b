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

Later layers add training start-up and per-block prediction overhead here.

Usage::

    python benchmarks/collections.py                                  # 96 wells x 4 fields, 0 and 20 ms
    python benchmarks/collections.py --rows 2 --columns 3 --fields 2 --latency-ms 0   # a smoke run
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
    args = ap.parse_args()
    if not (1 <= args.rows <= 26 and args.columns >= 1 and args.fields >= 1 and args.size >= 1 and args.chunk >= 1):
        raise SystemExit("collections: rows must be 1-26 and columns, fields, size, chunk positive")
    if any(ms < 0 for ms in args.latency_ms) or any(t < 1 for t in args.threads or []):
        raise SystemExit("collections: latencies must be >= 0 and thread counts >= 1")
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


if __name__ == "__main__":
    main()
