"""n2v_chunked: Noise2Void for terabyte-scale microscopy volumes.

The packages are the stages of the data flow (docs/architecture.md):
``io`` (images in and out, stores) -> ``sampling`` (patches for training) ->
``training`` (the loop) -> ``model`` (the U-Net, checkpoints) -> ``engine``
(running the network) -> ``prediction`` (blocks with halos into OME-Zarr);
``zoo`` (BioImage Model Zoo packages), ``cluster`` (where dask runs) and
``cli`` (the command line) around them.

What a Python user needs is here::

    from n2v_chunked import open_image, fit, predict, load_model, denoise, N2VError
    from n2v_chunked import TrainConfig, ModelConfig, MaskConfig   # fit's options

These names are imported on first use (:func:`__getattr__`): ``import
n2v_chunked`` stays as cheap as the errors, so the command line's start-up
(``n2v-chunked --help``) does not pay for torch, dask and zarr.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("n2v-chunked")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from .errors import (  # noqa: E402
    AxesError,
    ConfigError,
    IncompatibleModelError,
    InputNotFoundError,
    LockHeldError,
    N2VError,
    OutputExistsError,
    UnreadableDataError,
)

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "open_image": "n2v_chunked.io.sources",
    "fit": "n2v_chunked.training.fit",
    "predict": "n2v_chunked.prediction.run",
    "load_model": "n2v_chunked.model.checkpoint",
    "denoise": "n2v_chunked.engine.inference",
    "MaskConfig": "n2v_chunked.model.config",
    "ModelConfig": "n2v_chunked.model.config",
    "TrainConfig": "n2v_chunked.model.config",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them
    from .engine.inference import denoise
    from .io.sources import open_image
    from .model.checkpoint import load_model
    from .model.config import MaskConfig, ModelConfig, TrainConfig
    from .prediction.run import predict
    from .training.fit import fit


def __getattr__(name: str) -> Any:
    """Import a public function on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'n2v_chunked' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AxesError", "ConfigError", "IncompatibleModelError", "InputNotFoundError", "LockHeldError", "N2VError",
    "OutputExistsError", "UnreadableDataError", "__version__",
    "MaskConfig", "ModelConfig", "TrainConfig", "denoise", "fit", "load_model", "open_image", "predict",
]
