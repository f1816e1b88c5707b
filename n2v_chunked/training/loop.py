"""The N2V training loop.

``batches -> device -> normalise -> augment -> mask -> model -> masked loss``.
Batches are raw patches ``(B, C, *patch)`` in input units from any iterator
(the streaming sampler, or anything else); everything after that happens on
the model's device, vectorised.  Adam with the paper's learning rate,
halved when the validation loss plateaus (CSBDeep's schedule).

Checkpoints hold the optimiser, scheduler, step, RNG and sampler state so
that ``resume=True`` continues exactly where training stopped; under
``torchrun`` the model is wrapped in DistributedDataParallel and only rank 0
writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..cluster import preemption
from ..cluster.progress import Progress
from ..engine.runtimes import autocast_context
from ..engine.transfer import LateScalar, ready, to_device
from ..errors import (
    ConfigError, IncompatibleModelError, N2VError, OutputExistsError, Preempted, UnreadableDataError, first_line,
)
from ..io.lock import HeldLock, output_lock
from ..model import checkpoint as ckpt
from ..model.config import MaskConfig, ModelConfig, TrainConfig, resume_changes, resumed, to_dict
from ..model.normalization import noise_std
from ..model.unet import UNet, size_multiple
from .augment import augment_batch
from .masking import MaskedBatch, actual_density, grid_cell, mask_batch, masked_mse
from .plots import TrainingPictures
from .validation import stalled, validate, validation_set

log = logging.getLogger(__name__)

# Seeds of the per-rank generators are spread far apart so streams never overlap.
_RANK_STRIDE = 1_000_003


@dataclasses.dataclass
class TrainResult:
    """Summary of a training run."""

    model_dir: Path
    step: int
    best_val_loss: float
    history: list[dict[str, float]]
    seconds: float
    patches_per_second: float
    not_learned: str | None = None  # why the model may not have learned anything (:func:`not_learned`)


@dataclasses.dataclass
class DistInfo:
    """Rank and world size (1 process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Uses NCCL when CUDA is available, else gloo (so it is testable on CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def default_device(info: DistInfo | None = None) -> torch.device:
    """CUDA (this rank's GPU) when present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", (info or DistInfo()).local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_patch(dims: int) -> list[int]:
    """The paper's patch shape: 64x64 in 2D, 32x32x32 in 3D."""
    return [64, 64] if dims == 2 else [32, 32, 32]


def _check_patch(patch: list[int], model_cfg: ModelConfig) -> None:
    m = size_multiple(model_cfg)
    if len(patch) != model_cfg.dims:
        raise ConfigError(f"patch_size {patch} has {len(patch)} axes but the model is {model_cfg.dims}D")
    bad = [p for p in patch if p % m]
    if bad:
        raise ConfigError(f"patch_size {patch} must be a multiple of 2**depth = {m} along every axis")


def _log_density(mask_cfg: MaskConfig, dims: int) -> None:
    """Refuse a density the masking grid cannot express; say which density is really used."""
    cell = grid_cell(mask_cfg.density, dims)  # raises for a density that would mask (nearly) every pixel
    log.info("masking %.4g of the pixels (one per %s cell; --mask-density %g asked)",
             actual_density(mask_cfg.density, dims), "x".join([str(cell)] * dims), mask_cfg.density)


def augment_and_mask(x: torch.Tensor, mask_cfg: MaskConfig, gen: torch.Generator, augment: bool) -> MaskedBatch:
    """Augment a normalised batch (when asked), then mask it.

    A structN2V line along only one of Y and X keeps its meaning only under
    symmetries that keep the axes: a quarter turn would carry the data's
    correlated noise across the line, and the network would learn it.
    """
    if augment:
        struct = set(mask_cfg.struct_axes) & {"y", "x"} if mask_cfg.struct_span else set()
        x = augment_batch(x, gen, keep_axes=len(struct) == 1)
    return mask_batch(x, mask_cfg, gen)


def _normaliser(mean: np.ndarray, std: np.ndarray, dims: int, device: torch.device):
    shape = (1, -1) + (1,) * dims
    m = torch.as_tensor(np.asarray(mean, np.float32)).reshape(shape).to(device)
    s = torch.as_tensor(np.asarray(std, np.float32)).reshape(shape).to(device)
    return lambda x: (x - m) / s


def _to_tensor(batch: Any, device: torch.device) -> torch.Tensor:
    """A checked batch on ``device``; on CUDA copied on a side stream, overlapping the step still running."""
    t = torch.as_tensor(batch, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise UnreadableDataError("training batch contains NaN or Inf values; clean the data or use a foreground filter")
    return ready(*to_device(t, device))


def cosine_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier of the ``"cosine"`` schedule.

    Parameters
    ----------
    progress : float
        Fraction of the budget (steps or time) already used, 0 to 1.
    warmup : float
        Fraction of the budget over which the rate rises linearly from 0.

    Returns
    -------
    float
        Multiplier of the peak learning rate: a linear warm-up, then half a
        cosine down to 0 at the end of the budget.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def ema_model(model: torch.nn.Module, cap: float) -> torch.optim.swa_utils.AveragedModel:
    """A running average of ``model``'s weights and batch-norm statistics (``TrainConfig.ema``).

    The decay at the ``n``-th update is ``min(cap, (1 + n) / (10 + n))``: a short
    memory while the network still changes fast, ``cap`` later.  The rate stays
    a tensor on the device, so an update never waits for it.
    """
    def update(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        if not avg[0].is_floating_point():  # the batch counters: the latest count
            for a, c in zip(avg, cur):
                a.copy_(c)
            return
        n = n.to(avg[0].dtype)
        weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=cap)
        for a, c in zip(avg, cur):
            a.lerp_(c, weight)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


# The loop's clock (seconds, monotonic); tests replace it to give steps a duration.
_clock = time.perf_counter


def budget_allows(elapsed: float, last_step: float, budget: float) -> bool:
    """Whether another step fits the time budget (``--minutes``).

    A step starts only if it is expected to end within the budget, its
    duration estimated as the previous step's (validation and checkpoint
    included): so a run of 60 s steps under a 2-minute budget stops after
    two steps instead of starting a third at 119 s.  The first step always
    runs (nothing to estimate it from).  0: no budget.

    Examples
    --------
    >>> budget_allows(119.0, 60.0, 120.0), budget_allows(50.0, 60.0, 120.0), budget_allows(999.0, 1.0, 0.0)
    (False, True, True)
    """
    return not budget or elapsed + last_step <= budget


def divergence_cause(model: torch.nn.Module, batch: torch.Tensor | None, cfg: TrainConfig) -> str:
    """Why the loss stopped being finite, and what to do: the first of the weights, the data and the arithmetic.

    The loss is read a step late, so the weights checked are those after the
    update that followed it, and the batch is the latest one.
    """
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return (f"the weights became non-finite ({bad[0]}, {len(bad)} tensor(s)): an update overflowed; "
                f"lower the learning rate (--lr, now {cfg.lr:g})")
    if batch is not None:
        peak = float(batch.abs().max())
        if peak > 1e4:
            return (f"the normalised patches reach |{peak:.3g}|: the data's std is tiny against its values "
                    "(a near-constant image, or a few extreme pixels); check the data or use --min-std")
    if cfg.precision != "fp32":
        return f"the {cfg.precision} arithmetic overflowed with finite weights and data; use --precision fp32"
    return "weights and data are finite, so the loss itself overflowed; please report it with the data's shape"


def not_learned(record: dict[str, Any], best: float, steps: int, cfg: TrainConfig) -> str | None:
    """Why a trained model may not have learned anything (None when it has), with what to do.

    Parameters
    ----------
    record : dict
        ``config.yaml``'s ``validation`` section: ``initial`` holds the
        validation loss of the untrained network.
    best : float
        The best validation loss reached.
    steps : int
        Steps trained in all.
    cfg : TrainConfig
        The schedule.

    Examples
    --------
    >>> not_learned({"initial": {"loss": 1.0}}, 0.7, 400, TrainConfig()) is None
    True
    >>> print(not_learned({"initial": {"loss": 1.0}}, 1.0, 3, TrainConfig(time_budget=120.0)))
    trained only 3 steps, fewer than one validation interval (100) and its validation loss 1 is no better than the untrained network's 1: the model has likely not learned; train longer (--minutes, --steps; continue with --resume), with smaller patches (--patch), or in 2D (--dims 2)
    """
    initial = (record.get("initial") or {}).get("loss")
    reasons = []
    if steps < cfg.val_interval:
        reasons.append(f"trained only {steps} steps, fewer than one validation interval ({cfg.val_interval})")
    if initial is not None and not best < initial:
        reasons.append(f"its validation loss {best:.4g} is no better than the untrained network's {initial:.4g}")
    if not reasons:
        return None
    return (" and ".join(reasons) + ": the model has likely not learned; train longer (--minutes, --steps; continue "
            "with --resume), with smaller patches (--patch), or in 2D (--dims 2)")


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"generator": gen.get_state(), "torch": torch.get_rng_state()}


def train(
    batches: Iterable[Any],
    val_patches: np.ndarray | torch.Tensor,
    mean: np.ndarray,
    std: np.ndarray,
    model_dir: str | Path,
    model_cfg: ModelConfig,
    mask_cfg: MaskConfig | None = None,
    train_cfg: TrainConfig | dict[str, Any] | None = None,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    sampler: Any = None,
    axes: str = "",
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    init_weights: dict[str, torch.Tensor] | None = None,
    tensorboard: bool = False,
) -> TrainResult:
    """Train an N2V U-Net.

    Parameters
    ----------
    batches : iterable
        Yields raw patches ``(B, C, *patch)`` (numpy or torch, input units).
    val_patches : array
        Fixed validation patches ``(V, C, *patch)`` drawn from held-out data.
    mean, std : numpy.ndarray
        Per-channel normalisation statistics ``(C,)``, stored with the model.
    model_dir : str or Path
        Where checkpoints go.  With ``resume=True`` training continues from it.
    model_cfg, mask_cfg, train_cfg : config dataclasses
        Architecture, masking and schedule.  On resume the stored ones are
        used, with ``train_cfg``'s changes (a mapping, or a TrainConfig's
        fields that differ from the defaults: :func:`~n2v_chunked.model.config.resume_changes`)
        taking effect or refused (:func:`~n2v_chunked.model.config.resumed`).
    resume : bool
        Continue from the checkpoint in ``model_dir``.
    device : str or torch.device, optional
        Defaults to CUDA when present.
    sampler : object, optional
        Source of ``batches`` with ``state_dict()`` / ``load_state_dict()``;
        its state is checkpointed so a resumed run sees the same stream.
    axes : str
        Axes of the training data, recorded for prediction.
    extra_meta : dict, optional
        More provenance for ``config.yaml`` (e.g. the input path).
    progress : bool
        Show a progress bar (rank 0 only).
    init_weights : dict, optional
        State dict to start a new model from (``fit(init_from=...)``).
    tensorboard : bool
        Also write TensorBoard events to ``model_dir/tensorboard`` (needs tensorboard).

    Returns
    -------
    TrainResult
        Steps done, best validation loss, per-validation history, timing.
    """
    info = init_distributed()
    model_dir = Path(model_dir)
    with contextlib.ExitStack() as stack:
        lock = None
        if info.is_main:  # one run per model directory: two would overwrite each other's checkpoints
            lock = stack.enter_context(output_lock(str(model_dir), "a training run"))
        stack.enter_context(preemption.handlers())  # SIGUSR1 (and SIGTERM under SLURM): checkpoint and stop
        return _train(batches, val_patches, mean, std, model_dir, model_cfg, mask_cfg, train_cfg, resume=resume,
                      device=device, sampler=sampler, axes=axes, extra_meta=extra_meta, progress=progress, info=info,
                      init_weights=init_weights, tensorboard=tensorboard, lock=lock)


def _settings(model_dir: Path, model_cfg: ModelConfig, mask_cfg: MaskConfig | None,
              train_cfg: TrainConfig | dict[str, Any] | None, mean: np.ndarray, std: np.ndarray, resume: bool,
              ) -> tuple[ModelConfig, MaskConfig, TrainConfig, np.ndarray, np.ndarray, dict[str, Any] | None,
                         dict[str, Any] | None, bool]:
    """The run's settings: given, or (``resume``) the stored ones with the changes :func:`resumed` allows.

    Returns the three configs, the normalisation, the stored ``config.yaml``
    content and training state (None for a fresh run), and whether ``lr``
    was changed on resume.
    """
    state: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    new_lr = False
    if ckpt.resume_or_start(model_dir, resume):
        meta = ckpt.read_config(model_dir)
        model_cfg, mask_cfg, stored_train = ckpt.configs_from_meta(meta, model_dir / ckpt.CONFIG)
        train_cfg = resumed(stored_train, resume_changes(train_cfg))  # the one resume rule (config.ON_RESUME)
        new_lr = train_cfg.lr != stored_train.lr
        mean = np.asarray(meta["normalization"]["mean"], np.float32)
        std = np.asarray(meta["normalization"]["std"], np.float32)
        if ckpt.never_checkpointed(model_dir):
            log.warning("%s holds no checkpoint (its run stopped before the first one): starting at step 0 with "
                        "its stored settings", model_dir)
        else:
            state = ckpt.load_training_state(model_dir)
        ckpt.remove_stale_temp_files(model_dir)
    elif (model_dir / ckpt.CONFIG).exists():
        if not ckpt.never_checkpointed(model_dir):
            raise OutputExistsError(f"model directory {model_dir} already holds a model; pass --resume to continue it or "
                           "choose another")
        log.warning("%s holds only the config of a run stopped before its first checkpoint: starting afresh",
                    model_dir)
        ckpt.remove_stale_temp_files(model_dir)
    if isinstance(train_cfg, dict):
        raise ConfigError("a mapping of training settings is a resumed run's changes; a new run takes a TrainConfig")
    mask_cfg = mask_cfg or MaskConfig()
    train_cfg = train_cfg or TrainConfig()
    if not train_cfg.patch_size:
        train_cfg = dataclasses.replace(train_cfg, patch_size=default_patch(model_cfg.dims))
    _check_patch(train_cfg.patch_size, model_cfg)
    _log_density(mask_cfg, model_cfg.dims)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (model_cfg.in_channels,) or not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise ConfigError(f"normalisation statistics must be finite with std > 0 for {model_cfg.in_channels} channel(s)")
    return model_cfg, mask_cfg, train_cfg, mean, std, meta, state, new_lr


def _train(
    batches: Iterable[Any], val_patches: np.ndarray | torch.Tensor, mean: np.ndarray, std: np.ndarray,
    model_dir: Path, model_cfg: ModelConfig, mask_cfg: MaskConfig | None,
    train_cfg: TrainConfig | dict[str, Any] | None, *, resume: bool, device: str | torch.device | None, sampler: Any, axes: str, extra_meta: dict[str, Any] | None,
    progress: bool, info: DistInfo, init_weights: dict[str, torch.Tensor] | None = None, tensorboard: bool = False,
    lock: HeldLock | None = None,
) -> TrainResult:
    """The body of :func:`train`, run while the model directory's lock (``lock``) is held."""
    model_cfg, mask_cfg, train_cfg, mean, std, meta, state, new_lr = _settings(
        model_dir, model_cfg, mask_cfg, train_cfg, mean, std, resume)
    device = torch.device(device) if device else default_device(info)
    run = Trainer(model_dir, model_cfg, mask_cfg, train_cfg, mean, std, val_patches, device=device, info=info,
                  sampler=sampler, lock=lock, init_weights=init_weights if state is None else None,
                  tensorboard=tensorboard)
    if state is not None:
        run.restore(state, new_lr)
        if meta is not None and info.is_main:  # the settings that took effect, recorded
            meta["train"] = to_dict(train_cfg)
            ckpt.write_meta(model_dir, meta)
    elif info.is_main:
        raw_val = val_patches.cpu().numpy() if isinstance(val_patches, torch.Tensor) else np.asarray(val_patches)
        meta = ckpt.write_config(
            model_dir, model_cfg, mask_cfg, train_cfg, mean, std, axes=axes,
            model_id=meta.get("model_id") if meta else None, extra=extra_meta, noise_std=noise_std(raw_val),
        )
    run.meta = meta
    return run.run(batches, progress, fresh=state is None)


class Trainer:
    """One training run: the network, its running average, optimiser, schedule, generator and record.

    :meth:`run` is the loop; :meth:`step` one optimiser step, :meth:`evaluate`
    one validation, :meth:`save` one checkpoint and :meth:`restore` the state
    a checkpoint holds, so that a resumed run continues bit for bit.  ``meta``
    (the ``config.yaml`` content, rank 0 only) records validations.
    """

    def __init__(self, model_dir: Path, model_cfg: ModelConfig, mask_cfg: MaskConfig, train_cfg: TrainConfig,
                 mean: np.ndarray, std: np.ndarray, val_patches: np.ndarray | torch.Tensor, *, device: torch.device,
                 info: DistInfo, sampler: Any = None, lock: HeldLock | None = None,
                 init_weights: dict[str, torch.Tensor] | None = None, tensorboard: bool = False) -> None:
        self.model_dir, self.mask_cfg, self.cfg, self.device, self.info = model_dir, mask_cfg, train_cfg, device, info
        self.sampler, self.lock = sampler, lock
        self.meta: dict[str, Any] | None = None
        torch.manual_seed(train_cfg.seed)
        model = UNet(model_cfg)
        if init_weights is not None:
            try:
                model.load_state_dict(init_weights)
            except (RuntimeError, TypeError) as exc:
                raise IncompatibleModelError(f"--init-from: weights do not match their configuration: {first_line(exc)[:160]}") \
                    from None
        self.channels_last = model_cfg.dims == 2  # oneDNN/cuDNN run NHWC convolutions much faster
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimiser, mode="min", factor=0.5, patience=train_cfg.plateau_patience
        )
        # built (and checked finite) before the model directory is written
        self.norm = _normaliser(mean, std, model_cfg.dims, device)
        self.val = validation_set(self.norm(_to_tensor(val_patches, device)), mask_cfg, train_cfg.seed, device)
        if self.channels_last:
            self.val.inputs = self.val.inputs.contiguous(memory_format=torch.channels_last)
        self.gen = torch.Generator(device=device).manual_seed(train_cfg.seed + _RANK_STRIDE * info.rank)
        # the plot, CSV and preview in the model directory, redrawn at each validation (plots.py)
        self.pictures = TrainingPictures(model_dir, self.norm(_to_tensor(val_patches, device)), tensorboard) \
            if info.is_main else None
        # the network validated, plotted and saved: the running average when there is one
        self.averaged = ema_model(self.model, train_cfg.ema) if train_cfg.ema > 0 else None
        self.kept = self.averaged.module if self.averaged is not None else self.model
        self.net: torch.nn.Module = self.model
        if info.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if train_cfg.compile:  # opt-in: the fixed-shape step compiled once (not measured to win yet)
            self.net = torch.compile(self.net)
        self.step_count, self.best, self.history = 0, math.inf, []
        self.local_patches = 0
        self.losses = LateScalar()
        self.last_loss = math.nan  # no step's loss read yet: shown as "-", never checked
        self.current: torch.Tensor | None = None  # the last normalised batch, for a divergence's diagnosis
        self.preempted = False  # stopped by a batch system's warning signal (cluster/preemption.py)

    def restore(self, state: dict[str, Any], new_lr: bool = False) -> None:
        """Continue from a checkpoint's state; ``new_lr``: the configured rate replaces the stored one."""
        self.model.load_state_dict(state["model"])
        if self.averaged is not None and state.get("ema") is not None:  # else the average starts at these weights
            self.averaged.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.patience = self.cfg.plateau_patience  # the stored state holds the first run's
        if new_lr:  # --lr on resume: the rate from here on (a plateau schedule halves it from there)
            for group in self.optimiser.param_groups:
                group["lr"] = self.cfg.lr
        self.step_count, self.best = int(state["step"]), float(state["best_val_loss"])
        self.history = list(state["history"])
        rng = state["rng"]["generator"]
        self.gen.set_state(rng.to("cpu") if self.device.type == "cpu" else rng)
        torch.set_rng_state(state["rng"]["torch"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        log.info("resumed %s at step %d", self.model_dir, self.step_count)

    def save(self) -> None:
        """Write the checkpoint (rank 0): the kept weights and everything a resumed run needs."""
        if not self.info.is_main:
            return
        if self.lock is not None:  # a run whose lock was taken over stops before it overwrites the other's checkpoint
            self.lock.check()
        ckpt.save_weights(self.model_dir, self.kept, ckpt.WEIGHTS_LAST)
        sampler = self.sampler.state_dict(patches_served=self.local_patches) if self.sampler is not None else None
        ckpt.save_training_state(self.model_dir, {
            "model": ckpt.cpu_state(self.model),
            "ema": ckpt.cpu_state(self.averaged) if self.averaged is not None else None,
            "optimizer": self.optimiser.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step_count, "best_val_loss": self.best, "history": self.history, "rng": _rng_state(self.gen),
            "sampler": sampler, "config": {"train": to_dict(self.cfg)},
        })

    def evaluate(self, loss: float, elapsed: float, scheduled: bool = True) -> float:
        """Validate; step the plateau schedule; keep the best weights; record both in config.yaml."""
        val_loss, per_channel = validate(self.kept, self.val, self.cfg.precision, self.cfg.batch_size)
        if self.cfg.schedule == "plateau" and scheduled:
            self.scheduler.step(val_loss)
        self.history.append({"step": self.step_count, "loss": loss, "val_loss": val_loss,
                             "lr": self.optimiser.param_groups[0]["lr"], "seconds": elapsed})
        if not self.info.is_main or self.meta is None:
            return val_loss
        # the interior masked MSE per channel sets the blend weight at prediction (checkpoint.blend_weight)
        record = self.meta.setdefault("validation", {})
        record["last"] = {"step": self.step_count, "mse": per_channel}
        if val_loss < self.best:
            self.best = val_loss
            ckpt.save_weights(self.model_dir, self.kept, ckpt.WEIGHTS_BEST)
            record["best"] = {"step": self.step_count, "mse": per_channel}
        ckpt.write_meta(self.model_dir, self.meta)
        if self.pictures is not None:
            self.pictures.update(self.history, self.kept)
        return val_loss

    def settle(self, read: tuple[int, float] | None) -> None:
        """Take a step's loss read back from the device; stop a diverged run, naming why."""
        if read is not None:
            done, self.last_loss = read
            if not math.isfinite(self.last_loss):
                cause = divergence_cause(self.model, self.current, self.cfg)
                raise N2VError(f"training diverged at step {done} (loss {self.last_loss}): {cause}")

    def set_rate(self, elapsed: float) -> None:
        """The cosine schedule's rate for this step: the budget is the step count or the time, whichever runs out first."""
        progress = (self.step_count + 0.5) / self.cfg.steps  # mid-step: neither the first nor the last rate is 0
        if self.cfg.time_budget:
            progress = max(progress, elapsed / self.cfg.time_budget)
        for group in self.optimiser.param_groups:
            group["lr"] = self.cfg.lr * cosine_factor(progress, self.cfg.warmup)

    def step(self, raw: Any) -> int:
        """One optimiser step on a raw batch; its loss is read a step later (:class:`LateScalar`). Returns its size."""
        x = self.current = self.norm(_to_tensor(raw, self.device))
        masked = augment_and_mask(x, self.mask_cfg, self.gen, self.cfg.augment)
        inputs = masked.inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else masked.inputs
        with autocast_context(self.device, self.cfg.precision):
            pred = self.net(inputs)
        loss = masked_mse(pred, masked)
        self.settle(self.losses.push(self.step_count + 1, loss))  # the previous step's loss: no wait for this one
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        self.step_count += 1
        self.local_patches += x.shape[0]
        return x.shape[0]

    def run(self, batches: Iterable[Any], progress: bool = True, fresh: bool = True) -> TrainResult:
        """Train until the step count, the time budget or early stopping ends the run; validate and save on the way.

        ``fresh``: a new run, whose untrained network is scored first (what
        :func:`not_learned` compares with) and checkpointed at step 0.
        """
        cfg, clock = self.cfg, _clock  # tests replace train._clock with a fake one
        it: Iterator[Any] = iter(batches)
        start_time = clock()
        bar = Progress(cfg.steps, "train", "step", initial=self.step_count, enabled=progress and self.info.is_main,
                       budget=cfg.time_budget or None)
        wait_time, patches = 0.0, 0
        step_seconds = 0.0  # the last step's duration: the estimate of the next one's
        if fresh:
            if self.meta is not None:
                self.meta.setdefault("validation", {})["initial"] = {
                    "loss": validate(self.kept, self.val, cfg.precision, cfg.batch_size)[0]}
            self.save()  # step 0: from now on a killed run can always be resumed
        self.model.train()
        try:
            while self.step_count < cfg.steps:
                t_step = clock()
                if preemption.requested():  # a batch system's warning signal: save (as at a checkpoint) and stop
                    self.preempted = True
                    break
                if not budget_allows(t_step - start_time, step_seconds, cfg.time_budget):
                    log.info("time budget of %.0f s reached at step %d (the next step, about %.0f s, would overrun "
                             "it)", cfg.time_budget, self.step_count, step_seconds)
                    break
                if cfg.schedule == "cosine":
                    self.set_rate(clock() - start_time)
                t0 = clock()
                try:
                    raw = next(it)
                except StopIteration:
                    raise N2VError("the patch source ran dry before training finished") from None
                wait_time += clock() - t0
                patches += self.step(raw) * self.info.world_size
                step = self.step_count
                validated = step % cfg.val_interval == 0 or step == cfg.steps
                checkpoint = step % cfg.checkpoint_interval == 0
                if validated or checkpoint:  # this step's loss is recorded, and a diverged run is never saved
                    self.settle(self.losses.flush())
                elapsed = clock() - start_time
                postfix = {"loss": f"{self.last_loss:.4f}" if math.isfinite(self.last_loss) else "-",
                           "lr": f"{self.optimiser.param_groups[0]['lr']:.1e}", "patch/s": f"{patches / elapsed:.0f}"}
                if validated:
                    postfix["val"] = f"{self.evaluate(self.last_loss, elapsed):.4f}"
                bar.update(1, postfix)
                if checkpoint:
                    self.save()
                step_seconds = clock() - t_step
                if validated and stalled(self.history, cfg.stop_patience):
                    log.info("early stop at step %d: no better validation loss in the last %d validations (best "
                             "%.5g); the best weights are kept (--stop-patience 0 trains all %d steps)",
                             step, cfg.stop_patience, self.best, cfg.steps)
                    break
            self.settle(self.losses.flush())
        finally:
            bar.close()
        return self.finish(clock() - start_time, wait_time, patches)

    def finish(self, seconds: float, wait_time: float, patches: int) -> TrainResult:
        """Validate weights left off the validation grid, record the verdict, save, and sum up.

        A preempted run only saves: an extra validation would enter the history that early stopping
        reads, and the resumed run would differ from one never stopped.
        """
        if self.preempted:
            self.save()
            if self.pictures is not None:
                self.pictures.close()
            raise Preempted(f"stopped at step {self.step_count} of {self.cfg.steps} on {preemption.signal_name()}; "
                            "the training state is saved: rerun with --resume to continue")
        if not self.history or self.history[-1]["step"] != self.step_count:  # stopped early: validate these too
            # off the validation grid: the plateau schedule must not count it, or a resumed run would differ
            self.evaluate(self.last_loss, seconds, scheduled=False)
        warning = None
        if self.meta is not None and self.info.is_main:
            warning = not_learned(self.meta.get("validation", {}), self.best, self.step_count, self.cfg)
            self.meta.pop("not_learned", None)
            if warning:
                self.meta["not_learned"] = warning  # predict repeats it (checkpoint.check_trained)
            ckpt.write_meta(self.model_dir, self.meta)
        self.save()
        if self.pictures is not None:
            self.pictures.close()
        if seconds > 0 and self.info.is_main:
            log.info("data wait %.1f%% of %.1f s", 100 * wait_time / seconds, seconds)
        return TrainResult(self.model_dir, self.step_count, self.best, self.history, seconds,
                           patches / seconds if seconds else 0.0, warning)
