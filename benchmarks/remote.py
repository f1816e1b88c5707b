"""Reading from an object store vs local disk, side by side; one JSON line per measurement.

A local S3 server (moto, started here on 127.0.0.1) sits behind a proxy that
adds ``--latency-ms`` (default 20 ms) to every request, like a store across a
network.  The same OME-Zarr image is read from local disk and from the bucket:

* ``sampler``: patches/s of the streaming patch sampler (64x64, batches of
  128) after start-up, for several reader-thread counts (``io_threads``).
  Target: remote >= 0.5x local.
* ``predict``: prediction MPix/s (threads scheduler, output to local disk).
  Target: remote >= 0.8x local.

Usage::

    python benchmarks/remote.py            # 4 x 1024 x 1024 float32
    python benchmarks/remote.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
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
    print(json.dumps(record), flush=True)


def sampler_rate(data: Any, n: int, io_threads: int) -> float:
    from n2v_chunked.sampling.dataset import ZarrPatchDataset

    ds = ZarrPatchDataset(data, PATCH, ("y", "x"), io_threads=io_threads, seed=0)
    with ds.stream() as s:
        s.next_batch(BATCH)
        t0 = time.perf_counter()
        got = 0
        while got < n:
            got += len(s.next_batch(BATCH))
        return got / (time.perf_counter() - t0)


def predict_rate(src: str, out: str, model: Path, chunk: int) -> float:
    from n2v_chunked.predict import predict

    res = predict(src, out, model, chunks=(1, chunk, chunk), scheduler="threads", progress=False, pyramid=False)
    return float(res.attrs["predict_stats"]["mpix_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--planes", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=128, help="stored chunk side")
    ap.add_argument("--patches", type=int, default=4096, help="patches timed per sampler run")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--io-threads", default="2,8", help="sampler reader threads to try (train uses 8 for a URL)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.side, args.planes, args.patches, args.io_threads = 256, 2, 512, "2"

    import numpy as np
    import xarray as xr

    from helpers import make_model_dir
    from n2v_chunked.io import stores
    from n2v_chunked.io.ome import write_ome_zarr
    from n2v_chunked.io.sources import open_image
    from s3server import FaultProxy, start_moto

    tmp = Path(tempfile.mkdtemp(prefix="n2v-remote-"))
    moto = start_moto()
    proxy = FaultProxy(moto.url, latency_s=args.latency_ms / 1000)
    try:
        os.environ.update(moto.env(url=proxy.url))
        stores.tune_for_latency()  # what the CLI does for a run with a remote URL
        moto.client().create_bucket(Bucket="bench")
        rng = np.random.default_rng(0)
        img = xr.DataArray(rng.normal(100, 10, (args.planes, args.side, args.side)).astype("float32"),
                           dims=("t", "y", "x"))
        local = str(tmp / "img.ome.zarr")
        remote = "s3://bench/img.ome.zarr"
        write_ome_zarr(local, img, chunks=(1, args.chunk, args.chunk), progress=False)
        write_ome_zarr(remote, img, chunks=(1, args.chunk, args.chunk), progress=False)
        model = make_model_dir(tmp / "model", features=8)
        common = {"latency_ms": args.latency_ms, "shape": list(img.shape), "chunk": args.chunk}

        for threads in (int(t) for t in args.io_threads.split(",")):
            r_local = sampler_rate(open_image(local), args.patches, threads)
            r_remote = sampler_rate(open_image(remote), args.patches, threads)
            emit(bench="sampler", io_threads=threads, local_patches_s=round(r_local, 1),
                 remote_patches_s=round(r_remote, 1), ratio=round(r_remote / r_local, 3), target=0.5, **common)

        chunk = 2 * args.chunk
        p_local = predict_rate(local, str(tmp / "out_local.zarr"), model, chunk)
        p_remote = predict_rate(remote, str(tmp / "out_remote.zarr"), model, chunk)
        emit(bench="predict", local_mpix_s=p_local, remote_mpix_s=p_remote, ratio=round(p_remote / p_local, 3),
             target=0.8, requests=proxy.requests, **common)
    finally:
        stores.close_sessions()
        proxy.close()
        moto.stop()


if __name__ == "__main__":
    main()
