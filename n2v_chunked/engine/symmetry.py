"""The dihedral group of the YX plane: test-time augmentation's symmetries and their inverses.

Training augments with the same group (:mod:`n2v_chunked.training.augment`);
it lives here, in the engine, because prediction needs it and must not depend
on training.
"""

from __future__ import annotations

import torch


def dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """Symmetry ``k`` (0..7) of the last two axes: flip X if ``k >= 4``, then rotate by ``k % 4`` quarter turns.

    The one dihedral group of the package: training augments with it
    (:func:`n2v_chunked.training.augment.augment_batch`), test-time augmentation maps predictions back with
    ``inverse=True`` (:func:`n2v_chunked.engine.inference.run_network`).

    Examples
    --------
    >>> x = torch.arange(6).reshape(2, 3)
    >>> dihedral(x, 5)
    tensor([[0, 3],
            [1, 4],
            [2, 5]])
    >>> all(torch.equal(dihedral(dihedral(x, k), k, inverse=True), x) for k in range(8))
    True
    """
    if not inverse:
        x = torch.flip(x, dims=(-1,)) if k >= 4 else x
        return torch.rot90(x, k % 4, dims=(-2, -1))
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x
