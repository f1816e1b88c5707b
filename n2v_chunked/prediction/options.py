"""The options of prediction, declared once for every door.

:class:`PredictOptions` holds every setting of :func:`n2v_chunked.prediction.predict`
with its type and default.  The allowed values of each choice are ``Literal``
types declared once where they belong (:data:`n2v_chunked.engine.runtimes.Runtime`,
:data:`~n2v_chunked.engine.runtimes.Precision`, :data:`n2v_chunked.engine.padding.Boundary`,
:data:`n2v_chunked.io.ome.NgffVersion`, :data:`Normalize`); the command
line's ``choices`` (and through them the ``--config`` YAML check) read them
with :func:`choices`, and the object checks itself once when it is built
(:meth:`PredictOptions.__post_init__`), so the command line, the YAML file
and the Python API share one set of defaults and one validation.

The defaults are the fast engine: ``runtime="auto"`` and ``precision="auto"``
(:func:`n2v_chunked.engine.runtimes.resolve`: OpenVINO on CPUs, bf16 where the
hardware has it; both pass the quality bar of ``benchmarks/precision.py``).
Pass ``runtime="torch", precision="fp32"`` for bit-for-bit float32.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from ..engine.padding import Boundary
from ..engine.runtimes import Precision, Runtime
from ..errors import ConfigError
from ..io.ome import NgffVersion, check_dtype

Normalize = Literal["auto", "model", "data"]


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Every setting of prediction (:func:`n2v_chunked.prediction.run.predict`), declared once.

    Attributes
    ----------
    chunks : sequence of int or dict, optional
        Working and output chunks (see :func:`~n2v_chunked.prediction.plan.plan`).
    boundary : {"reflect", "nearest", "periodic", "constant"}
        Image border extension (dask's names; ``reflect`` is numpy's ``symmetric``).
    tta : bool
        Average the 8 rotations/flips of the YX plane.
    blend : bool
        Mix the prediction with the noisy input with the model's weight
        (:func:`n2v_chunked.model.checkpoint.blend_weight`): higher PSNR under
        pixel-independent noise, at the price of some visible grain.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Arithmetic of the network (default ``auto``, as on the command line:
        bf16 where the hardware has it, else fp32; :func:`n2v_chunked.engine.runtimes.resolve`).
    runtime : {"auto", "torch", "torch-compile", "openvino", "onnxruntime"}
        Engine of the network (default ``auto``, as on the command line;
        ``runtime="torch", precision="fp32"`` for bit-for-bit float32).
    resume : bool
        Finish an interrupted run into ``output``: blocks already written are skipped.
    overwrite : bool
        Replace an existing output.
    scheduler : None, str or distributed.Client
        None: the active distributed client, else local threads.  ``"sync"``,
        ``"threads"``, ``"local"`` (a LocalCluster), ``"tcp://host:port"`` or
        ``"slurm"`` (see :func:`~n2v_chunked.cluster.scheduling.scheduler_context`).
    ngff_version : {"0.5", "0.4"}
        Output format.
    dtype : dtype-like or None
        Output type (float32; None keeps the input's; integers are rounded and clipped).
    axes : str, optional
        Axis letters for inputs without metadata.
    level : int
        Resolution level of a multiscale input.
    batch_blocks : int, optional
        Blocks per submitted graph (:data:`~n2v_chunked.prediction.run.DEFAULT_BATCH_BLOCKS`).
    progress : bool
        Progress bar (blocks, MPix/s, ETA).
    device : str, optional
        Torch device of the workers (CUDA when available).
    pyramid : bool
        Add downsampled levels once level 0 is complete.
    jobqueue_config, jobs
        For ``scheduler="slurm"``.
    halo : int or sequence of int, optional
        Zoo models only: halo per spatial axis instead of the declared one.
    normalize : {"auto", "model", "data"}
        Normalise with the model's stored statistics (a warning when the
        input's are far from them), or with the input's own, sampled once per
        image (:func:`n2v_chunked.model.intensity.choose_normalization`); recorded in
        the output's provenance (``normalization``).  ``"auto"``: as the model
        was trained (its contract's ``normalize``): the input's own for a model
        trained on a collection with per-image statistics, else the model's.
    allow_unvalidated : bool
        Use a model directory without validated weights (see
        :func:`n2v_chunked.model.checkpoint.check_trained`); refused by default.
    select : str or sequence of str, optional
        Collections only (a plate, container or folder of images): the images to
        predict, as ``--select`` patterns (:func:`n2v_chunked.io.collections.select_images`);
        refused for a single image.
    """

    chunks: Any = None
    boundary: Boundary = "reflect"
    tta: bool = False
    blend: bool = False
    precision: Precision = "auto"
    runtime: Runtime = "auto"
    resume: bool = False
    overwrite: bool = False
    scheduler: Any = None
    ngff_version: NgffVersion = "0.5"
    dtype: Any = "float32"
    axes: str | None = None
    level: int = 0
    batch_blocks: int | None = None
    progress: bool = True
    device: str | None = None
    pyramid: bool = True
    jobqueue_config: str | None = None
    jobs: int | None = None
    halo: Any = None
    normalize: Normalize = "auto"
    allow_unvalidated: bool = False
    select: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngff_version", str(self.ngff_version))  # YAML and Python may give 0.5
        for name in CHOICES:
            value, allowed = getattr(self, name), choices(name)
            if value not in allowed:
                raise ConfigError(f"unknown {name.replace('_', ' ')} {value!r}; use one of {', '.join(allowed)}")
        if self.dtype is not None:
            check_dtype(self.dtype)
        if self.batch_blocks is not None and self.batch_blocks < 1:
            raise ConfigError(f"batch_blocks must be >= 1, got {self.batch_blocks}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")

    @classmethod
    def of(cls, options: PredictOptions | None = None, **kwargs: Any) -> PredictOptions:
        """``options`` (default: the defaults) with ``kwargs`` replacing some, checked once."""
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown prediction option(s): {', '.join(unknown)}")
        return dataclasses.replace(options, **kwargs) if options is not None else cls(**kwargs)


CHOICES = ("boundary", "precision", "runtime", "ngff_version", "normalize")


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of option ``name`` (from its ``Literal`` type)."""
    hint = typing.get_type_hints(PredictOptions)[name]
    return tuple(typing.get_args(hint))


def default(name: str) -> Any:
    """The default of option ``name``."""
    return next(f.default for f in dataclasses.fields(PredictOptions) if f.name == name)
