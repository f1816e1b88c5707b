"""The N2V paper's natural-image benchmark: BSD68 with Gaussian noise, sigma 25.

Protocol (Krull et al. 2019, Section 4.1): add zero-mean Gaussian noise with
sigma 25 (0..255 scale) with a fixed seed; train on the noisy Train400 images
only; denoise the noisy BSD68 test images; report the mean PSNR against the
clean images (data range 255, no clipping).

Prints one JSON line: PSNR (the network's prediction, and blended with the
noisy input by the model's noise-aware weight; with ``--ema``, the default,
also the last step's own weights beside their running average), the weight of
each pixel's own value in its prediction (``centre_weight``), steps, train
seconds, patches/s, predict MPix/s.

Examples
--------
python benchmarks/bsd68.py --steps 100                  # the 100-step figure
python benchmarks/bsd68.py --steps 100 --paper          # the paper's settings (train --paper)
python benchmarks/bsd68.py --minutes 15 --steps 100000 --model-dir m  # the 15-minute figure
python benchmarks/bsd68.py --minutes 45 --steps 100000 --model-dir m --resume  # 60 minutes in all
python benchmarks/bsd68.py --steps 200000 --features 96 # the paper's full run (GPU)
python benchmarks/bsd68.py --device cuda --minutes 5 --steps 1000000 --paper --train-ceiling  # loop vs bare step
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_pngs(folder: Path, limit: int | None = None) -> list[np.ndarray]:
    """Grey PNGs of a folder, sorted by name, as float32 on the 0..255 scale."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:limit]
    if not files:
        raise SystemExit(f"bsd68: no PNG images in {folder}")
    return [np.asarray(Image.open(f).convert("L"), dtype=np.float32) for f in files]


def add_gaussian_noise(images: list[np.ndarray], sigma: float, seed: int) -> list[np.ndarray]:
    """The paper's noise: zero-mean Gaussian, ``sigma`` on the 0..255 scale, not clipped."""
    rng = np.random.default_rng(seed)
    return [(im + rng.normal(0.0, sigma, im.shape)).astype(np.float32) for im in images]


def mean_psnr(clean: list[np.ndarray], restored: list[np.ndarray]) -> float:
    """Mean PSNR in dB with data range 255, as in the paper."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(np.mean([peak_signal_noise_ratio(c, r, data_range=255) for c, r in zip(clean, restored)]))


def centre_weight(trained, images: list[np.ndarray], delta: float = 10.0) -> float:
    """How much of a pixel's own value reaches its own output: mean d out_i / d in_i.

    ``delta`` is added to single pixels spaced more than the receptive field
    apart, so each output change comes from one pixel only.  About 0 for a
    blind-spot network; 1 for the identity.
    """
    from n2v_chunked.engine.inference import denoise
    from n2v_chunked.model.unet import halo_width

    r = max(halo_width(trained.config))
    gains = []
    for im in images:
        bump = np.zeros_like(im)
        bump[r : im.shape[0] - r : 2 * r + 1, r : im.shape[1] - r : 2 * r + 1] = delta
        a = denoise(trained, im[None, None], precision="fp32")[0, 0]
        b = denoise(trained, (im + bump)[None, None], precision="fp32")[0, 0]
        gains.append((b - a)[bump > 0] / delta)
    return float(np.mean(np.concatenate(gains)))


# (name, channels-last, autocast bf16): the bare train step's candidates for the ceiling
STEP_CONFIGS = [("fp32 NCHW", False, False), ("fp32 channels-last", True, False), ("bf16 channels-last", True, True)]


def train_step_ceiling(args: argparse.Namespace, steps: int = 5) -> dict[str, float]:
    """Patches/s of the bare train step (mask, forward, masked loss, backward, Adam) on one fixed batch.

    No sampler, augmentation, validation or checkpoints: what the network
    alone allows, per layout and precision, on ``args.device`` (the batch
    already there); the loop's patches/s over the best of these is the
    training ratio (a regression in the loop shows up there).  Timed over
    ``steps`` steps after one warm-up step (cuDNN autotuning), one wait for
    the device at the end: a GPU's queue stays full, as in the loop.
    ``args.compile`` adds the best candidate through ``torch.compile``.
    """
    import torch

    from n2v_chunked.model.config import MaskConfig, ModelConfig
    from n2v_chunked.training.masking import mask_batch, masked_mse
    from n2v_chunked.model.unet import UNet

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out = {}
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.patch, args.patch, generator=gen, device=device)
    configs = [(name, cl, bf16, False) for name, cl, bf16 in STEP_CONFIGS]
    if args.compile:
        configs.append(("bf16 channels-last compiled", True, True, True))
    for name, channels_last, bf16, compiled in configs:
        torch.manual_seed(0)
        net = UNet(ModelConfig(depth=args.depth, features=args.features, n2v2=args.n2v2)).to(device).train()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        step_net = torch.compile(net) if compiled else net
        warmup = 3 if compiled else 1  # compiled: the forward and backward graphs, then a steady step
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            masked = mask_batch(x, MaskConfig(density=args.mask_density), gen)  # resolved by main()
            inp = masked.inputs.contiguous(memory_format=torch.channels_last) if channels_last else masked.inputs
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = step_net(inp)
            loss = masked_mse(pred, masked)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        out[name] = round(args.batch_size * steps / (time.perf_counter() - t0), 1)
    return out


def run(args: argparse.Namespace) -> dict:
    """Train on noisy Train400, evaluate on noisy BSD68; return the figures."""
    import torch

    from n2v_chunked.model import checkpoint as ckpt
    from n2v_chunked.model.checkpoint import load_model
    from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig
    from n2v_chunked.engine.inference import denoise
    from n2v_chunked.io.sources import open_image
    from n2v_chunked.training.fit import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    train_clean = load_pngs(data / "Train400", args.n_train)
    test_clean = load_pngs(data / "BSD68", args.n_test)
    # one generator for both sets, training first: the noise is fixed by the seed
    noisy = add_gaussian_noise(train_clean + test_clean, args.sigma, args.seed)
    train_noisy = np.stack(noisy[: len(train_clean)])  # (400, 180, 180): axes t, y, x
    test_noisy = noisy[len(train_clean):]

    work = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="bsd68_"))
    if args.resume and not (args.model_dir and work.exists()):
        raise SystemExit("bsd68: --resume needs the --model-dir of an earlier run")
    if work.exists() and not args.model_dir:
        shutil.rmtree(work)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, patch_size=[args.patch, args.patch],
        time_budget=60.0 * args.minutes, val_interval=args.val_interval, precision=args.precision,
        checkpoint_interval=max(args.val_interval, 100), seed=args.seed,
        schedule=args.schedule, warmup=args.warmup, compile=args.compile,
        stop_patience=args.stop_patience, ema=args.ema,
    )
    # one image per chunk: blocks of whole images, some held out for validation
    source = open_image(train_noisy, axes="tyx", chunks={"t": 1})
    result = fit(
        source, work, dims=2,
        model_cfg=ModelConfig(depth=args.depth, features=args.features, n2v2=args.n2v2),
        mask_cfg=MaskConfig(density=args.mask_density, replacement=args.replacement),
        train_cfg=cfg, progress=not args.quiet, device=args.device, resume=args.resume,
    )
    trained = load_model(work, device=args.device, which=args.weights)
    start = time.perf_counter()
    kw = dict(precision=args.predict_precision, runtime=args.predict_runtime, tta=args.tta)
    restored = [denoise(trained, im[None, None], **kw)[0, 0] for im in test_noisy]
    predict_s = time.perf_counter() - start
    blended = [denoise(trained, im[None, None], blend=True, **kw)[0, 0] for im in test_noisy]
    pixels = sum(im.size for im in test_noisy)
    # with --ema the saved weights are the running average: the last step's own weights, side by side
    state = ckpt.load_training_state(work)
    psnr_raw = None
    if state.get("ema") is not None:
        raw = load_model(work, device=args.device, which=args.weights)
        raw.model.load_state_dict(state["model"])
        psnr_raw = round(mean_psnr(test_clean, [denoise(raw, im[None, None], **kw)[0, 0] for im in test_noisy]), 3)
    out = {
        "benchmark": "bsd68",
        "sigma": args.sigma,
        "psnr": round(mean_psnr(test_clean, restored), 3),
        "psnr_blend": round(mean_psnr(test_clean, blended), 3),
        "psnr_last_step_weights": psnr_raw,  # None without --ema: then they are the weights scored
        "blend_weight": round(float(trained.blend_weight[0]), 4),
        "centre_weight": round(centre_weight(trained, test_noisy[:10]), 4),
        "noise_std_estimate": round(float(trained.meta["normalization"]["noise_std"][0]), 3),
        "psnr_noisy_input": round(mean_psnr(test_clean, test_noisy), 3),
        "steps": result.step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "features": args.features,
        "mask_density": args.mask_density,
        "n2v2": args.n2v2,
        "replacement": args.replacement,
        "precision": args.precision,
        "train_seconds": round(result.seconds, 1),  # of this run: a --resume run adds to the earlier one's
        "resumed": args.resume,
        "patches_per_second": round(result.patches_per_second, 1),
        "predict_mpix_per_second": round(pixels / predict_s / 1e6, 3),
        "weights": args.weights,
        "tta": args.tta,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "compile": args.compile,
        "ema": args.ema,
    }
    if args.train_ceiling:
        ceiling = train_step_ceiling(args)
        best = max(ceiling, key=ceiling.get)
        out.update(train_step_patches_per_second=ceiling, train_ceiling=best,
                   train_ratio=round(result.patches_per_second / ceiling[best], 3))
    if not args.model_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with Train400/ and BSD68/")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--minutes", type=float, default=0.0, help="training time budget (0: none)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, help="Adam learning rate (default: train's)")
    p.add_argument("--schedule", default="plateau", choices=["plateau", "cosine"],
                   help="learning-rate schedule (default: the paper's plateau halving)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the budget for --schedule cosine")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--n2v2", action="store_true", help="N2V2: no top skip, blur-pool, median replacement")
    p.add_argument("--mask-density", type=float, help="masked fraction (default: train's)")
    p.add_argument("--replacement", choices=["uniform", "median"],
                   help="masked pixel's value (default: N2V2's median; uniform is the paper's)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings where train's defaults differ (as train --paper)")
    p.add_argument("--stop-patience", type=int, help="validations without improvement before an early stop")
    p.add_argument("--ema", type=float, help="decay of the weights' running average (default: train's; 0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--predict-precision", default="fp32", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--predict-runtime", default="torch", choices=["auto", "torch", "openvino", "onnxruntime"])
    p.add_argument("--tta", action="store_true", help="predict with the 8 rotations/flips averaged")
    p.add_argument("--val-interval", type=int, default=100, help="steps between validations (default: train's 100)")
    p.add_argument("--weights", default="last", choices=["best", "last"])
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, help="use only the first N training images")
    p.add_argument("--n-test", type=int, help="evaluate only the first N test images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-dir", help="keep the model here (default: a temporary directory)")
    p.add_argument("--resume", action="store_true",
                   help="continue the model in --model-dir for --minutes/--steps more (the same noise: same --seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--train-ceiling", action="store_true",
                   help="also time the bare train step per layout/precision; report the loop's ratio to the best")
    p.add_argument("--device", help="torch device of training and prediction (default: cuda when available, else cpu)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile (opt-in; also a compiled ceiling)")
    args = p.parse_args(argv)
    from n2v_chunked.model.config import MaskConfig, TrainConfig, chosen
    from n2v_chunked.errors import N2VError

    # train's defaults, or the paper's under --paper; an option given explicitly wins
    for name, default in [("lr", TrainConfig.lr), ("mask_density", MaskConfig.density),
                          ("replacement", MaskConfig.replacement), ("stop_patience", TrainConfig.stop_patience),
                          ("ema", TrainConfig.ema)]:
        setattr(args, name, chosen(name, getattr(args, name), args.paper, default))

    try:
        out = run(args)
    except N2VError as exc:  # a bad option (e.g. --mask-density 0.7) is one line, not a traceback
        raise SystemExit(f"bsd68: {exc}") from None
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
