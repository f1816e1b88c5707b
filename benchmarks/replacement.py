"""The blind-spot value, side by side: the paper's random neighbour vs N2V2's median.

Trains the same network twice on the bundled ``nuclei`` sample with the demo's
Poisson-Gaussian noise (same seed, same steps), once per replacement, and
reports the PSNR of each against the clean image, with and without
``--blend``.  For BSD68, run ``bsd68.py`` with ``--replacement median``.

Prints one JSON line per replacement, then one with the difference.

Examples
--------
python benchmarks/replacement.py               # 200 steps each
python benchmarks/replacement.py --steps 400 --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_one(noisy: np.ndarray, clean: np.ndarray, replacement: str, args: argparse.Namespace, work: Path) -> dict:
    """Train with one replacement, predict, and score against ``clean``."""
    from skimage.metrics import peak_signal_noise_ratio

    from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig
    from n2v_chunked.prediction import predict
    from n2v_chunked.training.fit import fit

    model = work / replacement
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, val_interval=25, checkpoint_interval=100,
                      seed=args.seed)
    model_cfg = ModelConfig() if args.features is None else ModelConfig(features=args.features)
    result = fit(noisy, model, axes="zyx", dims=2, train_cfg=cfg, mask_cfg=MaskConfig(replacement=replacement),
                 model_cfg=model_cfg, progress=False)
    start = time.perf_counter()
    denoised = predict(noisy, None, model, axes="zyx").values.reshape(noisy.shape)
    predict_s = time.perf_counter() - start
    blended = predict(noisy, None, model, axes="zyx", blend=True).values.reshape(noisy.shape)
    data_range = float(clean.max() - clean.min())
    return {
        "benchmark": "replacement",
        "sample": "nuclei",
        "replacement": replacement,
        "steps": result.step,
        "batch_size": args.batch_size,
        "features": ModelConfig().features if args.features is None else args.features,
        "seed": args.seed,
        "psnr_noisy": round(float(peak_signal_noise_ratio(clean, noisy, data_range=data_range)), 3),
        "psnr": round(float(peak_signal_noise_ratio(clean, denoised, data_range=data_range)), 3),
        "psnr_blend": round(float(peak_signal_noise_ratio(clean, blended, data_range=data_range)), 3),
        "train_seconds": round(result.seconds, 1),
        "patches_per_second": round(result.patches_per_second, 1),
        "predict_seconds": round(predict_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per replacement (default 200)")
    p.add_argument("--batch-size", type=int, default=128, help="patches per step (default: the paper's 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, weights, patches and masks")
    p.add_argument("--features", type=int, help="first-level width (default: the product's)")
    args = p.parse_args(argv)
    import tifffile

    from n2v_chunked.cli.demo import add_noise, sample_path
    from n2v_chunked.errors import N2VError

    clean = tifffile.imread(sample_path("nuclei")).astype(np.float32)
    noisy = add_noise(clean, args.seed)
    rows = {}
    try:
        with tempfile.TemporaryDirectory(prefix="replacement_") as tmp:
            for replacement in ("uniform", "median"):
                rows[replacement] = run_one(noisy, clean, replacement, args, Path(tmp))
                print(json.dumps(rows[replacement]), flush=True)
    except N2VError as exc:  # a bad option is one line, not a traceback
        raise SystemExit(f"replacement: {exc}") from None
    print(json.dumps({"benchmark": "replacement", "sample": "nuclei",
                      "median_minus_uniform_db": round(rows["median"]["psnr"] - rows["uniform"]["psnr"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
