"""Dihedral augmentation of a batch, on its device.

The paper augments by 90-degree rotations and flips in the YX plane; in 3D
the Z axis is also flipped.  Each patch gets one of the 8 YX symmetries (only
the 4 that keep the shape when Y and X differ), grouped per symmetry so the
work is 8 tensor operations per batch, not one per patch.
"""

from __future__ import annotations

import torch


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` (0..7) of the last two axes: rotate by ``k % 4`` quarter turns, flip if ``k >= 4``."""
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def augment_batch(x: torch.Tensor, generator: torch.Generator, keep_axes: bool = False) -> torch.Tensor:
    """Randomly rotate/flip each patch of ``x`` (``(B, C, *spatial)``).

    Parameters
    ----------
    x : torch.Tensor
        Batch with 2 or 3 spatial dims.
    generator : torch.Generator
        Random generator on ``x.device``.
    keep_axes : bool
        Only the 4 symmetries that map Y to Y and X to X (flips and the half
        turn), never a quarter turn.  structN2V needs this: its hidden line
        lies along a fixed axis, and noise correlated along X would lie along
        Y after a quarter turn, beside the line instead of on it.

    Returns
    -------
    torch.Tensor
        Augmented batch, same shape.
    """
    b = x.shape[0]
    square = x.shape[-1] == x.shape[-2]
    choices = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] if square and not keep_axes else [0, 2, 4, 6], device=x.device)
    k = choices[torch.randint(len(choices), (b,), generator=generator, device=x.device)]
    out = torch.empty_like(x)
    for sym in choices.tolist():
        sel = (k == sym).nonzero().squeeze(1)
        if len(sel):
            out[sel] = _dihedral(x[sel], sym)
    if x.ndim == 5:  # 3D: flip Z for half of the patches
        flip = (torch.rand(b, generator=generator, device=x.device) < 0.5).nonzero().squeeze(1)
        out[flip] = torch.flip(out[flip], dims=(2,))
    return out
