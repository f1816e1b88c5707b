"""Model directories: everything needed to predict with a model or continue training it.

Layout of a model directory::

    config.yaml          human-readable: model, mask and train configs,
                         normalisation statistics and noise level, the
                         validation loss of each weights file, data axes,
                         model id, version
    weights_best.pt      state_dict with the best validation loss
    weights_last.pt      state_dict of the latest step
    training_state.pt    optimiser, scheduler, step, RNG and sampler state

Every file is written to a temporary name, flushed to disk and renamed, so a
kill during a save leaves the previous checkpoint intact.  Tensors are loaded
with ``torch.load(weights_only=True)`` and YAML with a safe loader: a model
directory from elsewhere cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..errors import IncompatibleModelError, InputNotFoundError, N2VError, UnvalidatedModelError, first_line, rephrased
from .config import MaskConfig, ModelConfig, TrainConfig, from_dict, to_dict
from .contract import file_digest, unet_contract
from .unet import UNet

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
WEIGHTS_BEST = "weights_best.pt"
WEIGHTS_LAST = "weights_last.pt"
STATE = "training_state.pt"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trained:
    """A loaded model ready for inference.

    Attributes
    ----------
    model : UNet
        The network in eval mode, on the requested device.
    config : ModelConfig
        Its architecture.
    mean, std : numpy.ndarray
        Per-channel normalisation statistics, shape ``(C,)``, in input units.
    meta : dict
        The whole ``config.yaml`` (axes, model id, training settings).
    blend_weight : numpy.ndarray or None
        Per-channel weight of the network's prediction when blending with the
        noisy input (:func:`blend_weight`); None when the model has no record.
    weights_digest : str
        sha256 (hex) of the weights file it was loaded from ("" when built in memory).
    step : int or None
        Training step of those weights, when ``config.yaml`` records it.
    """

    model: UNet
    config: ModelConfig
    mean: np.ndarray
    std: np.ndarray
    meta: dict[str, Any]
    blend_weight: np.ndarray | None = None
    weights_digest: str = ""
    step: int | None = None

    @property
    def contract(self) -> Any:
        """What prediction relies on (:class:`n2v_chunked.model.contract.ModelContract`)."""

        per_image = (self.meta.get("collection") or {}).get("normalize_per") == "image"
        return unet_contract(self.config, self.mean, self.std, self.weights_digest, self.step,
                             normalize="data" if per_image else "model")

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id", ""))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def never_checkpointed(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds no weights and no training state (at most a ``config.yaml``).

    That is what a training run killed before its step-0 checkpoint leaves:
    nothing to resume and nothing a fresh start could destroy.
    """
    return not any((Path(model_dir) / name).exists() for name in (STATE, WEIGHTS_LAST, WEIGHTS_BEST))


def resume_or_start(model_dir: str | Path, resume: bool) -> bool:
    """``resume``, unless there is nothing to resume: then say so in one line and start a new model.

    Nothing to resume is a ``model_dir`` that does not exist yet, or holds
    neither a ``config.yaml`` nor a checkpoint (a run killed before it wrote
    either): so ``train --resume`` is the one command that starts a job and
    restarts it after a kill or a requeue.
    """
    path = Path(model_dir)
    if resume and not path.is_file() and not (path / CONFIG).exists() and never_checkpointed(path):
        log.warning("nothing to resume in %s (no model there yet): starting a new model", model_dir)
        return False
    return resume


def remove_stale_temp_files(model_dir: str | Path) -> None:
    """Delete temporary files left by a save that was killed mid-write."""
    for tmp in Path(model_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def new_model_id() -> str:
    """A unique id recorded in the model and in every output it produces."""
    return uuid.uuid4().hex[:12]


def write_config(
    model_dir: str | Path,
    model_cfg: ModelConfig,
    mask_cfg: MaskConfig,
    train_cfg: TrainConfig,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    axes: str = "",
    model_id: str | None = None,
    extra: dict[str, Any] | None = None,
    noise_std: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``config.yaml`` (atomically) and return its content."""
    meta = {
        "n2v_chunked_version": __version__,
        "model_id": model_id or new_model_id(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "axes": axes,
        "model": to_dict(model_cfg),
        "mask": to_dict(mask_cfg),
        "train": to_dict(train_cfg),
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
    }
    if noise_std is not None:
        meta["normalization"]["noise_std"] = [float(v) for v in noise_std]
    if extra:
        meta.update(extra)
    write_meta(model_dir, meta)
    return meta


def write_meta(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """(Re)write ``config.yaml`` atomically from its content."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model_dir / CONFIG, yaml.safe_dump(meta, sort_keys=False).encode())


def blend_weight(meta: dict[str, Any], which: str) -> np.ndarray | None:
    """Per-channel weight of the prediction in a blend with the noisy input.

    The network predicts each pixel from its neighbours only (the blind spot),
    so its error is independent of that pixel's noise, and the two estimates
    of the clean value combine as in Laine et al. (2019, Section 3): with
    noise variance ``s2`` and prediction error variance ``p2``, the
    minimum-MSE mix is ``w * prediction + (1 - w) * noisy`` with
    ``w = s2 / (s2 + p2)``.  The masked validation MSE estimates ``p2 + s2``
    (its targets are noisy), and the noise level stored at training
    (:func:`n2v_chunked.model.normalization.noise_std`) estimates ``s2``, so no clean
    data is needed.  A global weight per channel suits pixel-independent,
    signal-independent noise best.

    Parameters
    ----------
    meta : dict
        Content of ``config.yaml``.
    which : {"best", "last"}
        The weights file the blend is for.

    Returns
    -------
    numpy.ndarray or None
        Weights in [0, 1], shape ``(C,)``; None when the model directory has no
        noise level or no validation record (trained by an older version, or
        not yet validated).
    """
    norm = meta.get("normalization", {})
    record = (meta.get("validation") or {}).get(which) or {}
    if "noise_std" not in norm or "mse" not in record:
        return None
    noise = np.asarray(norm["noise_std"], np.float64) / np.asarray(norm["std"], np.float64)
    mse = np.asarray(record["mse"], np.float64)
    if noise.shape != mse.shape or not np.all(np.isfinite(mse)) or not np.all(mse > 0):
        return None
    return np.clip(noise**2 / mse, 0.0, 1.0).astype(np.float32)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``config.yaml`` of a model directory."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputNotFoundError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise IncompatibleModelError(f"model directory is not a directory: {model_dir}")
    path = model_dir / CONFIG
    if not path.is_file():
        raise IncompatibleModelError(f"not a model directory (no {CONFIG}): {model_dir}")
    try:
        meta = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise IncompatibleModelError(f"corrupt {path}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or "model" not in meta or "normalization" not in meta:
        raise IncompatibleModelError(f"corrupt {path}: missing 'model' or 'normalization' section")
    return meta


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s ``state_dict`` as detached CPU tensors (what a checkpoint holds)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_weights(model_dir: str | Path, model: torch.nn.Module, which: str = WEIGHTS_LAST) -> None:
    """Save a model's ``state_dict`` atomically."""
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    atomic_write_bytes(Path(model_dir) / which, _torch_bytes(cpu_state(module)))


def save_training_state(model_dir: str | Path, state: dict[str, Any]) -> None:
    """Save optimiser, scheduler, step and RNG state atomically."""
    atomic_write_bytes(Path(model_dir) / STATE, _torch_bytes(state))


def safe_torch_load(path: Path, device: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; any failure becomes one clear line."""
    if not path.is_file():
        raise InputNotFoundError(f"missing checkpoint file: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        raise IncompatibleModelError(f"refusing to load {path}: not a plain tensor checkpoint ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = first_line(exc) or type(exc).__name__
        raise IncompatibleModelError(f"corrupt or truncated checkpoint {path}: {first[:160]}") from None


def load_training_state(model_dir: str | Path) -> dict[str, Any]:
    """Load ``training_state.pt`` (weights-only unpickler)."""
    return safe_torch_load(Path(model_dir) / STATE)


def configs_from_meta(
    meta: dict[str, Any], where: str | Path | None = None
) -> tuple[ModelConfig, MaskConfig, TrainConfig]:
    """The three config objects recorded in a model directory.

    Parameters
    ----------
    meta : dict
        Content of ``config.yaml`` (:func:`read_config`).
    where : str or Path, optional
        The file it came from; errors (unknown keys, bad values) name it.

    Returns
    -------
    tuple
        ``(ModelConfig, MaskConfig, TrainConfig)``.
    """
    try:
        return (
            # model directories written while joint was the default may lack the key: they are joint
            from_dict(ModelConfig, {"independent_channels": False, **(meta.get("model") or {})}, "model"),
            from_dict(MaskConfig, meta.get("mask"), "mask"),
            from_dict(TrainConfig, meta.get("train"), "train"),
        )
    except N2VError as exc:
        if where is None:
            raise
        raise rephrased(exc, f"{where}: {exc}") from None


def reached_step(model_dir: str | Path) -> int | None:
    """The step of the latest checkpoint in ``model_dir`` (None when there is none or it cannot be read)."""
    try:
        return int(load_training_state(model_dir)["step"])
    except (N2VError, KeyError, TypeError, ValueError):
        return None


def check_trained(model_dir: str | Path, allow_unvalidated: bool = False) -> None:
    """Refuse a model directory without validated weights; warn about a model that has not learned.

    The doors that use a model directory's weights (``predict``, ``export``,
    ``train --init-from``) call this first.  Without ``weights_best.pt`` the
    only weights are those of a run stopped before its first validation,
    step 0's random ones at worst: refused with one line naming the step and
    how to continue, unless ``allow_unvalidated`` (``--allow-unvalidated``).
    A model whose training found it has not learned
    (:func:`n2v_chunked.training.loop.not_learned`) is used with one WARNING line.

    Raises
    ------
    UnvalidatedModelError
        No validated weights and ``allow_unvalidated`` is False.
    """
    model_dir = Path(model_dir)
    meta = read_config(model_dir)
    if not (model_dir / WEIGHTS_BEST).is_file():
        step = reached_step(model_dir)
        where = f"last checkpoint: step {step}" if step is not None else "no checkpoint"
        if not allow_unvalidated:
            raise UnvalidatedModelError(
                f"{model_dir} holds no validated weights: its training stopped before the first validation ({where}); "
                f"continue it with 'n2v-chunked train INPUT --model-dir {model_dir} --resume', or pass "
                "--allow-unvalidated to use these weights as they are")
        log.warning("using the unvalidated weights of %s (%s)", model_dir, where)
    elif meta.get("not_learned"):
        log.warning("%s: %s", model_dir, meta["not_learned"])


def load_model(
    model_dir: str | Path, device: str | torch.device | None = None, which: str = "best"
) -> Trained:
    """Load a model directory for inference.

    Parameters
    ----------
    model_dir : str or Path
        Directory written by training.
    device : str or torch.device, optional
        Defaults to CUDA when available, else CPU.
    which : {"best", "last"}
        Weights with the best validation loss, or of the latest step.

    Returns
    -------
    Trained
        The model in eval mode with its normalisation statistics.
    """
    model_dir = Path(model_dir)
    meta = read_config(model_dir)
    model_cfg, _, _ = configs_from_meta(meta, model_dir / CONFIG)
    norm = meta["normalization"]
    mean = np.asarray(norm.get("mean"), dtype=np.float32)
    std = np.asarray(norm.get("std"), dtype=np.float32)
    if mean.shape != (model_cfg.in_channels,) or std.shape != mean.shape or not np.all(std > 0):
        raise IncompatibleModelError(f"corrupt {model_dir / CONFIG}: normalisation does not match {model_cfg.in_channels} channel(s)")
    name = WEIGHTS_BEST if which == "best" else WEIGHTS_LAST
    if which == "best" and not (model_dir / name).is_file() and (model_dir / WEIGHTS_LAST).is_file():
        name = WEIGHTS_LAST  # not validated yet: the doors refuse this unless asked (check_trained)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = safe_torch_load(model_dir / name, "cpu")
    digest = file_digest(model_dir / name)
    # weights_best.pt is saved at the validation that recorded it; weights_last.pt also between validations
    step = ((meta.get("validation") or {}).get("best") or {}).get("step") if name == WEIGHTS_BEST else None
    model = UNet(model_cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise IncompatibleModelError(f"weights in {model_dir / name} do not match config.yaml: {first_line(exc)[:160]}") from None
    model.to(device).eval()
    weight = blend_weight(meta, "best" if name == WEIGHTS_BEST else "last")
    return Trained(model=model, config=model_cfg, mean=mean, std=std, meta=meta, blend_weight=weight,
                   weights_digest=digest, step=None if step is None else int(step))


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A model directory written by training, as a :class:`~n2v_chunked.model.contract.ModelSource`."""

    path: str

    def __str__(self) -> str:
        return self.path

    @property
    def key(self) -> str:
        return str(Path(self.path).absolute())

    def token(self) -> str:
        parts = []
        for name in (CONFIG, WEIGHTS_BEST, WEIGHTS_LAST):
            with contextlib.suppress(OSError):
                st = (Path(self.path) / name).stat()
                parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
        return "|".join(parts)

    def load(self, device: str | torch.device | None = None) -> Trained:
        return load_model(self.path, device=device)

    def provenance(self) -> dict[str, Any]:
        return {}
