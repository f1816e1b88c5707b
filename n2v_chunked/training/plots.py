"""Pictures of a training run, for people who would rather look than read.

Training writes into the model directory, at every validation:

``training.png``
    training and validation loss (log scale) and the learning rate against steps;
``training.csv``
    the same numbers (step, loss, val_loss, lr, seconds);
``preview.png``
    one validation patch, noisy | prediction, with the same grey scale;

and with ``--tensorboard`` the same scalars and image as TensorBoard events in
``tensorboard/``.  (``predict --preview`` is :mod:`n2v_chunked.prediction.preview`.)
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import N2VError
from ..io.pictures import atomic_write, middle_slice, side_by_side, write_side_by_side

log = logging.getLogger(__name__)

PLOT = "training.png"
CSV = "training.csv"
PREVIEW = "preview.png"
TENSORBOARD = "tensorboard"
FIELDS = ("step", "loss", "val_loss", "lr", "seconds")


def write_history_csv(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> Path:
    """The validation history as CSV, one row per validation."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    atomic_write(path, write)
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
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
