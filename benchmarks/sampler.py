"""Benchmarks of the chunk-aware patch sampler; one JSON line per measurement.

Three measurements (issue 4):

* ``throughput``: 64x64 float32 patches per second from a Blosc-compressed
  Zarr array on local disk, side by side for naive per-patch Zarr reads, the
  sampler, and random crops from the same image held in memory (numpy).
  Targets: sampler >= 20x naive, >= 0.5x in-memory.
* ``memory``: peak RSS (psutil, polled; and the child's own ru_maxrss) of a
  subprocess that streams patches from a large and from a small synthetic
  volume.  Target: large / small <= 1.2 (the buffer bounds memory, not the
  volume).
* ``starvation``: fraction of step time spent waiting for data while a
  consumer does fixed work per batch (a sleep, or a small conv net's forward
  and backward pass), in process and with one loader worker.

Usage::

    python benchmarks/sampler.py            # full: 16 GB vs 1 GB volumes for memory
    python benchmarks/sampler.py --quick    # 2 GB vs 128 MB
    python benchmarks/sampler.py --smoke    # tiny, seconds (used by the tests)

Volumes are written once under ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from synthetic import ensure_volume  # noqa: E402

PATCH = (64, 64)
BATCH = 128


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------


def crop_rate(arr: Any, n: int, seed: int = 0) -> float:
    """Random crops read one by one into float32 batches: the naive per-patch loader.

    With a Zarr array each crop decodes the chunks it touches; with an
    in-memory numpy array it is the usual in-memory loader.
    """
    rng = np.random.default_rng(seed)
    H, W = arr.shape
    out = np.empty((BATCH, 1, *PATCH), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(n):
        y, x = rng.integers(0, H - PATCH[0] + 1), rng.integers(0, W - PATCH[1] + 1)
        out[i % BATCH, 0] = arr[y:y + PATCH[0], x:x + PATCH[1]]
    return n / (time.perf_counter() - t0)


def sampler_rate(z: Any, n: int, **kw: Any) -> tuple[float, float, dict]:
    """Steady-state patches/s of the sampler (after the buffer is first filled) and the start-up time."""
    from n2v_chunked.sampling.dataset import ZarrPatchDataset

    t0 = time.perf_counter()
    ds = ZarrPatchDataset(z, PATCH, dims=("y", "x"), **kw)
    with ds.stream() as s:
        s.next_batch(BATCH)
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        got = 0
        while got < n:
            got += len(s.next_batch(BATCH))
        rate = got / (time.perf_counter() - t1)
        stats = dict(s.stats)
    return rate, startup, stats


def throughput(args: argparse.Namespace) -> None:
    import zarr

    side = args.tp_side
    path = Path(args.workdir) / f"tp_{side}.zarr"
    t0 = time.perf_counter()
    z = ensure_volume(str(path), (side, side), (args.chunk, args.chunk), threads=2)
    z = zarr.open_array(str(path), mode="r")
    emit(measure="volume", path=str(path), shape=list(z.shape), chunks=list(z.chunks), dtype=str(z.dtype),
         compressor="blosc-lz4-shuffle", nbytes=int(z.nbytes), seconds=round(time.perf_counter() - t0, 1))
    arr = z[...]
    n_naive, n_fast = args.tp_naive, args.tp_patches
    rates = {}
    # Interleave the methods so that load from other processes hits them alike.
    for rep in range(args.reps):
        rates.setdefault("naive_zarr", []).append(crop_rate(z, n_naive, rep))
        rates.setdefault("in_memory_numpy", []).append(crop_rate(arr, n_fast, rep))
        r, startup, stats = sampler_rate(z, n_fast, seed=rep)
        rates.setdefault("sampler", []).append(r)
    for method, rs in rates.items():
        extra = dict(startup_s=round(startup, 3), blocks_loaded=stats["blocks_loaded"],
                     peak_buffer_mb=round(stats["peak_buffer_bytes"] / 2**20, 1)) if method == "sampler" else {}
        emit(measure="throughput", method=method, patches_per_s=round(float(np.median(rs))),
             runs=[round(r) for r in rs], patch=list(PATCH), **extra)
    s, nv, mem = (float(np.median(rates[k])) for k in ("sampler", "naive_zarr", "in_memory_numpy"))
    emit(measure="throughput_ratio", sampler_vs_naive=round(s / nv, 1), target_vs_naive=20,
         sampler_vs_in_memory=round(s / mem, 2), target_vs_in_memory=0.5, cpu_count=os.cpu_count())


# ----------------------------------------------------------------------------
# Memory (a subprocess per volume)
# ----------------------------------------------------------------------------


def memory_child(path: str, patches: int, buffer_mb: int) -> None:
    """Run in the child: stream ``patches`` patches and report ru_maxrss."""
    import zarr

    from n2v_chunked.sampling.dataset import ZarrPatchDataset

    z = zarr.open_array(path, mode="r")
    ds = ZarrPatchDataset(z, PATCH, ("y", "x"), dims=("z", "y", "x"), buffer_bytes=buffer_mb * 2**20)
    t0 = time.perf_counter()
    with ds.stream() as s:
        got = 0
        while got < patches:
            got += len(s.next_batch(BATCH))
        stats = dict(s.stats)
    print(json.dumps(dict(ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          seconds=time.perf_counter() - t0, blocks_loaded=stats["blocks_loaded"],
                          peak_buffer_mb=stats["peak_buffer_bytes"] / 2**20)))


def peak_rss(cmd: list[str]) -> tuple[float, dict]:
    """Run ``cmd``; poll its RSS (with children) every 10 ms; return (peak MB, its JSON output)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"memory child failed: {err[-2000:]}")
    return peak / 2**20, json.loads(out.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> None:
    side = args.mem_side
    plane = side * side * 4  # float32 (z, y, x) stack, chunks (1, 512, 512); z is a sample axis
    peaks = {}
    for label, gb in (("small", args.small_gb), ("large", args.large_gb)):
        nz = max(1, round(gb * 2**30 / plane))
        path = Path(args.workdir) / f"mem_{nz}x{side}.zarr"
        t0 = time.perf_counter()
        ensure_volume(str(path), (nz, side, side), (1, 512, 512), threads=2)
        gen = time.perf_counter() - t0
        peak, child = peak_rss([sys.executable, __file__, "--memory-child", str(path),
                                "--patches", str(args.mem_patches), "--buffer-mb", str(args.buffer_mb)])
        peaks[label] = peak
        emit(measure="memory", volume=label, nbytes=nz * plane, shape=[nz, side, side], buffer_mb=args.buffer_mb,
             patches=args.mem_patches, peak_rss_mb=round(peak, 1), child_ru_maxrss_mb=round(child["ru_maxrss_mb"], 1),
             stream_s=round(child["seconds"], 1), blocks_loaded=child["blocks_loaded"],
             peak_buffer_mb=round(child["peak_buffer_mb"], 1), generate_s=round(gen, 1))
    emit(measure="memory_ratio", large_over_small=round(peaks["large"] / peaks["small"], 3), target=1.2)


# ----------------------------------------------------------------------------
# Starvation
# ----------------------------------------------------------------------------


def _consumer(kind: str) -> Any:
    import torch

    if kind == "sleep":
        return lambda batch: time.sleep(0.02)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 1, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step(batch: Any) -> None:
        opt.zero_grad()
        loss = (net(batch) - batch).square().mean()
        loss.backward()
        opt.step()

    return step


def starvation(args: argparse.Namespace) -> None:
    import torch
    import zarr

    from n2v_chunked.sampling.dataset import ZarrPatchDataset, batches

    path = Path(args.workdir) / f"tp_{args.tp_side}.zarr"
    z = zarr.open_array(str(path), mode="r")
    for consumer in ("sleep", "convnet"):
        for mode in ("in_process", "loader_1_worker"):
            work = _consumer(consumer)
            ds = ZarrPatchDataset(str(path), PATCH, dims=("y", "x"))
            if mode == "in_process":
                it = batches(ds, args.batch)
            else:
                it = iter(torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=1, prefetch_factor=4))
            work(next(it))  # start-up (first buffer fill, first-call set-up) is not timed
            wait = total = 0.0
            for _ in range(args.steps):
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                work(batch)
                t2 = time.perf_counter()
                wait += t1 - t0
                total += t2 - t0
            del it
            emit(measure="starvation", consumer=consumer, mode=mode, steps=args.steps, batch=args.batch,
                 step_ms=round(1e3 * total / args.steps, 2), wait_fraction=round(wait / total, 4),
                 torch_threads=torch.get_num_threads())
    del z


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="chunk-aware sampler benchmarks (JSON lines)")
    p.add_argument("--quick", action="store_true", help="memory with 2 GB vs 128 MB volumes, fewer patches")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (tests)")
    p.add_argument("--workdir", default=os.environ.get("N2V_BENCH_DIR", "/tmp/n2v_bench"))
    p.add_argument("--large-gb", type=float, default=16.0)
    p.add_argument("--small-gb", type=float, default=1.0)
    p.add_argument("--buffer-mb", type=int, default=256, help="sampler buffer in the memory runs")
    p.add_argument("--mem-side", type=int, default=4096, help="plane side of the memory volumes")
    p.add_argument("--mem-patches", type=int, default=400_000)
    p.add_argument("--tp-side", type=int, default=8192, help="side of the throughput image")
    p.add_argument("--chunk", type=int, default=256, help="chunk side of the throughput image")
    p.add_argument("--tp-patches", type=int, default=200_000)
    p.add_argument("--tp-naive", type=int, default=3000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="steps per starvation run")
    p.add_argument("--batch", type=int, default=BATCH, help="batch size of the starvation runs")
    p.add_argument("--only", nargs="+", choices=["throughput", "memory", "starvation"],
                   default=["throughput", "memory", "starvation"])
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--patches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.patches, args.buffer_mb)
        return 0
    if args.quick:
        args.large_gb, args.small_gb, args.buffer_mb = 2.0, 0.125, 64
        args.mem_patches, args.tp_side, args.tp_patches, args.reps, args.steps = 200_000, 4096, 100_000, 3, 50
    if args.smoke:
        args.large_gb, args.small_gb, args.buffer_mb, args.mem_patches, args.mem_side = 1 / 128, 1 / 512, 2, 2000, 512
        args.tp_side, args.tp_patches, args.tp_naive, args.reps, args.steps, args.batch = 1024, 3000, 200, 1, 2, 16
    os.makedirs(args.workdir, exist_ok=True)
    emit(measure="config", quick=args.quick, smoke=args.smoke, cpu_count=os.cpu_count(),
         load_avg=[round(x, 2) for x in os.getloadavg()], workdir=args.workdir)
    if "throughput" in args.only:
        throughput(args)
    if "memory" in args.only:
        memory(args)
    if "starvation" in args.only:
        ensure_volume(str(Path(args.workdir) / f"tp_{args.tp_side}.zarr"), (args.tp_side,) * 2, (args.chunk,) * 2,
                      threads=2)
        starvation(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
