"""Normalising a collection per image or over the collection: which denoises better (issue 26).

Real noise, no ground truth: the paxillin time-lapse frames of the shared
data (``microscopy/paxillin_2d/test``, 512 x 512 uint16) become a folder of
images, frame ``k`` scaled by its own gain and offset (``--gains``, spread
log-evenly, and offsets from 0 to ``--max-offset``), as a screen's wells
imaged at different exposures and camera baselines are.  One model is trained
on the folder per mode (``normalize_per="collection"`` and ``"image"``; same
seed, steps and network), each frame is denoised as the mode prescribes (the
model's statistics, or the frame's own: ``predict --normalize data``), and the
no-reference measure of ``n2v-chunked demo`` is reported: the mean Pearson
correlation of consecutive frames, which rises as independent noise is
removed (it is blind to the gains, which differ from frame to frame).  Prints
one JSON line per mode and one for the noisy frames.

Usage::

    python benchmarks/collection_normalization.py                       # 12 frames, gains 0.1-10, 300 steps
    python benchmarks/collection_normalization.py --frames 3 --steps 2 --features 4   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DATA = Path(os.environ.get("N2V_DATA", HERE.parent.parent / "shared" / "data")) / "microscopy" / "paxillin_2d" / "test"


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def frames(folder: Path, n: int) -> list[np.ndarray]:
    """The first ``n`` frames in time order (``frame_1``, ``frame_2``, ...)."""
    import tifffile

    paths = sorted(folder.glob("frame_*.tif"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    if len(paths) < n:
        raise SystemExit(f"collection_normalization: {folder} holds {len(paths)} frames, fewer than {n}")
    return [tifffile.imread(p).astype(np.float32) for p in paths[:n]]


def neighbour_correlation(stack: list[np.ndarray]) -> float:
    """Mean Pearson correlation of consecutive frames (the demo's measure)."""
    return float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(stack[:-1], stack[1:])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder of frame_N.tif")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--gains", type=float, nargs=2, default=[0.1, 10.0], help="smallest and largest gain")
    ap.add_argument("--max-offset", type=float, default=2000.0, help="largest offset added (default 2000)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import tifffile

    import n2v_chunked
    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.model.normalization import channel_stats

    raw = frames(args.data, args.frames)
    gains = np.geomspace(args.gains[0], args.gains[1], args.frames)
    offsets = np.linspace(0.0, args.max_offset, args.frames)
    order = np.random.default_rng(args.seed).permutation(args.frames)  # gain unrelated to time
    scaled = [f * gains[order[k]] + offsets[order[k]] for k, f in enumerate(raw)]
    emit(measure="setup", frames=args.frames, gains=[round(float(g), 3) for g in gains[order]],
         offsets=[round(float(o), 1) for o in offsets[order]], steps=args.steps, batch_size=args.batch_size,
         patch=args.patch, features=args.features, seed=args.seed, load_average=os.getloadavg()[0])
    emit(measure="noisy", frame_correlation=round(neighbour_correlation(scaled), 4))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "frames"
        folder.mkdir()
        for k, f in enumerate(scaled):
            tifffile.imwrite(folder / f"frame_{k:02d}.tif", f)
        for mode in ("collection", "image"):
            model = Path(tmp) / f"model-{mode}"
            t = time.perf_counter()
            res = n2v_chunked.fit(str(folder), model, normalize_per=mode, model_cfg=ModelConfig(features=args.features),
                                  train_cfg=TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                                        patch_size=[args.patch, args.patch], seed=args.seed,
                                                        val_interval=max(1, args.steps // 4)),
                                  progress=False)
            seconds = time.perf_counter() - t
            trained = n2v_chunked.load_model(model)
            denoised = []
            for f in scaled:
                use = trained
                if mode == "image":  # the frame's own statistics, as `predict --normalize data`
                    mean, std = channel_stats(f, ("y", "x"))
                    use = dataclasses.replace(trained, mean=mean.astype(np.float32), std=std.astype(np.float32))
                denoised.append(n2v_chunked.denoise(use, f[None, None])[0, 0])
            emit(measure="denoised", normalize_per=mode, frame_correlation=round(neighbour_correlation(denoised), 4),
                 steps=res.step, best_val_loss=round(res.best_val_loss, 5), train_seconds=round(seconds, 1))


if __name__ == "__main__":
    main()
