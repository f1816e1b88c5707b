"""Validation of a training run: the masked MSE on fixed held-out patches, and early stopping.

The validation patches are masked once, with a fixed generator, so every
validation of a run (and of a resumed run) scores the same pixels.  The
training loop (:mod:`n2v_chunked.training.loop`) steps the plateau schedule, keeps
the best weights and stops early on what these functions return.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..engine.runtimes import autocast_context
from ..model.config import MaskConfig
from .masking import MaskedBatch, mask_batch


def validation_set(x: torch.Tensor, mask_cfg: MaskConfig, seed: int, device: torch.device) -> MaskedBatch:
    """Mask the fixed, normalised validation patches once, with a fixed generator."""
    g = torch.Generator(device=device).manual_seed(seed + 17)
    return mask_batch(x, mask_cfg, g)


@torch.no_grad()
def validate(model: torch.nn.Module, val: MaskedBatch, precision: str, batch: int) -> tuple[float, list[float]]:
    """Masked MSE on the validation set.

    Returns the MSE over every masked pixel (the validation loss), and per
    channel over the masked pixels at least a quarter patch from the patch
    border: those see image, not the network's zero padding, as every pixel
    does in prediction, so their error is the one the blend weight needs.
    """
    was_training = model.training
    model.eval()
    channels, spatial = val.inputs.shape[1], val.inputs.shape[2:]
    total, count = 0.0, 0
    inner = torch.zeros(channels, dtype=torch.float64)
    inner_count = torch.zeros(channels, dtype=torch.float64)
    device = val.inputs.device
    n = val.inputs.shape[0]
    bi = val.index[0]
    interior = torch.ones_like(bi, dtype=torch.bool)
    for pos, size in zip(val.index[2:], spatial):
        interior &= (pos >= size // 4) & (pos < size - size // 4)
    for start in range(0, n, batch):
        with autocast_context(device, precision):
            pred = model(val.inputs[start : start + batch])
        sel = (bi >= start) & (bi < start + batch)
        idx = (bi[sel] - start, *[i[sel] for i in val.index[1:]])
        sq = (pred[idx].float() - val.targets[sel].float()) ** 2
        total += float(sq.sum())
        count += int(sel.sum())
        keep = interior[sel]
        c = idx[1][keep].cpu()
        inner += torch.bincount(c, weights=sq[keep].double().cpu(), minlength=channels)
        inner_count += torch.bincount(c, minlength=channels).double()
    model.train(was_training)
    return total / max(count, 1), (inner / inner_count.clamp(min=1)).tolist()


def stalled(history: Sequence[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` validations all failed to beat the best one before them.

    Parameters
    ----------
    history : sequence of dict
        Validation records in order, each with a ``"val_loss"``.
    patience : int
        Validations without a new best that stop training; 0 never stops.

    Examples
    --------
    >>> stalled([{"val_loss": v} for v in (3.0, 2.0, 2.5, 2.1)], 2)
    True
    >>> stalled([{"val_loss": v} for v in (3.0, 2.0, 2.5, 1.9)], 2)
    False
    """
    if patience <= 0 or len(history) <= patience:
        return False
    before = min(h["val_loss"] for h in history[:-patience])
    return min(h["val_loss"] for h in history[-patience:]) >= before
