"""Training augmentation of a batch, on its device, by the dihedral group of the YX plane.

The paper augments by 90-degree rotations and flips in the YX plane; in 3D
the Z axis is also flipped.  Each patch gets one of the 8 YX symmetries (only
the 4 that keep the shape when Y and X differ), grouped per symmetry so the
work is 8 tensor operations per batch, not one per patch.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..engine.symmetry import dihedral


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
    # all 8, or the 4 that keep the axes (and the shape of a non-square patch)
    syms = range(0, 8, 1 if square and not keep_axes else 2)
    choices = torch.arange(syms.start, syms.stop, syms.step, device=x.device)  # no host-to-device copy
    k = choices[torch.randint(len(syms), (b,), generator=generator, device=x.device)]
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5 if x.ndim == 5 else None  # 3D: Z flips
    return (_by_index if x.device.type == "cpu" else _by_mask)(x, k, syms, flip)


def _by_index(x: torch.Tensor, k: torch.Tensor, choices: Iterable[int], flip: torch.Tensor | None) -> torch.Tensor:
    """Symmetry ``k[i]`` of patch ``i`` (and a Z flip where ``flip``), one group of patches per symmetry.

    The CPU's way: each patch is moved once.  Finding each group's patches
    makes the host wait for the device, once per symmetry.
    """
    out = torch.empty_like(x)
    for sym in choices:
        sel = (k == sym).nonzero().squeeze(1)
        if len(sel):
            out[sel] = dihedral(x[sel], sym)
    if flip is not None:
        sel = flip.nonzero().squeeze(1)
        out[sel] = torch.flip(out[sel], dims=(2,))
    return out


def _by_mask(x: torch.Tensor, k: torch.Tensor, choices: Iterable[int], flip: torch.Tensor | None) -> torch.Tensor:
    """What :func:`_by_index` computes, without a host wait: every symmetry of the whole batch, kept where chosen.

    A GPU's way: 8 passes over a batch cost microseconds there, a wait for
    the device costs the queue of work behind it.
    """
    pick = (-1,) + (1,) * (x.ndim - 1)
    out = x
    for sym in choices:
        if sym:
            out = torch.where((k == sym).view(pick), dihedral(x, sym), out)
    if flip is not None:
        out = torch.where(flip.view(pick), torch.flip(out, dims=(2,)), out)
    return out
