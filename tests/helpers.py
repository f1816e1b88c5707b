"""Small models and images shared by the prediction and reliability tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig
from n2v_chunked.training.masking import grid_cell
from n2v_chunked.model.unet import UNet


def make_model_dir(path, dims=2, channels=1, depth=2, features=4, n2v2=False, seed=0, blend=False,
                   independent_channels=True):
    """Random weights, batch norm in eval mode with non-trivial running statistics.

    ``blend=True`` also records a noise level and a validation MSE, as training
    does, so the model has a blend weight (0.3 to 0.5 across channels).
    ``independent_channels=False``: one network sees all channels (joint).
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(dims=dims, in_channels=channels, depth=depth, features=features, n2v2=n2v2,
                      independent_channels=independent_channels)
    net = UNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    mean, std = np.linspace(90, 110, channels), np.linspace(15, 25, channels)
    noise = std * np.sqrt(np.linspace(0.3, 0.5, channels)) if blend else None
    mask = MaskConfig(replacement="median" if n2v2 else "uniform")  # blend warns only for median-trained models
    meta = ckpt.write_config(path, cfg, mask, TrainConfig(), mean, std, noise_std=noise)
    if blend:  # noise variance / validation MSE, in normalised units: the weight
        meta["validation"] = {"best": {"step": 1, "mse": [1.0] * channels}}
        ckpt.write_meta(path, meta)
    ckpt.save_weights(path, net, ckpt.WEIGHTS_BEST)
    return Path(path)


def noisy(shape, seed=0, dtype=np.float32):
    """A smooth pattern around 100 with Gaussian noise (sigma 15)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    clean = 100 + 40 * np.sin(grids[-1] / 7.0) * np.cos(grids[-2] / 5.0)
    return (clean + rng.normal(0, 15, shape)).astype(dtype)


def bsd68_data() -> Path | None:
    """The folder holding Train400/ and BSD68/ (env N2V_DATA, else a ``shared/data`` above the repo)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(os.environ["N2V_DATA"])] if os.environ.get("N2V_DATA") else []
    candidates += [p / "shared" / "data" for p in (repo, *repo.parents)]
    for c in candidates:
        if (c / "Train400").is_dir() and (c / "BSD68").is_dir() and any((c / "BSD68").glob("*.png")):
            return c
    return None


def run_benchmark(script: str, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``benchmarks/<script>`` from the repository root; return the process and its JSON lines."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=repo, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# Reference formulas the tests check the library against.


def forward_flops(cfg: ModelConfig, spatial: tuple[int, ...]) -> float:
    """Approximate multiply-add FLOPs (x2) of one forward pass on one patch."""
    k = cfg.kernel_size**cfg.dims
    f = cfg.features
    cin = 1 if cfg.independent_channels else cfg.in_channels
    pixels = math.prod(spatial)
    total = 0.0
    c = cin
    for level in range(cfg.depth):
        px = pixels / (2**cfg.dims) ** level
        co = f * 2**level
        total += px * k * (c * co + co * co)
        c = co
    px = pixels / (2**cfg.dims) ** cfg.depth
    co = f * 2**cfg.depth
    total += px * k * (c * co + co * co)
    c = co
    for level in reversed(range(cfg.depth)):
        px = pixels / (2**cfg.dims) ** level
        co = f * 2**level
        skip = 0 if (cfg.n2v2 and level == 0) else co
        total += px * k * ((c + skip) * co + co * co)
        c = co
    return 2.0 * total


def expected_count(shape: tuple[int, ...], cfg: MaskConfig) -> int:
    """Number of chosen pixels per patch and channel for a patch of ``shape``."""
    cell = grid_cell(cfg.density, len(shape))
    return math.prod(math.ceil(s / min(cell, s)) for s in shape)


def normalize(x: Any, mean: np.ndarray, std: np.ndarray, channel_axis: int = 1) -> Any:
    """``(x - mean) / std`` per channel, for numpy arrays or torch tensors."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    m, s = _like(x, mean).reshape(shape), _like(x, std).reshape(shape)
    return (x - m) / s


def denormalize(x: Any, mean: np.ndarray, std: np.ndarray, channel_axis: int = 1) -> Any:
    """Inverse of :func:`normalize`."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    m, s = _like(x, mean).reshape(shape), _like(x, std).reshape(shape)
    return x * s + m


def _like(x: Any, v: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return np.asarray(v, dtype=x.dtype if x.dtype.kind == "f" else np.float32)
    return torch.as_tensor(np.asarray(v), dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
