"""Border padding: how an image is extended beyond its edges.

One rule for the whole-image prediction (:func:`n2v_chunked.engine.inference.denoise`
pads the array) and the chunked one (:mod:`n2v_chunked.prediction.blocks` reads
the padded region of each batch from the source through :func:`pad_index`), so
that the two agree to float rounding.  Boundary modes carry dask's names; dask's
``reflect`` repeats the edge pixel, which is numpy's ``symmetric``.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import numpy as np

Boundary = Literal["reflect", "nearest", "periodic", "constant"]
BOUNDARIES: tuple[str, ...] = get_args(Boundary)

#: dask's boundary names -> ``numpy.pad`` modes
NUMPY_PAD_MODE = {"reflect": "symmetric", "nearest": "edge", "periodic": "wrap", "constant": "constant"}


def pad_border(x: np.ndarray, widths: Any, boundary: str, fill: Any = 0) -> np.ndarray:
    """``numpy.pad`` of ``x`` by ``widths`` with the ``boundary`` mode (dask's name); ``fill`` for ``constant``.

    Examples
    --------
    >>> pad_border(np.array([1, 2, 3]), 2, "reflect")
    array([2, 1, 1, 2, 3, 3, 2])
    >>> pad_border(np.array([1, 2, 3]), 1, "constant", fill=-1)
    array([-1,  1,  2,  3, -1])
    """
    kw = {"constant_values": fill} if boundary == "constant" else {}
    return np.pad(x, widths, mode=NUMPY_PAD_MODE[boundary], **kw)


@functools.lru_cache(maxsize=8)
def pad_index(n: int, h: int, boundary: str) -> np.ndarray:
    """Source index of each position of an axis of length ``n`` padded by ``h`` (:func:`pad_border`); -1 = fill.

    Examples
    --------
    >>> pad_index(4, 3, "periodic")
    array([1, 2, 3, 0, 1, 2, 3, 0, 1, 2])
    """
    return pad_border(np.arange(n), h, boundary, fill=-1)
