"""Configuration: plain dataclasses, read from and written to YAML/JSON.

One config object per stage (model, masking, training); a model directory
stores all three so that a model can always be re-created and its training
continued.  Unknown keys are an error, never silently ignored: a typo in a
config file must not train the wrong model for a week.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError, InputNotFoundError, first_line
from .typecheck import BAD, conform, kind_of, mismatch

T = TypeVar("T")

#: The N2V paper's settings where ours differ or may differ: ``train --paper`` and
#: ``benchmarks/bsd68.py --paper`` (an option given explicitly still wins); keys are the options' names.
PAPER: dict[str, Any] = {
    "replacement": "uniform",       # a random other pixel of the neighbourhood, not N2V2's median
    "mask_density": 1.0 / 64.0,     # N=64 per 64x64 patch
    "lr": 4e-4,
    "stop_patience": 0,             # the full schedule, no early stop
    "independent_channels": False,  # one network sees all channels at once
    "ema": 0.0,                     # the trained weights themselves, no running average
}


def chosen(name: str, given: Any, paper: bool, default: Any) -> Any:
    """An option's value: as given, else the paper's under ``--paper`` (:data:`PAPER`), else ours.

    Examples
    --------
    >>> chosen("lr", None, False, 4e-4), chosen("ema", None, True, 0.999), chosen("ema", 0.99, True, 0.999)
    (0.0004, 0.0, 0.99)
    """
    if given is not None:
        return given
    return PAPER.get(name, default) if paper else default


def check_types(obj: Any, section: str) -> None:
    """Raise :class:`ConfigError` unless every field of dataclass ``obj`` has its hinted type.

    Integers given for float fields become floats; tuples for list fields, lists.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        fixed = conform(value, hints[f.name])
        if fixed is BAD:
            raise ConfigError(f"config section {section!r}: {mismatch(f.name, value, hints[f.name])}")
        setattr(obj, f.name, fixed)


def _require(ok: bool, section: str, key: str, value: Any, rule: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config section {section!r}: {key} must be {rule}, got {value!r}")


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
        check_types(self, "model")
        _require(self.dims in (2, 3), "model", "dims", self.dims, "2 or 3")
        _require(0 <= self.depth <= 6, "model", "depth", self.depth, "between 0 and 6")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "model", "kernel_size", self.kernel_size,
                 "odd and positive")
        for key in ("features", "in_channels"):
            _require(getattr(self, key) >= 1, "model", key, getattr(self, key), ">= 1")


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
        ``"median"`` (N2V2: the median of the neighbourhood without its centre;
        the default, measured better on BSD68 and the nuclei sample) or
        ``"uniform"`` (the N2V paper's: a random other pixel of the neighbourhood).
    struct_span : int
        structN2V: length of the line masked through each chosen pixel (0 = off).
        Must be odd.
    struct_axes : list of str
        Spatial axes ("z", "y", "x") along which the structN2V line runs; two
        axes give a cross.
    """

    density: float = 1.0 / 64.0
    neighbourhood: int = 5
    replacement: str = "median"
    struct_span: int = 0
    struct_axes: list[str] = dataclasses.field(default_factory=lambda: ["x"])

    def __post_init__(self) -> None:
        check_types(self, "mask")
        if not 0.0 < self.density <= 0.5:
            raise ConfigError(f"mask density must be in (0, 0.5], got {self.density}")
        _require(self.neighbourhood >= 3 and self.neighbourhood % 2 == 1, "mask", "neighbourhood",
                 self.neighbourhood, "odd and >= 3")
        _require(self.replacement in ("uniform", "median"), "mask", "replacement", self.replacement,
                 "'uniform' or 'median'")
        _require(self.struct_span == 0 or (self.struct_span > 0 and self.struct_span % 2 == 1), "mask",
                 "struct_span", self.struct_span, "0 (off) or odd")
        _require(all(a in ("z", "y", "x") for a in self.struct_axes), "mask", "struct_axes", self.struct_axes,
                 "among z, y, x")


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
    stop_patience : int
        Early stopping: validation passes without a new best validation loss
        after which training stops before ``steps`` (0 = never; the paper's
        fixed schedule).  The default, twice ``plateau_patience``, stops once
        halving the learning rate has not helped either.
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
        Stop after this many seconds of training (0 = no limit): a step starts
        only if it is expected to end within the budget, its duration
        estimated as the previous step's (:func:`n2v_chunked.training.loop.budget_allows`).
    seed : int
        Seed for patch sampling, masking and weights.
    num_workers : int
        Data-loader worker processes for streaming sources.
    compile : bool
        ``torch.compile`` the network of the train step (opt-in: compiling
        takes minutes, and it is not measured to win yet; for GPUs, whose
        step is short enough for kernel launches to count).
    ema : float
        Keep, validate and save an exponential moving average of the weights
        (and batch-norm statistics) instead of the last step's: at step ``n``
        the average moves by ``1 - min(ema, (1 + n) / (10 + n))``, so early
        on it follows the network closely and later it smooths the noise of
        the last few hundred steps.  0 turns it off (the paper's).
    """

    patch_size: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 128
    steps: int = 2000
    lr: float = 4e-4
    val_interval: int = 100
    val_patches: int = 256
    plateau_patience: int = 5
    stop_patience: int = 10
    schedule: str = "plateau"
    warmup: float = 0.1
    augment: bool = True
    precision: str = "auto"
    checkpoint_interval: int = 200
    time_budget: float = 0.0
    seed: int = 0
    num_workers: int = 0
    compile: bool = False
    ema: float = 0.999

    def __post_init__(self) -> None:
        check_types(self, "train")
        for key in ("batch_size", "val_interval", "val_patches", "checkpoint_interval"):
            _require(getattr(self, key) >= 1, "train", key, getattr(self, key), ">= 1")
        for key in ("steps", "plateau_patience", "stop_patience", "time_budget", "seed", "num_workers"):
            _require(getattr(self, key) >= 0, "train", key, getattr(self, key), ">= 0")
        _require(self.lr > 0, "train", "lr", self.lr, "> 0")
        _require(self.precision in ("auto", "bf16", "fp32"), "train", "precision", self.precision,
                 "auto, bf16 or fp32")
        _require(self.schedule in ("plateau", "cosine"), "train", "schedule", self.schedule, "'plateau' or 'cosine'")
        _require(0.0 <= self.warmup < 1.0, "train", "warmup", self.warmup, "a fraction in [0, 1)")
        _require(0.0 <= self.ema < 1.0, "train", "ema", self.ema, "a decay in [0, 1) (0: off)")
        _require(all(p >= 1 for p in self.patch_size), "train", "patch_size", self.patch_size, "positive")


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
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config section {where!r} must be a mapping of keys to values, got {kind_of(data)}")
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        section = f" in section '{where}'" if where else ""
        raise ConfigError(
            f"unknown config key(s){section}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(names))})"
        )
    return cls(**data)  # __post_init__ checks every value's type and range


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
        raise InputNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = first_line(exc) or type(exc).__name__
        raise ConfigError(f"cannot parse config file {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.2) instead of text.

    YAML 1.1 wants a dot (``1.0e-3``); ``lr: 1e-3`` becoming the string
    ``"1e-3"`` would then be refused as a wrong type, which no user expects.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


#: What a change of each training setting does on ``train --resume``: None, it takes effect from the
#: resumed step on; a text, why it cannot (the run would no longer be the one its checkpoint continues).
ON_RESUME: dict[str, str | None] = {
    "steps": None, "time_budget": None, "stop_patience": None, "val_interval": None,
    "checkpoint_interval": None, "compile": None, "precision": None, "augment": None,
    "lr": None,  # the rate from the resumed step on (the peak of a cosine schedule)
    "plateau_patience": None,
    "ema": None,  # 0 stops averaging; a new decay applies to the stored average, or one starts at these weights
    "patch_size": "the patch stream and the network's input shape are fixed when training starts",
    "batch_size": "the sampler's stream position counts patches of the first run's batch size",
    "val_patches": "the validation set is drawn once, when training starts",
    "schedule": "the learning-rate schedule is fixed when training starts",
    "warmup": "the cosine schedule's shape is fixed when training starts",
    "seed": "the sampling, masking and weight streams are seeded when training starts",
    "num_workers": "the sampler's streams are split among the workers when training starts",
}

#: Command-line names of training settings whose option is not ``--`` plus the name with dashes.
TRAIN_OPTION = {"time_budget": "--minutes", "num_workers": "--workers", "patch_size": "--patch",
                "val_patches": "val_patches", "plateau_patience": "plateau_patience", "warmup": "warmup",
                "augment": "augment"}


def train_option(name: str) -> str:
    """The command-line option (or config key) of ``TrainConfig`` field ``name``."""
    return TRAIN_OPTION.get(name, "--" + name.replace("_", "-"))


def resume_changes(requested: TrainConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The settings a resumed run is asked to change.

    A mapping is taken as it is; a :class:`TrainConfig` gives its fields that
    differ from the defaults (to set a field back to its default on resume,
    pass a mapping); None changes nothing.
    """
    if requested is None:
        return {}
    if isinstance(requested, dict):
        unknown = sorted(set(requested) - set(ON_RESUME))
        if unknown:
            raise ConfigError(f"unknown training setting(s) to change on resume: {', '.join(unknown)}")
        return dict(requested)
    default = TrainConfig()
    return {f.name: getattr(requested, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(requested, f.name) != getattr(default, f.name)}


def resumed(stored: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """The one rule of ``train --resume``: the stored settings, with each change taking effect or refused.

    Parameters
    ----------
    stored : TrainConfig
        The settings recorded in the model directory.
    changes : dict
        Field -> value asked for (:func:`resume_changes`); a value equal to the
        stored one is no change.

    Returns
    -------
    TrainConfig
        The settings the resumed run uses (and records).

    Raises
    ------
    ConfigError
        One line naming the first change that cannot take effect, and why.

    Examples
    --------
    >>> resumed(TrainConfig(steps=60), {"steps": 100, "stop_patience": 0}).steps
    100
    >>> resumed(TrainConfig(batch_size=8), {"batch_size": 16})
    Traceback (most recent call last):
    ...
    n2v_chunked.errors.ConfigError: --batch-size cannot change on --resume (stored 8, asked 16): the sampler's stream position counts patches of the first run's batch size; resume without it, or train a new model in another --model-dir
    """
    real = {k: v for k, v in changes.items() if getattr(stored, k) != v}
    for name, value in real.items():
        why = ON_RESUME[name]
        if why is not None:
            raise ConfigError(f"{train_option(name)} cannot change on --resume (stored {getattr(stored, name)!r}, "
                              f"asked {value!r}): {why}; resume without it, or train a new model in another "
                              "--model-dir")
    return dataclasses.replace(stored, **real)  # __post_init__ checks the new values
