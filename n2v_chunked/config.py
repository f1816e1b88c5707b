"""Configuration: plain dataclasses, read from and written to YAML/JSON.

One config object per stage (model, masking, training); a model directory
stores all three so that a model can always be re-created and its training
continued.  Unknown keys are an error, never silently ignored: a typo in a
config file must not train the wrong model for a week.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import N2VError

T = TypeVar("T")


@dataclasses.dataclass
class ModelConfig:
    """U-Net architecture (Ronneberger 2015 as used by N2V / CSBDeep).

    Attributes
    ----------
    dims : int
        Number of spatial dimensions, 2 or 3.
    in_channels : int
        Channels of the data; the network maps ``in_channels`` to the same number.
    depth : int
        Number of down-sampling steps (the paper uses 2).
    kernel_size : int
        Convolution kernel size (odd; the paper uses 3).
    features : int
        Feature maps at the top level, doubled at each level (32, or 96 for
        natural images in the paper).
    n2v2 : bool
        N2V2 variant (Hoeck et al. 2022): no top-level skip connection and
        blur-pool instead of max-pool, which removes checkerboard artefacts.
    independent_channels : bool
        Denoise each channel on its own with a shared single-channel network
        (default): no channel's structures can bleed into another's, as they
        do with a joint network after short training (benchmarks/channels.py).
        False: one network sees all channels at once.
    """

    dims: int = 2
    in_channels: int = 1
    depth: int = 2
    kernel_size: int = 3
    features: int = 32
    n2v2: bool = False
    independent_channels: bool = True

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise N2VError(f"model dims must be 2 or 3, got {self.dims}")
        if self.depth < 0 or self.depth > 6:
            raise N2VError(f"model depth must be between 0 and 6, got {self.depth}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise N2VError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.features < 1 or self.in_channels < 1:
            raise N2VError("features and in_channels must be positive")


def default_replacement(n2v2: bool) -> str:
    """The replacement that goes with a network: N2V2's median, else N2V's uniform draw."""
    return "median" if n2v2 else "uniform"


@dataclasses.dataclass
class MaskConfig:
    """Blind-spot masking (N2V paper, Section 3.5).

    Attributes
    ----------
    density : float
        Fraction of pixels masked per patch.  The paper's N=64 per 64x64 patch
        is 1/64; the stratification grid has one cell per masked pixel.
    neighbourhood : int
        Side of the (hyper)cube around each masked pixel from which its
        replacement is drawn (5 in the paper), excluding the pixel itself.
    replacement : str
        ``"uniform"`` (N2V: a random other pixel of the neighbourhood) or
        ``"median"`` (N2V2: the median of the neighbourhood without its centre).
    struct_span : int
        structN2V: length of the line masked through each chosen pixel (0 = off).
        Must be odd.
    struct_axes : list of str
        Spatial axes ("z", "y", "x") along which the structN2V line runs; two
        axes give a cross.
    """

    density: float = 1.0 / 64.0
    neighbourhood: int = 5
    replacement: str = "uniform"
    struct_span: int = 0
    struct_axes: list[str] = dataclasses.field(default_factory=lambda: ["x"])

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 0.5:
            raise N2VError(f"mask density must be in (0, 0.5], got {self.density}")
        if self.neighbourhood < 3 or self.neighbourhood % 2 == 0:
            raise N2VError(f"mask neighbourhood must be odd and >= 3, got {self.neighbourhood}")
        if self.replacement not in ("uniform", "median"):
            raise N2VError(f"mask replacement must be 'uniform' or 'median', got {self.replacement!r}")
        if self.struct_span < 0 or (self.struct_span and self.struct_span % 2 == 0):
            raise N2VError(f"struct_span must be 0 (off) or odd, got {self.struct_span}")
        bad = [a for a in self.struct_axes if a not in ("z", "y", "x")]
        if bad:
            raise N2VError(f"struct_axes must be among z, y, x; got {bad}")


@dataclasses.dataclass
class TrainConfig:
    """Training schedule (the paper's CSBDeep settings by default).

    Attributes
    ----------
    patch_size : list of int
        Spatial patch shape; 64x64 in 2D, 32x32x32 in 3D when left empty.
    batch_size : int
        Patches per step (128 in the paper).
    steps : int
        Total optimiser steps.
    lr : float
        Adam learning rate (4e-4 in the paper).
    val_interval : int
        Steps between validation passes (and learning-rate plateau checks).
    val_patches : int
        Size of the fixed validation set, drawn once from held-out data.
    plateau_patience : int
        Validation passes without improvement before the learning rate halves.
    schedule : str
        ``"plateau"`` (the paper's: halve ``lr`` when the validation loss stops
        improving) or ``"cosine"`` (linear warm-up to ``lr``, then a cosine
        decay to zero at the end of the step or time budget, whichever comes
        first; for a known, short budget).  Progress through the step budget
        counts from step 0, so a resumed run continues the same curve; a time
        budget counts this run's time only, so resuming with ``--minutes``
        starts a new warm-up and decay (a warm restart).
    warmup : float
        Fraction of the budget spent warming up under ``"cosine"``.
    augment : bool
        Random 90-degree rotations and flips in YX (and Z flips in 3D).
    precision : str
        ``"auto"`` (bf16 autocast where the hardware supports it, else fp32),
        ``"bf16"`` or ``"fp32"``.
    checkpoint_interval : int
        Steps between checkpoints (a checkpoint is also written at the end).
    time_budget : float
        Stop after this many seconds of training (0 = no limit).
    seed : int
        Seed for patch sampling, masking and weights.
    num_workers : int
        Data-loader worker processes for streaming sources.
    """

    patch_size: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 128
    steps: int = 2000
    lr: float = 4e-4
    val_interval: int = 100
    val_patches: int = 256
    plateau_patience: int = 5
    schedule: str = "plateau"
    warmup: float = 0.1
    augment: bool = True
    precision: str = "auto"
    checkpoint_interval: int = 200
    time_budget: float = 0.0
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 0:
            raise N2VError("batch_size must be >= 1 and steps >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise N2VError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.schedule not in ("plateau", "cosine"):
            raise N2VError(f"schedule must be 'plateau' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise N2VError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if any(int(p) < 1 for p in self.patch_size):
            raise N2VError(f"patch_size must be positive, got {self.patch_size}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys.

    Parameters
    ----------
    cls : type
        A dataclass type.
    data : dict or None
        Field values; missing fields take their defaults.
    where : str
        Name of the section, for the error message.

    Returns
    -------
    object
        An instance of ``cls``.
    """
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        section = f" in section '{where}'" if where else ""
        raise N2VError(
            f"unknown config key(s){section}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(names))})"
        )
    try:
        return cls(**data)
    except TypeError as exc:  # wrong value types that dataclasses let through
        raise N2VError(f"invalid config{' ' + where if where else ''}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (JSON/YAML serialisable)."""
    return dataclasses.asdict(obj)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file with a safe loader.

    Parameters
    ----------
    path : str or Path
        File to read.

    Returns
    -------
    dict
        The parsed mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise N2VError(f"config file not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise N2VError(f"cannot parse config file {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise N2VError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data
