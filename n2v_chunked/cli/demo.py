"""``n2v-chunked demo``: the whole pipeline on the bundled sample data.

Trains for a couple of minutes, denoises with chunked prediction into an
OME-Zarr, and writes a side-by-side PNG (noisy | denoised).  With the
``nuclei`` sample, noise is added to a clean confocal crop so that the PSNR
against the ground truth can be printed.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputExistsError
from ..model.config import TrainConfig

SAMPLES = {
    # name: (file, axes, description)
    "paxillin": ("paxillin_tyx.tif", "tyx", "paxillin-GFP time-lapse, real EMCCD noise (no ground truth)"),
    "nuclei": ("nuclei_clean_zyx.tif", "zyx", "confocal nuclei with added Poisson-Gaussian noise (ground truth known)"),
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample image."""
    if name not in SAMPLES:
        raise ConfigError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
    return Path(str(files("n2v_chunked") / "data" / SAMPLES[name][0]))


def add_noise(clean: np.ndarray, seed: int = 0, photons: float = 20.0, read_sigma: float = 0.05) -> np.ndarray:
    """Poisson-Gaussian noise: about ``photons`` photons at the brightest pixel, plus read noise."""
    rng = np.random.default_rng(seed)
    scale = float(clean.max()) / photons
    shot = rng.poisson(np.clip(clean, 0, None) / scale) * scale
    return (shot + rng.normal(0, read_sigma * clean.max(), clean.shape)).astype(np.float32)


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def side_by_side_png(path: Path, noisy: np.ndarray, denoised: np.ndarray, clean: np.ndarray | None = None) -> None:
    """Write noisy | denoised (| ground truth) with one shared contrast stretch."""
    from PIL import Image

    lo, hi = np.percentile(denoised, [0.5, 99.8])
    panels = [noisy, denoised] + ([clean] if clean is not None else [])
    gap = np.full((noisy.shape[0], 8), 255, np.uint8)
    row = [_to_uint8(p, lo, hi) for p in panels]
    joined = np.concatenate([x for p in row for x in (p, gap)][:-1], axis=1)
    Image.fromarray(joined).save(path)


def neighbour_correlation(stack: np.ndarray) -> float:
    """Mean Pearson correlation of consecutive frames: rises as independent noise is removed."""
    cs = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(stack[:-1], stack[1:])]
    return float(np.mean(cs))


def run_demo(
    out: str | Path = "demo_output",
    *,
    sample: str = "paxillin",
    minutes: float = 2.0,
    steps: int = 400,
    seed: int = 0,
    overwrite: bool = False,
    scheduler: str | None = "local",
) -> dict[str, Any]:
    """Train on a bundled sample, denoise it chunk by chunk, write a PNG.

    Parameters
    ----------
    out : str or Path
        Output directory (model, OME-Zarr, PNG, summary.json).
    sample : {"paxillin", "nuclei"}
        Which bundled image.
    minutes : float
        Training time budget.
    steps : int
        Maximum training steps.
    seed : int
        Seed of noise, sampling and weights.
    overwrite : bool
        Replace an existing output directory.
    scheduler : str, optional
        Dask scheduler for prediction (``"local"`` starts a LocalCluster).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    import tifffile

    from ..prediction import predict
    from ..training.fit import fit

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output directory {out} exists and is not empty; pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    path = sample_path(sample)
    axes = SAMPLES[sample][1]
    clean = None
    print(f"sample: {SAMPLES[sample][2]} ({path.name})")
    if sample == "nuclei":
        clean = tifffile.imread(path).astype(np.float32)
        noisy_path = out / "noisy.tif"
        tifffile.imwrite(noisy_path, add_noise(clean, seed), imagej=True, metadata={"axes": "ZYX"})
        path = noisy_path
    cfg = TrainConfig(steps=steps, time_budget=60.0 * minutes, val_interval=25, checkpoint_interval=50, seed=seed)
    print(f"training for up to {minutes:g} min / {steps} steps ...")
    result = fit(path, out / "model", axes=axes, dims=2, train_cfg=cfg)
    print(f"trained {result.step} steps in {result.seconds:.0f} s ({result.patches_per_second:.0f} patches/s), "
          f"best validation loss {result.best_val_loss:.4f}")
    zarr_path = out / "denoised.ome.zarr"
    print("denoising chunk by chunk ...")
    predict(str(path), str(zarr_path), out / "model", axes=axes, overwrite=True, scheduler=scheduler)
    noisy = tifffile.imread(path).astype(np.float32)
    from ..io.sources import open_image

    denoised = np.asarray(open_image(str(zarr_path)).values, np.float32).reshape(noisy.shape)
    summary: dict[str, Any] = {
        "sample": sample,
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        "patches_per_second": round(result.patches_per_second, 1),
        "output": str(zarr_path),
        "png": str(out / "side_by_side.png"),
    }
    if clean is not None:
        from skimage.metrics import peak_signal_noise_ratio

        rng_ = float(clean.max() - clean.min())
        summary["psnr_noisy"] = round(float(peak_signal_noise_ratio(clean, noisy, data_range=rng_)), 2)
        summary["psnr_denoised"] = round(float(peak_signal_noise_ratio(clean, denoised, data_range=rng_)), 2)
        # the same prediction mixed with the noisy input by the model's noise-aware weight (--blend)
        blended = predict(str(path), None, out / "model", axes=axes, blend=True).values.reshape(noisy.shape)
        summary["psnr_blended"] = round(float(peak_signal_noise_ratio(clean, blended, data_range=rng_)), 2)
        print(f"PSNR against ground truth: noisy {summary['psnr_noisy']} dB -> denoised {summary['psnr_denoised']} dB "
              f"({summary['psnr_blended']} dB with --blend)")
    else:
        summary["frame_correlation_noisy"] = round(neighbour_correlation(noisy), 3)
        summary["frame_correlation_denoised"] = round(neighbour_correlation(denoised), 3)
        print(f"correlation of consecutive frames: noisy {summary['frame_correlation_noisy']} -> "
              f"denoised {summary['frame_correlation_denoised']}")
    mid = len(noisy) // 2
    side_by_side_png(out / "side_by_side.png", noisy[mid], denoised[mid], None if clean is None else clean[mid])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {zarr_path}, {out / 'side_by_side.png'} and {out / 'summary.json'}")
    return summary
