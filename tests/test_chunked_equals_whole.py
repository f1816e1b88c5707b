"""Chunked prediction equals whole-image prediction over the ``predict`` option matrix.

The README promises that block-by-block prediction gives the same result as
predicting the whole image at once.  Each option that changes what the network
sees (TTA, blend, precision, boundary mode, 2D/3D, channels, time, N2V2) could
break that promise, so every pair of option values is run here (pairwise
coverage: 18 cases instead of the 768 of the full product), every case on an
image of odd sizes whose last blocks have odd lengths, compared with the same
options and the same precision to 1e-4 of the data range.

The models have random weights with their output layer scaled up until the
prediction spans about the data's range: an untrained network's nearly
constant output would hide a misaligned pooling grid below the tolerance.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked import prediction as P
from n2v_chunked.prediction import blocks

from helpers import make_model_dir, noisy
from test_predict import assert_close, chunked, whole_image

# One image (odd sizes) and working chunks per layout; the model follows from it.
LAYOUTS = {
    "yx": dict(shape=(37, 45), chunks=(12, 16), dims=2, channels=1),
    "tcyx": dict(shape=(2, 2, 27, 33), chunks=(1, 2, 10, 12), dims=2, channels=2),
    "zyx": dict(shape=(7, 23, 25), chunks=(10, 10, 12), dims=3, channels=1),
    "czyx": dict(shape=(2, 7, 23, 25), chunks=(2, 10, 10, 12), dims=3, channels=2),
}
OPTIONS = {
    "layout": list(LAYOUTS),
    "boundary": ["reflect", "nearest", "periodic", "constant"],
    "precision": ["fp32", "bf16", "auto"],
    "tta": [False, True],
    "blend": [False, True],
    "n2v2": [False, True],
}
# Every pair of option values appears in at least one row (checked below);
# TTA on 3D data, the slowest combination, appears only twice.
CASES = [
    ("yx", "reflect", "fp32", False, False, False),
    ("tcyx", "nearest", "bf16", False, True, True),
    ("zyx", "periodic", "auto", True, False, True),
    ("czyx", "constant", "fp32", True, True, False),
    ("yx", "periodic", "auto", False, True, False),
    ("zyx", "constant", "bf16", False, False, False),
    ("yx", "reflect", "bf16", True, True, True),
    ("tcyx", "nearest", "fp32", True, False, False),
    ("czyx", "reflect", "auto", False, False, True),
    ("tcyx", "constant", "auto", False, False, True),
    ("zyx", "reflect", "fp32", False, True, True),
    ("czyx", "periodic", "bf16", False, False, False),
    ("yx", "nearest", "auto", False, False, False),
    ("tcyx", "periodic", "fp32", False, False, False),
    ("yx", "constant", "fp32", False, False, False),
    ("tcyx", "reflect", "fp32", False, False, False),
    ("zyx", "nearest", "fp32", False, False, False),
    ("czyx", "nearest", "fp32", False, False, False),
]


def test_option_matrix_covers_every_pair():
    names = list(OPTIONS)
    seen = {(a, row[i], b, row[j]) for row in CASES for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)}
    missing = [(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in OPTIONS[a] for vb in OPTIONS[b]
               if (a, va, b, vb) not in seen]
    assert not missing


def _sensitive_model(path: Path, dims: int, channels: int, n2v2: bool) -> Path:
    """A blend-capable random model whose output spans about the data's range."""
    md = make_model_dir(path, dims=dims, channels=channels, n2v2=n2v2, blend=True, depth=1, features=2)
    net = ckpt.load_model(md, "cpu").model
    x = torch.from_numpy(noisy((1, channels, *([24] * dims))) - 100) / 20
    with torch.no_grad():
        gain = float(x.std() / net(x).std())
        net.head.weight.mul_(gain)
        net.head.bias.mul_(gain)
    ckpt.save_weights(md, net, ckpt.WEIGHTS_BEST)
    return md


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple, Path] = {}

    def get(dims: int, channels: int, n2v2: bool) -> Path:
        key = (dims, channels, n2v2)
        if key not in cache:
            cache[key] = _sensitive_model(root / "_".join(map(str, key)), *key)
        return cache[key]

    return get


@pytest.mark.parametrize("layout, boundary, precision, tta, blend, n2v2", CASES)
def test_chunked_equals_whole_image(models, layout, boundary, precision, tta, blend, n2v2):
    spec = LAYOUTS[layout]
    md = models(spec["dims"], spec["channels"], n2v2)
    arr = noisy(spec["shape"], seed=len(layout))
    grid = P.plan(ckpt.load_model(md, "cpu"), xr.DataArray(arr, dims=tuple(layout)), spec["chunks"]).grid
    assert all(len(g) > 1 and g[-1] % 2 for g in grid[-2:])  # several blocks along y and x, the last one odd
    kw = dict(boundary=boundary, precision=precision, tta=tta, blend=blend)
    assert_close(chunked(md, arr, layout, spec["chunks"], **kw), whole_image(md, arr, layout, **kw), arr)


def test_nearest_halo_is_one_segment_per_side():
    """``nearest`` repeats the edge pixel: one graph piece per side, not one per halo position.

    One piece per position made a 3D block's padded input (2h+1)**3 dask slices
    (9261 for h=10) and the 3D rows above minutes slower.
    """
    segs = blocks._segments(50, 0, 50, 10, "nearest")
    assert segs == [(0, 1, 1, 10), (0, 50, 1), (49, 50, 1, 10)]
    assert [blocks._seg_len(s) for s in segs] == [10, 50, 10]
    assert blocks._segments(50, 0, 20, 10, "reflect") == [(9, -1, -1), (0, 30, 1)]  # other modes unchanged
