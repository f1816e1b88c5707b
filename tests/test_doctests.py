"""The Examples sections of the library's docstrings run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "n2v_chunked.augment",
    "n2v_chunked.config",
    "n2v_chunked.masking",
    "n2v_chunked.model",
    "n2v_chunked.padding",
    "n2v_chunked.predict.plan",
    "n2v_chunked.sampling.grid",
    "n2v_chunked.sampling.order",
    "n2v_chunked.validation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
