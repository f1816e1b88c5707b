"""Pictures of a run, for people who would rather look than read.

Training writes into the model directory, at every validation:

``training.png``
    training and validation loss (log scale) and the learning rate against steps;
``training.csv``
    the same numbers (step, loss, val_loss, lr, seconds);
``preview.png``
    one validation patch, noisy | prediction, with the same grey scale;

and with ``--tensorboard`` the same scalars and image as TensorBoard events in
``tensorboard/``.  ``predict --preview`` writes ``<output>.preview.png``: the
middle slice of the input and the output side by side.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import N2VError

log = logging.getLogger(__name__)

PLOT = "training.png"
CSV = "training.csv"
PREVIEW = "preview.png"
TENSORBOARD = "tensorboard"
FIELDS = ("step", "loss", "val_loss", "lr", "seconds")
#: Longest side of a prediction preview panel, in pixels (the plane is subsampled to it).
PREVIEW_PIXELS = 1024
#: Gap between the two panels of a preview, in pixels (white).
GAP = 4


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename: a reader never sees half a picture."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_history_csv(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> Path:
    """The validation history as CSV, one row per validation."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    _atomic(path, write)
    return path


def plot_history(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> Path:
    """Training and validation loss (log scale) above the learning rate, against steps (PNG)."""
    # a bare Figure draws with Agg and leaves pyplot's backend (a notebook's) alone
    from matplotlib.figure import Figure

    path = Path(path)
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 5.5), dpi=100, layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot(steps, [h["loss"] for h in history], "o-", ms=3, label="training loss (last batch)")
    ax.plot(steps, [h["val_loss"] for h in history], "s-", ms=3, label="validation loss")
    best = int(np.argmin([h["val_loss"] for h in history]))
    ax.plot(steps[best], history[best]["val_loss"], "*", ms=12, color="C1", label=f"best (step {steps[best]})")
    if all(h["loss"] > 0 and h["val_loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.set_ylabel("masked MSE (normalised)")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"training: {steps[-1]} steps, best validation loss {history[best]['val_loss']:.4g}")
    ax_lr.plot(steps, [h["lr"] for h in history], "-", color="C2")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def middle_slice(a: np.ndarray, dims: Sequence[str]) -> np.ndarray:
    """The 2D ``yx`` plane in the middle of every other axis (first channel)."""
    a = np.asarray(a)
    index = tuple(slice(None) if d in ("y", "x") else (0 if d == "c" else a.shape[i] // 2)
                  for i, d in enumerate(dims))
    return a[index]


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = GAP) -> np.ndarray:
    """Two 2D images as one 8-bit image, ``left | right``, on the left one's grey scale.

    The grey scale is the left (noisy) image's 0.5 to 99.5 percentiles, so a
    denoised image that lost contrast looks it, rather than being stretched back.
    """
    left, right = np.asarray(left, np.float64), np.asarray(right, np.float64)
    finite = left[np.isfinite(left)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 1.0

    def grey(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.nan_to_num((a - lo) * scale)), 0, 255).astype(np.uint8)

    out = np.full((left.shape[0], left.shape[1] + gap + right.shape[1]), 255, np.uint8)
    out[:, : left.shape[1]] = grey(left)
    out[: right.shape[0], left.shape[1] + gap:] = grey(right)
    return out


def write_side_by_side(path: str | os.PathLike[str], left: np.ndarray, right: np.ndarray,
                       min_size: int = 256) -> Path:
    """Save ``left | right`` (see :func:`side_by_side`) as PNG, enlarged (nearest) to at least ``min_size`` rows."""
    from PIL import Image

    path = Path(path)
    img = Image.fromarray(side_by_side(left, right))
    factor = max(1, -(-min_size // img.height))
    if factor > 1:  # a 64-pixel patch is too small to see
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    _atomic(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def structured_patch(patches: np.ndarray, pool: int = 4) -> int:
    """Index of the patch whose ``pool``-averaged first channel varies most.

    Averaging removes most pixel noise, so what is left is structure: the
    preview shows cells rather than empty background.
    """
    a = np.asarray(patches)[:, 0]
    crop = tuple(slice(0, s - s % pool) for s in a.shape[1:])
    a = a[(slice(None),) + crop]
    if any(s == 0 for s in a.shape[1:]):
        return 0
    shape = [a.shape[0]]
    for s in a.shape[1:]:
        shape += [s // pool, pool]
    pooled = a.reshape(shape).mean(axis=tuple(range(2, len(shape), 2)))
    return int(np.argmax(pooled.reshape(a.shape[0], -1).std(axis=1)))


def require_tensorboard() -> Any:
    """torch's ``SummaryWriter``, or one line saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise N2VError("--tensorboard needs the tensorboard package: pip install 'n2v-chunked[tensorboard]'") from None
    return SummaryWriter


class TrainingPictures:
    """The plot, CSV, preview and TensorBoard events of one training run.

    Parameters
    ----------
    model_dir : Path
        Where the pictures go.
    val_patches : torch.Tensor
        The normalised validation patches ``(V, C, *patch)`` on the model's device;
        the preview shows the one with the most structure (:func:`structured_patch`).
    tensorboard : bool
        Also write TensorBoard events (needs the ``tensorboard`` package).
    """

    def __init__(self, model_dir: Path, val_patches: Any, tensorboard: bool = False) -> None:
        self.model_dir = Path(model_dir)
        i = structured_patch(val_patches.float().cpu().numpy())
        self.patch = val_patches[i: i + 1]
        self.writer: Any = None
        if tensorboard:
            self.writer = require_tensorboard()(str(self.model_dir / TENSORBOARD))

    def update(self, history: Sequence[dict[str, Any]], model: Any) -> None:
        """Redraw everything after a validation; a failure is a warning, never the end of training."""
        try:
            write_history_csv(self.model_dir / CSV, history)
            plot_history(self.model_dir / PLOT, history)
            noisy, pred = self._preview(model)
            write_side_by_side(self.model_dir / PREVIEW, noisy, pred)
            if self.writer is not None:
                h = history[-1]
                for key in ("loss", "val_loss", "lr"):
                    self.writer.add_scalar(key, h[key], h["step"])
                self.writer.add_image("preview", side_by_side(noisy, pred), h["step"], dataformats="HW")
                self.writer.flush()
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("could not draw the training pictures in %s: %s", self.model_dir, exc)

    def _preview(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        was_training = model.training
        model.eval()  # no batch-norm statistics updated, no random numbers drawn: training is unchanged
        try:
            with torch.no_grad():
                pred = model(self.patch).float().cpu().numpy()[0]
        finally:
            model.train(was_training)
        noisy = self.patch.float().cpu().numpy()[0]
        dims = ("c",) + ("z", "y", "x")[-(noisy.ndim - 1):]
        return middle_slice(noisy, dims), middle_slice(pred, dims)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_predict_preview(output: str, source: Any, result: Any) -> Path | None:
    """``<output>.preview.png``: the middle slice of the input and of the denoised output.

    Only for a local output (a URL output has no folder "next to it"); reads
    one plane of each, so it costs one block's worth of memory.
    """
    if "://" in str(output):
        log.warning("--preview: %s is not a local path; no preview written", output)
        return None
    dims = tuple(result.dims)
    index: dict[str, Any] = {d: (0 if d == "c" else result.sizes[d] // 2) for d in dims if d not in ("y", "x")}
    step = max(1, -(-max(result.sizes["y"], result.sizes["x"]) // PREVIEW_PIXELS))  # small, whatever the image
    index.update(y=slice(None, None, step), x=slice(None, None, step))
    noisy = np.asarray(source.isel(index).values)
    denoised = np.asarray(result.isel(index).values)
    path = Path(str(output).rstrip("/") + ".preview.png")
    return write_side_by_side(path, noisy, denoised)
