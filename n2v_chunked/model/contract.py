"""The model contract: what prediction knows of a model, whatever its source.

Every model source (a model directory written by training, a BioImage Model
Zoo package, any future one) answers the same questions in one
:class:`ModelContract`, and every prediction path reads that object only:
the plan (:mod:`~n2v_chunked.prediction.plan`: halo, working chunks on the
network's grid), TTA padding (:func:`n2v_chunked.engine.inference.pad_multiples`),
the ONNX export of the fast runtimes (:func:`n2v_chunked.engine.runtimes.export_onnx`:
channels, dynamic axes) and the output's provenance (weights digest, step).

A *source* (:class:`ModelSource`) is a small picklable value that the dask
workers load on their device (:meth:`ModelSource.load`, once per process
through :func:`n2v_chunked.prediction.blocks.get_model`); what it loads is a
:class:`BlockModel`.  :class:`n2v_chunked.model.checkpoint.ModelDir` is the
model directory's source; :class:`n2v_chunked.zoo.load.ZooRef` is the Zoo
package's; :func:`n2v_chunked.prediction.model_source.open_source` tells which
a path names.  It lives with the model, below every stage that reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .unet import halo_width, size_multiple

SPATIAL = ("z", "y", "x")


@dataclasses.dataclass(frozen=True)
class ModelContract:
    """The facts about a model that chunked prediction relies on.

    Attributes
    ----------
    in_channels, out_channels : int
        Channels the network takes and returns.
    dims : int
        Spatial dimensions (2 or 3).
    grid : tuple of int
        Size step of the network's grid per spatial axis (``zyx`` order):
        ``2**depth`` for a U-Net that pools ``depth`` times.  Blocks, halos
        and padded sizes are multiples of it, so every block sees the pooling
        grid of the whole image.
    halo : tuple of int
        Exact halo per spatial axis: the receptive field's half-width
        (computed, or probed to its full extent) rounded up to ``grid``.
    independent_channels : bool
        One network shared by every channel (any channel count runs it).
    mean, std : tuple of float
        Per-channel normalisation in input units (the network sees
        ``(x - mean) / std`` and its output is mapped back by the inverse).
    features : int
        Width of the first level (sets the activation budget per pixel; 32
        where the architecture is unknown).
    weights_digest : str
        sha256 (hex) of the weights file that runs.
    step : int or None
        Training step of those weights, when known.
    torch_module : bool
        The network is a plain torch module, so every runtime can run it
        (exported to ONNX); False: a Zoo pipeline that only bioimageio.core
        runs, in fp32.
    normalize : {"model", "data"}
        The statistics an input is normalised with unless the user says
        otherwise: ``mean``/``std`` (``"model"``), or the input's own
        (``"data"``: a model trained on a collection with each image
        normalised by its own statistics, so ``mean``/``std`` fit no image).
    """

    in_channels: int
    out_channels: int
    dims: int
    grid: tuple[int, ...]
    halo: tuple[int, ...]
    independent_channels: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    features: int = 32
    weights_digest: str = ""
    step: int | None = None
    torch_module: bool = True
    normalize: str = "model"

    def __post_init__(self) -> None:
        if len(self.grid) != self.dims or len(self.halo) != self.dims:
            raise ValueError(f"grid {self.grid} and halo {self.halo} need one value per spatial axis ({self.dims})")
        if any(g < 1 or h % g for g, h in zip(self.grid, self.halo)):
            raise ValueError(f"halo {self.halo} must be a multiple of the grid {self.grid}")

    @property
    def spatial(self) -> tuple[str, ...]:
        """The spatial axes: ``yx`` or ``zyx``."""
        return SPATIAL[3 - self.dims :]


def round_up(values: Any, grid: Any) -> tuple[int, ...]:
    """Each value rounded up to a multiple of its grid step."""
    return tuple(-(-int(v) // int(g)) * int(g) for v, g in zip(values, grid))


def file_digest(path: str | os.PathLike[str] | None = None, data: bytes | None = None) -> str:
    """sha256 (hex) of a file's bytes (or of ``data``)."""
    return hashlib.sha256(Path(path).read_bytes() if data is None else data).hexdigest()


def unet_contract(cfg: Any, mean: Any, std: Any, weights_digest: str = "", step: int | None = None,
                  normalize: str = "model") -> ModelContract:
    """The contract of our U-Net (:class:`n2v_chunked.model.unet.UNet`) with this config and normalisation."""
    return ModelContract(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, dims=cfg.dims,
        grid=(size_multiple(cfg),) * cfg.dims, halo=halo_width(cfg), independent_channels=cfg.independent_channels,
        mean=tuple(float(v) for v in np.ravel(mean)), std=tuple(float(v) for v in np.ravel(std)),
        features=cfg.features, weights_digest=weights_digest, step=step, normalize=normalize,
    )


@runtime_checkable
class BlockModel(Protocol):
    """A loaded model, ready to run blocks (:class:`n2v_chunked.model.checkpoint.Trained` and its Zoo twin)."""

    model: torch.nn.Module
    mean: np.ndarray
    std: np.ndarray
    meta: dict[str, Any]
    blend_weight: np.ndarray | None

    @property
    def contract(self) -> ModelContract: ...

    @property
    def model_id(self) -> str: ...

    @property
    def device(self) -> torch.device: ...


@runtime_checkable
class ModelSource(Protocol):
    """A picklable reference to a model that loads itself on a device."""

    @property
    def key(self) -> str:
        """Identifies the model in a worker's cache."""

    def token(self) -> str:
        """Changes when the model's files change (a long-lived worker reloads)."""

    def load(self, device: str | torch.device | None = None) -> BlockModel:
        """The model on ``device``."""

    def provenance(self) -> dict[str, Any]:
        """What the output records of the source, besides the contract."""
