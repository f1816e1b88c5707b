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

Normalize = Literal["model", "data"]


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Every setting of prediction (see :func:`n2v_chunked.prediction.predict` for each one's meaning)."""

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
    normalize: Normalize = "model"
    allow_unvalidated: bool = False

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
