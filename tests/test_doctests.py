"""The Examples sections of the library's docstrings run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "n2v_chunked.engine.symmetry",
    "n2v_chunked.model.config",
    "n2v_chunked.training.masking",
    "n2v_chunked.model.unet",
    "n2v_chunked.engine.padding",
    "n2v_chunked.prediction.plan",
    "n2v_chunked.sampling.grid",
    "n2v_chunked.sampling.order",
    "n2v_chunked.sampling.collection",
    "n2v_chunked.model.normalization",
    "n2v_chunked.model.intensity",
    "n2v_chunked.training.validation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
