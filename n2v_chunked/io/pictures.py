"""Pictures for people: two images side by side as an 8-bit PNG, written atomically.

Used by training's ``preview.png`` (:mod:`n2v_chunked.training.plots`) and by
``predict --preview`` (:mod:`n2v_chunked.prediction.preview`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Gap between the two panels of a picture, in pixels (white).
GAP = 4


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename: a reader never sees half a picture."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
