"""Which model a path names: a model directory or a BioImage Model Zoo package, as a model source.

The one place prediction tells the sources apart; everything after it reads
the source's :class:`~n2v_chunked.model.contract.ModelContract` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.checkpoint import ModelDir
from ..model.contract import ModelSource
from ..zoo.load import prepare
from ..zoo.spec import is_zoo_package


def open_source(model: Any, data: Any = None, *, halo: Any = None) -> ModelSource:
    """The :class:`ModelSource` of a model directory or Zoo package path (a source is returned as is).

    A Zoo package is checked against ``data`` (the opened input) and its
    processing frozen for it (:func:`n2v_chunked.zoo.load.prepare`);
    ``halo`` (``--halo``) is for Zoo packages only.
    """
    if isinstance(model, ModelSource) and not isinstance(model, (str, os.PathLike)):
        return model
    if is_zoo_package(model):
        return prepare(model, data, halo=halo)
    if halo is not None:
        raise ConfigError("--halo is for Zoo models; an n2v_chunked model directory knows its exact receptive field")
    return ModelDir(str(Path(model).absolute()))
