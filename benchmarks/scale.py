"""Cost as the volume grows: training start-up and prediction on volumes of 1 GB to 100 TB that exist nowhere.

Each volume is a ``virtual://`` OME-Zarr (``tests/virtual_store.py``): uint16
``(t, y, x)``, 512 x 512 chunks of one frame (512 KiB), every chunk computed
from its key when read, nothing on disk; predictions go to ``discard://``,
which keeps metadata and resume markers and throws chunk data away.  Each
size runs in fresh processes (one for training start-up, one for
prediction), so RSS figures are that size's alone.  Prints one JSON line per
measurement:

* ``startup``: seconds (wall and CPU) and RSS after each step of training's
  start-up: normalisation statistics (:func:`~n2v_chunked.model.normalization.channel_stats`),
  the sampler's block grid, the sampler with its validation split
  (``ZarrPatchDataset``, ``val_fraction=0.1``), its validation patches, and
  ``--patches`` training patches drawn; the chunks read and the listings made;
* ``predict``: ``predict`` with a trivial network (2D U-Net, depth 1, one
  feature) and 512 x 512 blocks on the threads scheduler, stopped after
  ``--blocks`` blocks: seconds to the first block written, seconds per block
  after it, tasks in one submitted batch graph (its scheduler's work at a
  time), peak RSS of the process (the threads scheduler lives in it), chunks
  read and listings before the first block;
* ``ratio``: each figure at the largest size over the smallest (targets:
  start-up under 30 s at every size, RSS and per-block time within 1.2x).

Usage::

    python benchmarks/scale.py                          # 1 GB, 100 GB, 1 TB, 100 TB
    python benchmarks/scale.py --sizes-gb 0.01 0.1 --blocks 4 --patches 64   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

CHUNKS = (1, 512, 512)
PATCH = (64, 64)


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def step(record: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; record its wall and CPU seconds and the RSS after it under ``name``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    record[f"{name}_s"] = round(time.perf_counter() - t, 3)
    record[f"{name}_cpu_s"] = round(time.process_time() - c, 3)
    record[f"{name}_rss_mb"] = round(rss_mb(), 1)
    return out


def startup(url: str, patches: int) -> dict[str, Any]:
    """Training's start-up on ``url``, step by step, as :func:`n2v_chunked.training.fit.fit` runs it."""
    import virtual_store as vs

    from n2v_chunked.io.sources import open_image
    from n2v_chunked.model.normalization import channel_stats
    from n2v_chunked.sampling.dataset import ZarrPatchDataset, batches

    rec: dict[str, Any] = {"rss_before_mb": round(rss_mb(), 1)}
    t0 = time.perf_counter()
    data = step(rec, "open", lambda: open_image(url))
    step(rec, "stats", lambda: channel_stats(data, seed=0))
    probe = step(rec, "grid", lambda: ZarrPatchDataset(data, PATCH, ("y", "x"), val_fraction=0.0))
    rec["blocks"] = probe.grid.n_blocks
    del probe
    ds = step(rec, "split", lambda: ZarrPatchDataset(data, PATCH, ("y", "x"), val_fraction=0.1))
    step(rec, "validation", lambda: ds.validation_patches(256))
    rec["startup_s"] = round(time.perf_counter() - t0, 3)
    rec["startup_under_30_s"] = rec["startup_s"] < 30
    rec["reads_at_startup"], rec["listings_at_startup"] = vs.COUNTS.chunk_reads, vs.COUNTS.listings

    def draw() -> None:
        it = batches(ds, 128)
        for _ in range(-(-patches // 128)):
            next(it)
        it.close()

    step(rec, "patches", draw)
    rec["patches_drawn"] = -(-patches // 128) * 128
    rec["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return rec


def prediction(url: str, blocks: int) -> dict[str, Any]:
    """``predict`` into ``discard://`` until ``blocks`` blocks are written."""
    import dask
    import virtual_store as vs
    from helpers import make_model_dir

    from n2v_chunked.prediction import predict
    from n2v_chunked.prediction import run as predict_run

    batch_tasks: list[int] = []
    run_local = predict_run.run_local

    def counting(graphs: Any, *args: Any, **kw: Any) -> None:
        def first_counted() -> Any:
            for i, tasks in enumerate(graphs):
                if i == 0:  # the tasks one submitted batch puts on the scheduler (optimised as compute does)
                    batch_tasks.append(len(dask.base.collections_to_expr(tasks).__dask_graph__()))
                yield tasks
        return run_local(first_counted(), *args, **kw)

    predict_run.run_local = counting
    vs.STOP_AFTER = blocks
    with tempfile.TemporaryDirectory(prefix="n2v-scale-") as tmp:
        model = make_model_dir(Path(tmp) / "model", dims=2, depth=1, features=1)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            predict(url, "discard://scale-out", str(model), chunks=CHUNKS, progress=False, pyramid=False,
                    scheduler="threads")
        except vs.Enough:
            pass
    times = vs.COUNTS.write_times
    return {
        "first_block_s": round(times[0] - t0, 3),
        "per_block_s": round((times[-1] - times[0]) / max(1, len(times) - 1), 4),
        "blocks_written": len(times),
        "cpu_s": round(time.process_time() - c0, 3),
        "batch_tasks": batch_tasks[0],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "reads_before_first_block": vs.COUNTS.reads_at_first_write,
        "listings": vs.COUNTS.listings,
    }


def child(args: argparse.Namespace) -> None:
    import logging

    import virtual_store as vs

    logging.getLogger("n2v_chunked").setLevel(logging.ERROR)  # the synthetic data is far from the model's
    url = vs.add_volume("scale", vs.shape_for(args.gb * 1e9, CHUNKS), CHUNKS, axes="tyx")
    rec = startup(url, args.patches) if args.phase == "startup" else prediction(url, args.blocks)
    print(json.dumps(rec), flush=True)


def run_child(phase: str, gb: float, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", phase, "--gb", str(gb), "--blocks", str(args.blocks),
           "--patches", str(args.patches)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": args.child_timeout}
    if proc.returncode:
        raise SystemExit(f"scale: {phase} at {gb:g} GB failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (phase, figure, target of the largest size over the smallest)
RATIOS = [
    ("startup", "startup_s", None), ("startup", "stats_s", None), ("startup", "split_s", None),
    ("startup", "split_rss_mb", 1.2), ("startup", "patches_rss_mb", 1.2), ("startup", "peak_rss_mb", 1.2),
    ("predict", "first_block_s", None), ("predict", "per_block_s", 1.2), ("predict", "batch_tasks", 1.2),
    ("predict", "peak_rss_mb", 1.2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1, 100, 1000, 100000],
                    help="logical volume sizes in GB (default 1 100 1000 100000)")
    ap.add_argument("--blocks", type=int, default=100,
                    help="prediction blocks written per size (default 100: about 2 s of blocks to average over)")
    ap.add_argument("--patches", type=int, default=4096, help="training patches drawn per size (default 4096)")
    ap.add_argument("--child-timeout", type=float, default=1800,
                    help="seconds one size's phase may take before it is reported as timed out (default 1800)")
    ap.add_argument("--only", choices=["startup", "predict"], help="one phase only")
    ap.add_argument("--child", choices=["startup", "predict"], help=argparse.SUPPRESS)
    ap.add_argument("--gb", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.phase = args.child
        return child(args)
    if args.blocks < 2:
        raise SystemExit("scale: --blocks must be at least 2 (the time per block is measured after the first)")
    import virtual_store as vs

    emit(measure="setup", cores=len(os.sched_getaffinity(0)), load_average=os.getloadavg()[0], chunks=list(CHUNKS),
         patch=list(PATCH), blocks=args.blocks, patches=args.patches, model="2D U-Net depth 1, 1 feature")
    phases = [args.only] if args.only else ["startup", "predict"]
    results: dict[tuple[str, float], dict[str, Any]] = {}
    for gb in args.sizes_gb:
        shape = vs.shape_for(gb * 1e9, CHUNKS)
        volume = vs.Volume("tyx", shape, CHUNKS)
        for phase in phases:
            rec = run_child(phase, gb, args)
            results[(phase, gb)] = rec
            emit(measure=phase, gb=gb, bytes=volume.nbytes, shape=list(shape), chunks_total=volume.nchunks, **rec)
    small, large = min(args.sizes_gb), max(args.sizes_gb)
    for phase, key, target in RATIOS:
        if phase not in phases:
            continue
        a, b = results[(phase, small)].get(key), results[(phase, large)].get(key)
        if a is None or b is None:  # a phase that timed out
            emit(measure="ratio", phase=phase, figure=key, small_gb=small, large_gb=large, small=a, large=b,
                 ratio=None, target=target, met=False if target else None)
            continue
        emit(measure="ratio", phase=phase, figure=key, small_gb=small, large_gb=large, small=a, large=b,
             ratio=round(b / a, 3) if a else None, target=target,
             met=None if target is None or not a else b / a <= target)


if __name__ == "__main__":
    main()
