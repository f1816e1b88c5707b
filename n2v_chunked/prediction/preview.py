"""``predict --preview``: the middle slice of the input and of the denoised output, side by side."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..io.pictures import write_side_by_side

log = logging.getLogger(__name__)

#: Longest side of a prediction preview panel, in pixels (the plane is subsampled to it).
PREVIEW_PIXELS = 1024


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
