"""Multichannel data: one joint network for all channels vs one shared network per channel.

Builds a two-channel image from the bundled ``nuclei`` sample (channel 0) and
a synthetic channel of thin tubular structures, a mitochondria-like network
unrelated to the nuclei (channel 1), each with its own Poisson-Gaussian noise
(the demo's).  Per seed it trains

- ``independent`` for ``--steps`` steps (its time sets the budget),
- ``joint`` for the same steps, and
- ``joint`` for the same wall time (more steps: a joint step is cheaper),

and reports the PSNR of each channel against the clean image, and the bleed:
the correlation of a channel's error (denoised - clean) with the other
channel's clean image (structures of one channel showing, bright or dark, in
the other; 0 when nothing bleeds).

Prints one JSON line per run, then one summary line (means over seeds).

Examples
--------
python benchmarks/channels.py                        # 2 seeds x 3 runs of 30 steps, about 10 minutes on 2 busy cores
python benchmarks/channels.py --steps 400 --features 32 --patch 64 --batch-size 128 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tubes(shape: tuple[int, ...], seed: int, width: float = 0.08, smooth: float = 5.0) -> np.ndarray:
    """Thin tubular network: the zero crossings of smoothed noise, in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(1000 + seed).normal(size=shape), (1.0, smooth, smooth))
    field /= field.std()
    return np.exp(-((field / width) ** 2)).astype(np.float32)


def two_channel_sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy), both ``(c=2, z, y, x)`` float32: nuclei and tubes, noise drawn per channel."""
    import tifffile

    from n2v_chunked.cli.demo import add_noise, sample_path

    nuclei = tifffile.imread(sample_path("nuclei")).astype(np.float32)
    other = tubes(nuclei.shape, seed) * float(nuclei.max())
    clean = np.stack([nuclei, other])
    noisy = np.stack([add_noise(nuclei, 2 * seed), add_noise(other, 2 * seed + 1)])
    return clean, noisy


def scores(clean: np.ndarray, denoised: np.ndarray) -> dict:
    """PSNR per channel (each channel's own range) and the bleed of each channel into the other."""
    from skimage.metrics import peak_signal_noise_ratio

    psnr = [float(peak_signal_noise_ratio(c, d, data_range=float(np.ptp(c)))) for c, d in zip(clean, denoised)]
    bleed = [float(np.corrcoef((denoised[k] - clean[k]).ravel(), clean[1 - k].ravel())[0, 1]) for k in (0, 1)]
    return {"psnr": [round(v, 3) for v in psnr], "psnr_mean": round(float(np.mean(psnr)), 3),
            "bleed": [round(v, 4) for v in bleed]}


def run_one(clean: np.ndarray, noisy: np.ndarray, channels: str, steps: int, minutes: float,
            args: argparse.Namespace, seed: int, work: Path) -> dict:
    """Train one configuration, predict the whole image, score it."""
    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.prediction import predict
    from n2v_chunked.training.fit import fit

    model = work / f"{channels}-{seed}-{steps}-{minutes:.3f}"
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, patch_size=[args.patch, args.patch],
                      val_interval=max(1, steps // 4), checkpoint_interval=steps, time_budget=60.0 * minutes,
                      val_patches=args.val_patches, seed=seed)
    mcfg = ModelConfig(features=args.features, independent_channels=channels == "independent")
    result = fit(noisy, model, axes="czyx", dims=2, model_cfg=mcfg, train_cfg=cfg, progress=False)
    denoised = predict(noisy, None, model, axes="czyx", progress=False).values
    return {"benchmark": "channels", "channels": channels, "seed": seed, "steps": result.step,
            "train_seconds": round(result.seconds, 1), "batch_size": args.batch_size, "patch": args.patch,
            "features": args.features, **scores(clean, denoised),
            "psnr_noisy": scores(clean, noisy)["psnr"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="steps of the independent and equal-step joint runs (default 30)")
    p.add_argument("--batch-size", type=int, default=16, help="patches per step (default 16)")
    p.add_argument("--patch", type=int, default=48, help="patch side (default 48)")
    p.add_argument("--features", type=int, default=16, help="feature maps at the top level (default 16)")
    p.add_argument("--val-patches", type=int, default=32, help="validation patches (default 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    args = p.parse_args(argv)
    from n2v_chunked.errors import N2VError

    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="channels_") as tmp:
            for seed in args.seeds:
                clean, noisy = two_channel_sample(seed)
                # joint first: the one-off start-up costs of the process fall on the run that is not timed against
                joint = run_one(clean, noisy, "joint", args.steps, 0.0, args, seed, Path(tmp))
                ind = run_one(clean, noisy, "independent", args.steps, 0.0, args, seed, Path(tmp))
                # equal time: the joint network gets the independent run's wall time (and steps to spare)
                runs = [ind, joint, run_one(clean, noisy, "joint", 100 * args.steps, ind["train_seconds"] / 60.0,
                                            args, seed, Path(tmp))]
                ind["budget"], joint["budget"], runs[2]["budget"] = "reference", "equal_steps", "equal_time"
                for r in runs:
                    print(json.dumps(r), flush=True)
                rows += runs
    except N2VError as exc:  # a bad option is one line, not a traceback
        raise SystemExit(f"channels: {exc}") from None

    def mean(channels: str, budget: str, key: str, k: int) -> float:
        vals = [r[key][k] for r in rows if r["channels"] == channels and r["budget"] == budget]
        return round(float(np.mean(vals)), 3)

    summary = {"benchmark": "channels", "summary": True, "seeds": args.seeds, "steps": args.steps}
    for name, channels, budget in (("independent", "independent", "reference"),
                                   ("joint_equal_steps", "joint", "equal_steps"),
                                   ("joint_equal_time", "joint", "equal_time")):
        summary[name] = {"psnr": [mean(channels, budget, "psnr", k) for k in (0, 1)],
                         "bleed": [mean(channels, budget, "bleed", k) for k in (0, 1)]}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
