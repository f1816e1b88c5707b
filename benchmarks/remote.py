"""Reading from an object store vs local disk, side by side; one JSON line per measurement.

A local S3 server (moto, started here on 127.0.0.1) sits behind a proxy, in a
process of its own like a network, that adds ``--latency-ms`` (default 20 ms)
to every request.  The same OME-Zarr image is read from local disk and from
the bucket (through obstore, the store layer of ``s3://``):

* ``store``: the ceiling of the remote side, MB/s of whole-image reads
  through zarr (all chunk requests in flight at once), and the CPU seconds
  per MB of this process (the client), the S3 server and the proxy.
* ``sampler``: patches/s of the streaming patch sampler (64x64, batches of
  128) after start-up, over at least ``--patches`` patches and at least
  ``--min-reads`` block reads (so that the buffer cannot serve the timed
  window from what it loaded at start-up), for several reader-thread counts
  (``io_threads``: blocks read at once), with the CPU seconds per 1,000
  patches of the client, the server and the proxy, and the remote MB/s as a
  share of the store's ceiling.  Target: remote >= 0.5x local.
* ``predict``: prediction MPix/s (threads scheduler, output to local disk),
  local and remote alternated ``--repeats`` times; the ratio of the medians.
  Target: remote >= 0.8x local.

The image is stored in the chunks ``convert`` and ``predict`` write by
default (about 2 MiB, one request each); ``--chunk 128`` stores 64 KiB
chunks instead, the worst case for a store that is paid per request.

Every figure is a ratio of two measurements of the same run; on a machine
shared with other work, ``load`` (the 1-minute load average at the start of
each line) says how loaded it was.

Usage::

    python benchmarks/remote.py              # 4 x 2048 x 2048 float32, convert's default chunks (2 MiB)
    python benchmarks/remote.py --chunk 128  # 128^2 chunks of 64 KiB: a request per 64 KiB, the worst case
    python benchmarks/remote.py --smoke      # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

PATCH = (64, 64)
BATCH = 128


def emit(**record: Any) -> None:
    print(json.dumps({"load": round(os.getloadavg()[0], 2), **record}), flush=True)


class CpuClock:
    """Wall time and the CPU seconds of this process and of the given others, between start and stop."""

    def __init__(self, **others: int) -> None:
        import psutil

        self.others = {name: psutil.Process(pid) for name, pid in others.items()}

    def _now(self) -> dict[str, float]:
        t = os.times()
        now = {"wall": time.perf_counter(), "client": t.user + t.system}
        for name, proc in self.others.items():
            c = proc.cpu_times()
            now[name] = c.user + c.system + c.children_user + c.children_system
        return now

    def start(self) -> None:
        self.t0 = self._now()

    def stop(self) -> dict[str, float]:
        t1 = self._now()
        return {k: t1[k] - self.t0[k] for k in t1}


def per(spent: dict[str, float], unit: float) -> dict[str, float]:
    """CPU seconds per ``unit`` of work, for each process but the wall clock."""
    return {f"{k}_cpu_s": round(v / unit, 4) for k, v in spent.items() if k != "wall"}


def sampler_rate(data: Any, n: int, min_reads: int, io_threads: int, clock: CpuClock
                 ) -> tuple[float, dict[str, float], int, int]:
    """Patches/s after the first batch, over at least ``n`` patches and ``min_reads`` block reads.

    Also returns the time spent, the patches drawn and the bytes of blocks read.
    Counting block reads keeps the buffer from serving the whole window out of
    what it loaded at start-up (with 2 MiB chunks it can hold the whole image).
    """
    from n2v_chunked.sampling.dataset import ZarrPatchDataset

    ds = ZarrPatchDataset(data, PATCH, ("y", "x"), io_threads=io_threads, seed=0)
    with ds.stream() as s:
        s.next_batch(BATCH)
        loaded = s.stats["blocks_loaded"]
        clock.start()
        got = 0
        while got < n or s.stats["blocks_loaded"] - loaded < min_reads:
            got += len(s.next_batch(BATCH))
            if got > 1000 * n:
                raise SystemExit(f"remote: only {s.stats['blocks_loaded'] - loaded} block reads in {got} patches")
        spent = clock.stop()
        reads = s.stats["blocks_loaded"] - loaded
    return got / spent["wall"], spent, got, reads * ds._window_nbytes(int(ds.train_blocks[0]))


def predict_rate(src: str, out: str, model: Path, blocks: tuple[int, ...]) -> float:
    from n2v_chunked.prediction import predict

    res = predict(src, out, model, chunks=blocks, scheduler="threads", progress=False, pyramid=False,
                  overwrite=True)
    return float(res.attrs["predict_stats"]["mpix_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--planes", type=int, default=4)
    ap.add_argument("--chunk", default="auto",
                    help="stored chunk side, or auto: the chunks convert and predict write by default (about 2 MiB)")
    ap.add_argument("--patches", type=int, default=32768, help="patches timed per sampler run, at least")
    ap.add_argument("--min-reads", type=int, default=32, help="block reads per timed sampler run, at least")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--io-threads", default="2,8", help="sampler reader threads to try (train uses 8 for a URL)")
    ap.add_argument("--repeats", type=int, default=3, help="prediction runs per side, alternated")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.side, args.planes, args.patches, args.min_reads, args.io_threads, args.repeats = 128, 2, 256, 2, "2", 1

    import numpy as np
    import xarray as xr
    import zarr

    from helpers import make_model_dir
    from n2v_chunked.io import stores
    from n2v_chunked.io.objects import zarr_store
    from n2v_chunked.io.ome import default_chunks, write_ome_zarr
    from n2v_chunked.io.sources import open_image
    from s3server import proxy_process, start_moto

    tmp = Path(tempfile.mkdtemp(prefix="n2v-remote-"))
    moto = start_moto()
    try:
        with proxy_process(moto.url, args.latency_ms / 1000) as (proxy_url, proxy_pid):
            os.environ.update(moto.env(url=proxy_url))
            stores.tune_for_latency()  # what the CLI does for a run with a remote URL
            moto.client().create_bucket(Bucket="bench")
            rng = np.random.default_rng(0)
            img = xr.DataArray(rng.normal(100, 10, (args.planes, args.side, args.side)).astype("float32"),
                               dims=("t", "y", "x"))
            if args.chunk == "auto":  # what convert and predict write; predict works in blocks of them
                chunks = default_chunks(img.shape, img.dims, img.dtype)
                blocks = chunks
            else:  # small stored chunks; predict's blocks span 2 x 2 of them
                chunks = (1, int(args.chunk), int(args.chunk))
                blocks = (1, 2 * int(args.chunk), 2 * int(args.chunk))
            local = str(tmp / "img.ome.zarr")
            remote = "s3://bench/img.ome.zarr"
            write_ome_zarr(local, img, chunks=chunks, progress=False)
            write_ome_zarr(remote, img, chunks=chunks, progress=False)
            model = make_model_dir(tmp / "model", features=8)
            clock = CpuClock(server=moto.proc.pid, proxy=proxy_pid)
            common = {"latency_ms": args.latency_ms, "shape": list(img.shape), "chunks": list(chunks),
                      "chunk_kib": round(math.prod(chunks) * img.dtype.itemsize / 1024)}

            level0 = zarr.open_array(store=zarr_store(f"{remote}/0", read_only=True), mode="r")
            level0[0]  # connections opened
            clock.start()
            level0[:]
            spent = clock.stop()
            mb = img.nbytes / 1e6
            ceiling = mb / spent["wall"]
            emit(bench="store", remote_mb_s=round(ceiling, 2), **per(spent, mb), **common)

            for threads in (int(t) for t in args.io_threads.split(",")):
                r_local, _, n_local, _ = sampler_rate(open_image(local), args.patches, args.min_reads, threads, clock)
                r_remote, spent, n_remote, nbytes = sampler_rate(open_image(remote), args.patches, args.min_reads,
                                                                 threads, clock)
                remote_mb_s = nbytes / 1e6 / spent["wall"]
                emit(bench="sampler", io_threads=threads, local_patches_s=round(r_local, 1),
                     remote_patches_s=round(r_remote, 1), ratio=round(r_remote / r_local, 3), target=0.5,
                     patches_local=n_local, patches_remote=n_remote, remote_mb_read=round(nbytes / 1e6, 1),
                     remote_mb_s=round(remote_mb_s, 2), share_of_store_ceiling=round(remote_mb_s / ceiling, 3),
                     **per(spent, n_remote / 1000), **common)

            p_local, p_remote = [], []
            for _ in range(args.repeats):
                p_local.append(predict_rate(local, str(tmp / "out_local.zarr"), model, blocks))
                p_remote.append(predict_rate(remote, str(tmp / "out_remote.zarr"), model, blocks))
            med_local, med_remote = statistics.median(p_local), statistics.median(p_remote)
            emit(bench="predict", local_mpix_s=p_local, remote_mpix_s=p_remote, median_local=med_local,
                 median_remote=med_remote, ratio=round(med_remote / med_local, 3), target=0.8, **common)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
