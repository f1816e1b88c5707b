"""Benchmark chunked prediction: pipeline efficiency and scaling with volume size.

Prints one JSON line per measurement:

* ``ceiling``: MPix/s of the bare network on one in-memory ``--tile`` x
  ``--tile`` tile (no padding, no I/O) in every runtime, layout and precision
  side by side: torch NCHW fp32 (the old default), torch channels-last fp32
  and bf16, ONNX Runtime fp32, OpenVINO f32 and bf16 (those installed); the
  mean over ``--repeats`` passes, measured before and after the pipelines and
  averaged (both printed), and the CPU seconds per MPix;
* ``pipeline``: MPix/s of the whole pipeline (``predict`` reading and writing
  OME-Zarr, default chunking, LocalCluster start excluded) with the CLI's
  defaults (``auto``/``auto``), with ``--precision fp32`` and with
  ``--runtime torch``, each with its ``ratio`` to its ceiling: the best
  configuration overall (target >= 0.5), the best exact (fp32) runtime
  (target >= 0.7) and the best torch eager configuration (target >= 0.7);
  ``cpu_ratio`` is the same ratio in CPU seconds per MPix (the client and
  its workers).  Warm-up (model load, export/compile, each worker's first
  blocks of the measured shape) is a separate run on two frames per worker,
  excluded from the rate and printed as ``warmup_seconds``;
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
    python benchmarks/predict.py --frame 1024 --efficiency-gb 0.134 --skip-scale   # ceiling vs pipeline, 32 blocks
    # on a GPU machine: ceiling in fp32/bf16/fp16, pipeline on the GPU, its utilisation
    python benchmarks/predict.py --device cuda --efficiency-gb 1 --tile 2048 --skip-scale
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

    from n2v_chunked.model import checkpoint as ckpt
    from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig
    from n2v_chunked.model.unet import UNet

    torch.manual_seed(0)
    cfg = ModelConfig(dims=2, depth=depth, features=features)
    ckpt.write_config(model_dir, cfg, MaskConfig(), TrainConfig(), np.array([100.0]), np.array([20.0]), axes="yx")
    ckpt.save_weights(model_dir, UNet(cfg), ckpt.WEIGHTS_BEST)


def make_volume(path: Path, frames: int, frame: int) -> None:
    """A noisy float32 (t, y, x) stack written chunk by chunk (bounded memory)."""
    import dask.array as da
    import xarray as xr

    from n2v_chunked.io.ome import write_ome_zarr

    rs = da.random.RandomState(0)
    x = (100 + 20 * rs.standard_normal((frames, frame, frame), chunks=(1, frame, frame))).astype(np.float32)
    write_ome_zarr(path, xr.DataArray(x, dims=("t", "y", "x")), pyramid=False, progress=False, overwrite=True)


def frames_for(gb: float, frame: int) -> int:
    return max(1, round(gb * 1e9 / (frame * frame * 4)))


# (name, runtime, precision, exact): the ceiling's candidates; "torch-nchw" is the bare module as it was
# called before engine/runtimes.py (NCHW, no autocast)
CONFIGS = [
    ("torch NCHW fp32", "torch-nchw", "fp32", True),
    ("torch channels-last fp32", "torch", "fp32", True),
    ("torch channels-last bf16", "torch", "bf16", False),
    ("onnxruntime fp32", "onnxruntime", "fp32", True),
    ("openvino f32", "openvino", "fp32", True),
    ("openvino bf16", "openvino", "bf16", False),
    ("torch channels-last fp16", "torch", "fp16", False),  # CUDA only
]


def cpu_seconds(include_children: bool = False) -> float:
    """CPU seconds (user + system) of this process, and of its child processes (LocalCluster workers) if asked."""
    import psutil

    procs = [psutil.Process()]
    if include_children:
        procs += psutil.Process().children(recursive=True)
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def ceiling(model_dir: Path, tile: int, repeats: int, device: str = "cpu",
            configs: list[tuple[str, str, str, bool]] = CONFIGS) -> list[dict[str, Any]]:
    """MPix/s of the bare network on one in-memory tile, per runtime/layout/precision.

    The rate is the mean over ``repeats`` passes (and at least 0.5 s) after a warm-up pass (a mean,
    like the pipeline's rate over its whole run: a best-of would pick the
    quietest moment of a shared machine); ``cpu_s_per_mpix`` is the process's
    CPU time per MPix over the same passes.  On CUDA the tile lives on the GPU
    (no copies) and only torch runs, in fp32, bf16 and fp16.
    """
    import torch

    from n2v_chunked.model import checkpoint as ckpt
    from n2v_chunked.engine.runtimes import can_run, get_runner, installed

    cuda = device.startswith("cuda")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trained = ckpt.load_model(model_dir, device)
    x = torch.randn(1, 1, tile, tile, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for name, runtime, precision, exact in configs:
        if not installed(runtime.split("-")[0]) or (cuda and not runtime.startswith("torch")):
            continue
        if precision == "fp16" and not cuda:
            continue
        if runtime in ("openvino", "onnxruntime") and not can_run(runtime, precision):
            continue  # the CPU runs it only as f32 (OpenVINO bf16 without native bf16): not a ceiling of its own
        if runtime == "torch-nchw":
            run = trained.model
        else:
            run = get_runner(trained.model, trained.device, runtime, precision)
        with torch.inference_mode():
            run(x)  # warm-up: export, compile, oneDNN primitive creation, cuDNN autotuning
            sync()
            t0, c0 = time.perf_counter(), cpu_seconds()
            passes = 0
            # at least 0.5 s: CPU time is counted in clock ticks, which a small, fast tile could fall between
            while passes < repeats or time.perf_counter() - t0 < 0.5:
                run(x)
                sync()
                passes += 1
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        mpix = x.numel() * passes / 1e6
        rows.append({"config": name, "runtime": runtime, "precision": precision, "exact": exact,
                     "mpix_per_s": round(mpix / dt, 4), "cpu_s_per_mpix": round(cpu / mpix, 4)})
    return rows


def pipeline_rate(model_dir: Path, volume: Path, out: Path, scheduler: Any, warmup: Path | None = None,
                  **options: Any) -> dict[str, Any]:
    """The pipeline's MPix/s over a whole run, and its CPU seconds per MPix (this process and its workers).

    ``warmup``: a run before, on a small volume of the same frame shape, that
    loads the model and exports/compiles it and prepares the block shape in
    every worker; it is excluded from the rate and reported as ``warmup_seconds``.
    """
    from n2v_chunked.prediction import predict

    kw = dict(scheduler=scheduler, overwrite=True, progress=False, pyramid=False, **options)
    warm_s = None
    if warmup is not None:
        t0 = time.perf_counter()
        predict(str(warmup), str(out), str(model_dir), **kw)
        warm_s = round(time.perf_counter() - t0, 3)
    t0, c0 = time.perf_counter(), cpu_seconds(include_children=True)
    res = predict(str(volume), str(out), str(model_dir), **kw)
    dt, cpu = time.perf_counter() - t0, cpu_seconds(include_children=True) - c0
    return {"mpix_per_s": round(res.size / dt / 1e6, 4), "cpu_s_per_mpix": round(cpu / (res.size / 1e6), 4),
            "seconds": round(dt, 3), "warmup_seconds": warm_s,
            "blocks": res.attrs["predict_stats"]["blocks_total"], "chunks": list(res.data.chunksize),
            "used": res.attrs["predict_stats"].get("runtime")}


class GPUUtilisation:
    """GPU utilisation samples while inside (``torch.cuda.utilization``, which needs pynvml, else
    ``nvidia-smi``); nothing on CPU."""

    def __init__(self, device: str) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()

    def __enter__(self) -> "GPUUtilisation":
        if self.device.startswith("cuda"):
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        import torch

        dev = torch.device(self.device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)]
        readers = [lambda: torch.cuda.utilization(dev),
                   lambda: int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])]
        for read in readers:
            try:
                read()
                break
            except Exception:  # no pynvml / no nvidia-smi: the next, else no figure
                continue
        else:
            return
        while not self._stop.wait(0.2):
            self.samples.append(read())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


# (label, predict options, which ceiling the ratio is taken against)
PIPELINES = [
    ("default (auto runtime, auto precision)", {"runtime": "auto", "precision": "auto"}, "best"),
    ("--precision fp32", {"runtime": "auto", "precision": "fp32"}, "best exact"),
    ("--runtime torch", {"runtime": "torch", "precision": "auto"}, "best torch"),
]


def bracket(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ceiling rows measured before and after the pipelines, as their means (the load may change in between)."""
    rows = []
    for b, a in zip(before, after):
        mean = {k: round((b[k] + a[k]) / 2, 4) for k in ("mpix_per_s", "cpu_s_per_mpix")}
        rows.append({**b, **mean, "mpix_per_s_before": b["mpix_per_s"], "mpix_per_s_after": a["mpix_per_s"]})
    return rows


def efficiency(tmp: Path, model_dir: Path, volume: Path, warm: Path, args: argparse.Namespace,
               configs: list[tuple[str, str, str, bool]] = CONFIGS,
               pipelines: list[tuple[str, dict[str, Any], str]] = PIPELINES) -> None:
    """The ceiling and the pipelines in one run: ratios side by side are what a busy machine can still compare.

    The ceiling is measured before and after the pipelines and averaged; each
    pipeline's ``ratio`` is its MPix/s over the fastest ceiling of its kind,
    ``cpu_ratio`` the same in CPU seconds per MPix (less sensitive to other
    jobs on the machine, blind to idle cores).
    """
    from n2v_chunked.cluster import cluster_client, local_layout

    before = ceiling(model_dir, args.tile, args.repeats, args.device, configs)
    frames = frames_for(args.efficiency_gb, args.frame)
    workers, threads = local_layout(None if args.device == "cpu" else args.device)  # predict's own layout
    pipes = []
    with (cluster_client("local", n_workers=args.workers or workers, threads_per_worker=threads)
          if args.scheduler == "local" else contextlib.nullcontext("threads")) as client:
        for label, options, against in pipelines:
            if args.pipelines and label.split(" ")[0] not in args.pipelines.split(","):
                continue
            if args.device != "cpu":
                options = {**options, "device": args.device}
            with GPUUtilisation(args.device) as gpu:
                pipe = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", client, warm, **options)
            if gpu.samples:
                pipe["gpu_utilisation_percent"] = round(float(np.mean(gpu.samples)), 1)
            pipes.append((label, against, pipe))
    rows = bracket(before, ceiling(model_dir, args.tile, args.repeats, args.device, configs))
    for r in rows:
        emit(measure="ceiling", tile=args.tile, **r)
    ceilings = {
        "best": max(rows, key=lambda r: r["mpix_per_s"]),
        "best exact": max((r for r in rows if r["exact"]), key=lambda r: r["mpix_per_s"]),
        "best torch": max((r for r in rows if r["runtime"].startswith("torch")), key=lambda r: r["mpix_per_s"]),
    }
    for label, against, pipe in pipes:
        top = ceilings[against]
        emit(measure="pipeline", options=label, frames=frames, **pipe, ceiling=against,
             ceiling_config=top["config"], ceiling_mpix_per_s=top["mpix_per_s"],
             ratio=round(pipe["mpix_per_s"] / top["mpix_per_s"], 3),
             cpu_ratio=round(top["cpu_s_per_mpix"] / pipe["cpu_s_per_mpix"], 3))


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
    from n2v_chunked.prediction import predict

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
    ap.add_argument("--tile", type=int, default=1024, help="side of the ceiling's in-memory tile (default 1024)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes per ceiling configuration, before and after the pipelines (default 3)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda[:N]: the ceiling in torch fp32/bf16/fp16 on the GPU, the pipeline "
                    "with --device, and the GPU's mean utilisation while it runs")
    ap.add_argument("--pipelines", help="comma-separated subset of default,--precision,--runtime (default: all)")
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
        args.tile, args.repeats = 128, 1
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

            volume = tmp / "eff.ome.zarr"
            frames = frames_for(args.efficiency_gb, args.frame)
            make_volume(volume, frames, args.frame)
            warm = tmp / "warm.ome.zarr"  # the same frame shape: every worker prepares the measured block shapes
            make_volume(warm, 2 * (args.workers or len(os.sched_getaffinity(0))), args.frame)
            if not args.skip_efficiency:
                efficiency(tmp, model_dir, volume, warm, args)
            if args.compare_schedulers:
                from n2v_chunked.cluster import scheduling

                for threads in (1, cores):
                    scheduling.LOCAL_DASK_THREADS = threads
                    r = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", "threads", warm)
                    emit(measure="scheduler", layout=f"threads: {threads} dask x {cores // threads} torch",
                         mpix_per_s=round(r["mpix_per_s"], 4))
                for workers in (1, cores):
                    with cluster_client("local", n_workers=workers, threads_per_worker=1) as client:
                        r = pipeline_rate(model_dir, volume, tmp / "out.ome.zarr", client, warm)
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
