"""Quality of every runtime and precision against PyTorch fp32: the bar for the default precision.

The default precision must be indistinguishable from fp32: PSNR against the
ground truth within 0.05 dB of PyTorch fp32 (issue 15).  Two data sets:

* ``bsd68``: a model trained by ``bsd68.py`` (``--steps``, 100 by default, or
  ``--bsd68-model`` to reuse one), scored on the 68 noisy test images (sigma 25,
  the paper's protocol and noise seed);
* ``nuclei``: the bundled sample with the demo's Poisson-Gaussian noise, a
  model trained for ``--steps`` on it, scored against the clean image.

Prints one JSON line per data set, runtime and precision: the PSNR, its
difference to PyTorch fp32 (``delta_db``), the largest pixel difference to
PyTorch fp32 as a fraction of the data range, and ``passes`` (|delta| < 0.05).

Examples
--------
python benchmarks/precision.py                      # 100-step models, both data sets
python benchmarks/precision.py --bsd68-model m100   # reuse a bsd68.py --model-dir
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BAR_DB = 0.05
COMBOS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def bsd68_images(data: Path, sigma: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Clean and noisy BSD68 test images, with exactly the noise ``bsd68.py`` draws (training set first)."""
    from bsd68 import add_gaussian_noise, load_pngs

    train = load_pngs(data / "Train400")
    test = load_pngs(data / "BSD68")
    noisy = add_gaussian_noise(train + test, sigma, seed)
    return [c[None, None] for c in test], [n[None, None] for n in noisy[len(train):]]


def train_bsd68(data: Path, steps: int, model_dir: Path) -> None:
    subprocess.run([sys.executable, str(HERE / "bsd68.py"), "--data", str(data), "--steps", str(steps),
                    "--model-dir", str(model_dir), "--n-test", "1", "--quiet"], check=True, stdout=subprocess.DEVNULL)


def train_nuclei(noisy: np.ndarray, steps: int, batch_size: int, model_dir: Path, features: int | None = None) -> None:
    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.training.fit import fit

    cfg = TrainConfig(steps=steps, batch_size=batch_size, val_interval=25, checkpoint_interval=100, seed=0)
    model_cfg = ModelConfig() if features is None else ModelConfig(features=features)
    fit(noisy, model_dir, axes="zyx", dims=2, train_cfg=cfg, model_cfg=model_cfg, progress=False)


def score(name: str, model_dir: Path, clean: list[np.ndarray], noisy: list[np.ndarray], data_range: float,
          weights: str) -> None:
    """PSNR of every runtime/precision, and each one's difference to PyTorch fp32.

    ``clean`` and ``noisy`` hold ``(N, 1, y, x)`` arrays; the PSNR is the mean over them.
    """
    from skimage.metrics import peak_signal_noise_ratio

    from n2v_chunked.model.checkpoint import load_model
    from n2v_chunked.engine.inference import denoise
    from n2v_chunked.engine.runtimes import can_run, installed

    trained = load_model(model_dir, which=weights)
    ref = None
    for runtime, precision in COMBOS:
        if not installed(runtime):
            continue
        if not can_run(runtime, precision):  # e.g. OpenVINO bf16 on a CPU without it: refused, so not scored
            print(json.dumps({"benchmark": "precision", "data": name, "runtime": runtime, "precision": precision,
                              "skipped": "this CPU does not run it natively"}), flush=True)
            continue
        out = [denoise(trained, im, precision=precision, runtime=runtime) for im in noisy]
        psnr = float(np.mean([peak_signal_noise_ratio(c, o, data_range=data_range) for c, o in zip(clean, out)]))
        if ref is None:  # torch fp32 comes first
            ref = (psnr, out)
        delta = psnr - ref[0]
        diff = max(float(np.abs(o - r).max()) for o, r in zip(out, ref[1])) / data_range
        print(json.dumps({"benchmark": "precision", "data": name, "runtime": runtime, "precision": precision,
                          "psnr": round(psnr, 4), "delta_db": round(delta, 4), "max_diff_of_range": round(diff, 6),
                          "passes": abs(delta) < BAR_DB}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bsd68 import DEFAULT_DATA

    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with Train400/ and BSD68/")
    p.add_argument("--steps", type=int, default=100, help="training steps of each model (default 100)")
    p.add_argument("--batch-size", type=int, default=128, help="patches per step of the nuclei model (default 128)")
    p.add_argument("--bsd68-model", help="a bsd68.py --model-dir to score instead of training one")
    p.add_argument("--skip", choices=["bsd68", "nuclei"], help="leave one data set out")
    p.add_argument("--features", type=int, help="first-level width of the nuclei model (default: the product's)")
    args = p.parse_args(argv)
    import tifffile

    from n2v_chunked.cli.demo import add_noise, sample_path

    with tempfile.TemporaryDirectory(prefix="precision_") as tmp:
        if args.skip != "bsd68":
            model = Path(args.bsd68_model) if args.bsd68_model else Path(tmp) / "bsd68"
            if not args.bsd68_model:
                train_bsd68(Path(args.data), args.steps, model)
            clean, noisy = bsd68_images(Path(args.data), 25.0, 0)
            score("bsd68", model, clean, noisy, 255.0, "last")  # bsd68.py's defaults: sigma 25, seed 0, last
        if args.skip != "nuclei":
            clean = tifffile.imread(sample_path("nuclei")).astype(np.float32)
            noisy = add_noise(clean, 0)
            train_nuclei(noisy, args.steps, args.batch_size, Path(tmp) / "nuclei", args.features)
            score("nuclei", Path(tmp) / "nuclei", [clean[:, None]], [noisy[:, None]], float(clean.max() - clean.min()),
                  "best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
