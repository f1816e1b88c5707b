"""Benchmark chunked prediction: pipeline efficiency and scaling with volume size.

Prints one JSON line per measurement:

* ``bare``: MPix/s of the network alone (``run_network`` on the same pixels,
  in pieces of the working chunk, no halo, no I/O), fp32 and bf16;
* ``pipeline``: MPix/s of the whole pipeline (read, halo, inference, write,
  default chunking; cluster start excluded) and its ``efficiency`` =
  pipeline / bare, fp32 and bf16 (target >= 0.8);
* ``scale``: wall time per pixel and peak RSS (this process and all its
  children, sampled) of predicting a small and a large volume in a fresh
  process each, and their ratios (target <= 1.2 each);
* ``scheduler`` (with ``--compare-schedulers``): pipeline MPix/s for the local
  scheduler layouts, to choose the defaults.

The model is the paper's 32-feature depth-2 2D U-Net with random weights
(``--features`` for another width).
Volumes are ``(t, y, x)`` float32 stacks of ``--frame`` x ``--frame`` frames,
written to OME-Zarr first (not timed).

Usage::

    python benchmarks/predict.py                  # 1 GB vs 16 GB (hours on 2 cores)
    python benchmarks/predict.py --quick          # a smoke run of a few seconds
    python benchmarks/predict.py --small-gb 0.03 --large-gb 0.5 --efficiency-gb 0.06
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def make_model(model_dir: Path, features: int = 32, depth: int = 2) -> None:
    import torch

    from n2v_chunked import checkpoint as ckpt
    from n2v_chunked.config import MaskConfig, ModelConfig, TrainConfig
    from n2v_chunked.model import UNet

    torch.manual_seed(0)
    cfg = ModelConfig(dims=2, depth=depth, features=features)
    ckpt.write_config(model_dir, cfg, MaskConfig(), TrainConfig(), np.array([100.0]), np.array([20.0]), axes="yx")
    ckpt.save_weights(model_dir, UNet(cfg), ckpt.WEIGHTS_BEST)


def make_volume(path: Path, frames: int, frame: int) -> None:
    """A noisy float32 (t, y, x) stack written chunk by chunk (bounded memory)."""
    import dask.array as da
    import xarray as xr

    from n2v_chunked.ome import write_ome_zarr

    rs = da.random.RandomState(0)
    x = (100 + 20 * rs.standard_normal((frames, frame, frame), chunks=(1, frame, frame))).astype(np.float32)
    write_ome_zarr(path, xr.DataArray(x, dims=("t", "y", "x")), pyramid=False, progress=False, overwrite=True)


def frames_for(gb: float, frame: int) -> int:
    return max(1, round(gb * 1e9 / (frame * frame * 4)))


def bare_rate(model_dir: Path, volume: Path, precision: str, max_frames: int) -> float:
    """MPix/s of run_network alone on the volume's pixels, in working-chunk pieces, no halo."""
    import torch

    from n2v_chunked import checkpoint as ckpt
    from n2v_chunked.inference import run_network
    from n2v_chunked.predict import plan
    from n2v_chunked.sources import open_image

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trained = ckpt.load_model(model_dir, "cpu")
    data = open_image(str(volume))
    p = plan(trained, data)
    arr = data.data[:max_frames].compute()
    xn = (arr - trained.mean[0]) / trained.std[0]
    cy, cx = p.chunks[1], p.chunks[2]
    pieces = [xn[:, y : y + cy, x : x + cx] for y in range(0, xn.shape[1], cy) for x in range(0, xn.shape[2], cx)]
    run_network(trained, pieces[0][:1, None], precision=precision)  # warm-up
    t0 = time.perf_counter()
    for piece in pieces:
        run_network(trained, piece[:, None], precision=precision)
    return arr.size / (time.perf_counter() - t0) / 1e6


def pipeline_rate(model_dir: Path, volume: Path, out: Path, precision: str, scheduler: Any,
                  warmup: Path | None = None) -> dict[str, Any]:
    from n2v_chunked.predict import predict

    if warmup is not None:  # load the model and warm up oneDNN in every worker, untimed
        predict(str(warmup), str(out), str(model_dir), precision=precision, scheduler=scheduler,
                overwrite=True, progress=False, pyramid=False)
    t0 = time.perf_counter()
    res = predict(str(volume), str(out), str(model_dir), precision=precision, scheduler=scheduler,
                  overwrite=True, progress=False, pyramid=False)
    dt = time.perf_counter() - t0
    return {"mpix_per_s": res.size / dt / 1e6, "seconds": dt, "blocks": res.attrs["predict_stats"]["blocks_total"],
            "chunks": list(res.data.chunksize)}


class PeakRSS:
    """Peak of the summed RSS of a process and its descendants, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def scale_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: predict one volume, print its wall time."""
    from n2v_chunked.cluster import cluster_client
    from n2v_chunked.predict import predict

    with (cluster_client("local", n_workers=args.workers, threads_per_worker=1) if args.scheduler == "local"
          else contextlib.nullcontext("threads")) as sched:
        t0 = time.perf_counter()  # cluster start excluded
        res = predict(args.volume, args.out, args.model_dir, scheduler=sched, overwrite=True, progress=False,
                      pyramid=False)
        dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "pixels": int(res.size)}), flush=True)


def scale(tmp: Path, model_dir: Path, gb: float, frame: int, workers: int | None, scheduler: str) -> dict[str, Any]:
    volume = tmp / f"scale-{gb:g}.ome.zarr"
    make_volume(volume, frames_for(gb, frame), frame)
    cmd = [sys.executable, __file__, "--child", "--volume", str(volume), "--out", str(tmp / "scale-out.ome.zarr"),
           "--model-dir", str(model_dir), "--scheduler", scheduler] + (["--workers", str(workers)] if workers else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    meter = PeakRSS(proc.pid)
    stdout, _ = proc.communicate()
    peak = meter.stop()
    if proc.returncode:
        raise SystemExit(f"scale child failed ({proc.returncode})")
    rec = json.loads(stdout.strip().splitlines()[-1])
    import shutil

    shutil.rmtree(volume, ignore_errors=True)
    shutil.rmtree(tmp / "scale-out.ome.zarr", ignore_errors=True)
    return {"gb": gb, "frames": frames_for(gb, frame), "seconds": rec["seconds"],
            "us_per_pixel": rec["seconds"] / rec["pixels"] * 1e6, "peak_rss_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    ap.add_argument("--frame", type=int, default=2048, help="frame side (default 2048)")
    ap.add_argument("--efficiency-gb", type=float, default=0.25, help="volume for bare vs pipeline (default 0.25)")
    ap.add_argument("--small-gb", type=float, default=1.0, help="small volume of the scale test (default 1)")
    ap.add_argument("--large-gb", type=float, default=16.0, help="large volume of the scale test (default 16)")
    ap.add_argument("--features", type=int, default=32,
                    help="initial features of the U-Net (default 32, the paper's); a narrower network makes the "
                    "16 GB scale run feasible on a few cores and leaves I/O a larger share of the time")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated (default fp32,bf16)")
    ap.add_argument("--workers", type=int, help="LocalCluster workers (default: n2v_chunked's default)")
    ap.add_argument("--scheduler", choices=["local", "threads"], default="local",
                    help="LocalCluster (default; its start is not timed) or in-process threads")
    ap.add_argument("--skip-efficiency", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--compare-schedulers", action="store_true", help="time local scheduler layouts")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return scale_child(args)
    if args.quick:
        args.frame, args.efficiency_gb, args.small_gb, args.large_gb = 128, 0.0002, 0.0002, 0.0008
        args.scheduler = "threads"
    cores = len(os.sched_getaffinity(0))
    emit(measure="setup", cores=cores, frame=args.frame, quick=args.quick,
         model=f"2D U-Net depth 2, {args.features} features")

    with tempfile.TemporaryDirectory(prefix="n2v-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model_dir = tmp / "model"
        make_model(model_dir, features=args.features)
        if not args.skip_efficiency or args.compare_schedulers:
            from n2v_chunked.cluster import cluster_client
            from n2v_chunked.predict import LOCAL_WORKERS

            volume = tmp / "eff.ome.zarr"
            frames = frames_for(args.efficiency_gb, args.frame)
            make_volume(volume, frames, args.frame)
            warm = tmp / "warm.ome.zarr"
            make_volume(warm, 2, min(args.frame, 256))
            if not args.skip_efficiency:
                with (cluster_client("local", n_workers=args.workers or LOCAL_WORKERS, threads_per_worker=1)
                      if args.scheduler == "local" else contextlib.nullcontext("threads")) as client:
                    for prec in args.precisions.split(","):
                        bare = bare_rate(model_dir, volume, prec, frames)
                        emit(measure="bare", precision=prec, frames=frames, mpix_per_s=round(bare, 4))
                        pipe = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", prec, client, warm)
                        emit(measure="pipeline", precision=prec, frames=frames, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in pipe.items()},
                             efficiency=round(pipe["mpix_per_s"] / bare, 3))
            if args.compare_schedulers:
                import n2v_chunked.predict as P

                for threads in (1, cores):
                    P.LOCAL_DASK_THREADS = threads
                    r = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", "fp32", "threads", warm)
                    emit(measure="scheduler", layout=f"threads: {threads} dask x {cores // threads} torch",
                         mpix_per_s=round(r["mpix_per_s"], 4))
                for workers in (1, cores):
                    with cluster_client("local", n_workers=workers, threads_per_worker=1) as client:
                        r = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", "fp32", client, warm)
                    emit(measure="scheduler", layout=f"LocalCluster: {workers} worker(s) x 1 thread x "
                         f"{max(1, cores // workers)} torch", mpix_per_s=round(r["mpix_per_s"], 4))
        if not args.skip_scale:
            small = scale(tmp, model_dir, args.small_gb, args.frame, args.workers, args.scheduler)
            emit(measure="scale", **{k: round(v, 4) if isinstance(v, float) else v for k, v in small.items()})
            large = scale(tmp, model_dir, args.large_gb, args.frame, args.workers, args.scheduler)
            emit(measure="scale", **{k: round(v, 4) if isinstance(v, float) else v for k, v in large.items()})
            emit(measure="scale_ratio", size_ratio=round(large["gb"] / small["gb"], 2),
                 time_per_pixel_ratio=round(large["us_per_pixel"] / small["us_per_pixel"], 3),
                 peak_rss_ratio=round(large["peak_rss_mb"] / small["peak_rss_mb"], 3))


if __name__ == "__main__":
    main()
