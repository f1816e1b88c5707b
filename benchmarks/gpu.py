"""Prediction and training on one GPU against their bare-network ceilings (issue 15), as JSON lines.

One command on a GPU machine (expected to take about 5 minutes on one H200
and under 10 on smaller GPUs; not run yet, no GPU in the session that wrote it)::

    python benchmarks/gpu.py

Rows (``measure``):

* ``setup``: the device, torch and CUDA versions;
* ``ceiling``: MPix/s of the bare network on one ``--tile`` x ``--tile``
  tile resident on the GPU (no copies, no I/O) in torch fp32 NCHW,
  channels-last fp32, bf16 and fp16 (``benchmarks/predict.py``'s ceiling);
* ``pipeline``: ``predict`` reading and writing OME-Zarr on the GPU with the
  CLI's defaults (``auto``/``auto``), with ``--precision fp32`` and with
  ``--runtime torch``, in the CLI's local layout (one worker process per GPU,
  the cores as its threads): MPix/s, mean GPU utilisation
  (``gpu_utilisation_percent``) and the ratio to the matching ceiling;
* ``train_ceiling``: patches/s of the bare train step (mask, forward, masked
  loss, backward, Adam; ``benchmarks/bsd68.py``'s) on one batch already on
  the GPU, per layout and precision, at ``--batch-size`` and 4 times it;
* ``train``: the whole training loop (``fit`` on a synthetic OME-Zarr stack:
  sampler, pinned hand-off, augmentation, masking, step, validation,
  checkpoints) at each of those batch sizes: patches/s, mean GPU utilisation
  and the ratio to the best bare step at the same batch size (target >= 0.7).

``--compile`` adds ``torch.compile`` (opt-in everywhere: minutes of
compiling) to both ceilings and runs; ``--device cpu --quick`` is the smoke
run of the test suite.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from predict import CONFIGS, PIPELINES, GPUUtilisation, efficiency, emit, frames_for, make_model, make_volume

COMPILED_CONFIG = ("torch channels-last bf16 compiled", "torch-compile", "bf16", False)
COMPILED_PIPELINE = ("--runtime torch-compile", {"runtime": "torch-compile", "precision": "auto"}, "best torch")


def train_rows(tmp: Path, args: argparse.Namespace) -> None:
    """The bare train step and the loop, side by side, at each batch size."""
    from bsd68 import train_step_ceiling

    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.training.fit import fit

    volume = tmp / "train.ome.zarr"
    make_volume(volume, frames_for(args.train_gb, args.frame), args.frame)
    for batch in (args.batch_size, 4 * args.batch_size):
        step = argparse.Namespace(batch_size=batch, patch=args.patch, depth=2, features=args.features, n2v2=False,
                                  lr=4e-4, mask_density=1 / 64, device=args.device, compile=args.compile)
        ceilings = train_step_ceiling(step, steps=args.ceiling_steps)
        emit(measure="train_ceiling", batch_size=batch, patches_per_second=ceilings)
        best = max(ceilings, key=ceilings.get)
        steps = max(1, args.train_steps * args.batch_size // batch)  # the same patches at every batch size
        cfg = TrainConfig(steps=steps, batch_size=batch, patch_size=[args.patch, args.patch], stop_patience=0,
                          compile=args.compile)
        with GPUUtilisation(args.device) as gpu:
            res = fit(str(volume), tmp / f"model-{batch}", dims=2, model_cfg=ModelConfig(features=args.features),
                      train_cfg=cfg, device=args.device, progress=False)
        rate = round(res.patches_per_second, 1)
        row = {"batch_size": batch, "steps": res.step, "seconds": round(res.seconds, 2), "patches_per_second": rate,
               "ceiling": best, "ceiling_patches_per_second": ceilings[best], "ratio": round(rate / ceilings[best], 3),
               "target": 0.7}
        if gpu.samples:
            row["gpu_utilisation_percent"] = round(float(np.mean(gpu.samples)), 1)
        emit(measure="train", **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for the smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds (CI, on a CPU)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile: ceilings, a pipeline, the loop")
    ap.add_argument("--features", type=int, default=32, help="U-Net width (default 32, the paper's)")
    ap.add_argument("--frame", type=int, default=2048, help="frame side of the synthetic stacks (default 2048)")
    ap.add_argument("--tile", type=int, default=2048, help="side of the prediction ceiling's tile (default 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per prediction ceiling (default 5)")
    ap.add_argument("--efficiency-gb", type=float, default=1.0, help="volume predicted per pipeline (default 1 GB)")
    ap.add_argument("--train-gb", type=float, default=0.5, help="volume the sampler streams from (default 0.5 GB)")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch; 4x is measured too (default 128)")
    ap.add_argument("--patch", type=int, default=64, help="training patch side (default 64)")
    ap.add_argument("--train-steps", type=int, default=2000,
                    help="steps of the training run at --batch-size, a quarter of them at 4x (default 2000)")
    ap.add_argument("--ceiling-steps", type=int, default=50, help="timed steps of each bare train step (default 50)")
    args = ap.parse_args()
    args.workers, args.pipelines, args.scheduler = None, None, "local"
    if args.quick:
        args.features, args.frame, args.tile, args.repeats = 4, 128, 128, 1
        args.efficiency_gb, args.train_gb, args.batch_size, args.patch = 0.0002, 0.0003, 4, 32
        args.train_steps, args.ceiling_steps, args.scheduler = 3, 2, "threads"
    import torch

    emit(measure="setup", device=args.device, torch=torch.__version__, cuda=torch.version.cuda,
         name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
         quick=args.quick, compile=args.compile, model=f"2D U-Net depth 2, {args.features} features")
    with tempfile.TemporaryDirectory(prefix="n2v-gpu-bench-") as tmpdir:
        tmp = Path(tmpdir)
        make_model(tmp / "model", features=args.features)
        make_volume(tmp / "eff.ome.zarr", frames_for(args.efficiency_gb, args.frame), args.frame)
        make_volume(tmp / "warm.ome.zarr", 2, min(args.frame, 256))
        efficiency(tmp, tmp / "model", tmp / "eff.ome.zarr", tmp / "warm.ome.zarr", args,
                   CONFIGS + [COMPILED_CONFIG] * args.compile, PIPELINES + [COMPILED_PIPELINE] * args.compile)
        train_rows(tmp, args)


if __name__ == "__main__":
    main()
