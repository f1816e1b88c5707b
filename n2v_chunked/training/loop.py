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

from ..cluster.progress import Progress
from ..engine.runtimes import autocast_context
from ..engine.transfer import LateScalar, ready, to_device
from ..errors import N2VError, first_line
from ..io.lock import HeldLock, output_lock
from ..model import checkpoint as ckpt
from ..model.config import MaskConfig, ModelConfig, TrainConfig, to_dict
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
        raise N2VError(f"patch_size {patch} has {len(patch)} axes but the model is {model_cfg.dims}D")
    bad = [p for p in patch if p % m]
    if bad:
        raise N2VError(f"patch_size {patch} must be a multiple of 2**depth = {m} along every axis")


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
        raise N2VError("training batch contains NaN or Inf values; clean the data or use a foreground filter")
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
    train_cfg: TrainConfig | None = None,
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
        Architecture, masking and schedule; on resume the stored ones are used.
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
        return _train(batches, val_patches, mean, std, model_dir, model_cfg, mask_cfg, train_cfg, resume=resume,
                      device=device, sampler=sampler, axes=axes, extra_meta=extra_meta, progress=progress, info=info,
                      init_weights=init_weights, tensorboard=tensorboard, lock=lock)


def _train(
    batches: Iterable[Any], val_patches: np.ndarray | torch.Tensor, mean: np.ndarray, std: np.ndarray,
    model_dir: Path, model_cfg: ModelConfig, mask_cfg: MaskConfig | None, train_cfg: TrainConfig | None, *,
    resume: bool, device: str | torch.device | None, sampler: Any, axes: str, extra_meta: dict[str, Any] | None,
    progress: bool, info: DistInfo, init_weights: dict[str, torch.Tensor] | None = None, tensorboard: bool = False,
    lock: HeldLock | None = None,
) -> TrainResult:
    """The body of :func:`train`, run while the model directory's lock (``lock``) is held."""
    mask_cfg = mask_cfg or MaskConfig()
    train_cfg = train_cfg or TrainConfig()
    state: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    model_id = None
    if resume:
        meta = ckpt.read_config(model_dir)
        model_cfg, mask_cfg, stored_train = ckpt.configs_from_meta(meta, model_dir / ckpt.CONFIG)
        # the step and time budgets and early stopping may change on resume; the rest is fixed
        train_cfg = dataclasses.replace(stored_train, steps=train_cfg.steps, time_budget=train_cfg.time_budget,
                                        stop_patience=train_cfg.stop_patience, compile=train_cfg.compile)
        mean = np.asarray(meta["normalization"]["mean"], np.float32)
        std = np.asarray(meta["normalization"]["std"], np.float32)
        model_id = meta.get("model_id")
        if ckpt.never_checkpointed(model_dir):
            log.warning("%s holds no checkpoint (its run stopped before the first one): starting at step 0 with "
                        "its stored settings", model_dir)
        else:
            state = ckpt.load_training_state(model_dir)
        ckpt.remove_stale_temp_files(model_dir)
    elif (model_dir / ckpt.CONFIG).exists():
        if not ckpt.never_checkpointed(model_dir):
            raise N2VError(f"model directory {model_dir} already holds a model; pass --resume to continue it or "
                           "choose another")
        log.warning("%s holds only the config of a run stopped before its first checkpoint: starting afresh",
                    model_dir)
        ckpt.remove_stale_temp_files(model_dir)
    if not train_cfg.patch_size:
        train_cfg = dataclasses.replace(train_cfg, patch_size=default_patch(model_cfg.dims))
    _check_patch(train_cfg.patch_size, model_cfg)
    _log_density(mask_cfg, model_cfg.dims)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (model_cfg.in_channels,) or not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise N2VError(f"normalisation statistics must be finite with std > 0 for {model_cfg.in_channels} channel(s)")

    device = torch.device(device) if device else default_device(info)
    torch.manual_seed(train_cfg.seed)
    model = UNet(model_cfg)
    if init_weights is not None and state is None:
        try:
            model.load_state_dict(init_weights)
        except (RuntimeError, TypeError) as exc:
            raise N2VError(f"--init-from: weights do not match their configuration: {first_line(exc)[:160]}") from None
    model = model.to(device)
    channels_last = model_cfg.dims == 2  # oneDNN/cuDNN run NHWC convolutions much faster
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=0.5, patience=train_cfg.plateau_patience
    )
    # built (and checked finite) before the model directory is written
    norm = _normaliser(mean, std, model_cfg.dims, device)
    val = validation_set(norm(_to_tensor(val_patches, device)), mask_cfg, train_cfg.seed, device)
    if channels_last:
        val.inputs = val.inputs.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(train_cfg.seed + _RANK_STRIDE * info.rank)
    # the plot, CSV and preview in the model directory, redrawn at each validation (plots.py)
    pictures = TrainingPictures(model_dir, norm(_to_tensor(val_patches, device)), tensorboard) \
        if info.is_main else None
    # the network validated, plotted and saved: the running average when there is one
    averaged = ema_model(model, train_cfg.ema) if train_cfg.ema > 0 else None
    kept = averaged.module if averaged is not None else model
    step, best, history = 0, math.inf, []
    if state is not None:
        model.load_state_dict(state["model"])
        if averaged is not None and state.get("ema") is not None:  # else the average starts at these weights
            averaged.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, history = int(state["step"]), float(state["best_val_loss"]), list(state["history"])
        gen.set_state(state["rng"]["generator"].to("cpu") if device.type == "cpu" else state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if sampler is not None and state.get("sampler") is not None:
            sampler.load_state_dict(state["sampler"])
        log.info("resumed %s at step %d", model_dir, step)
    elif info.is_main:
        raw_val = val_patches.cpu().numpy() if isinstance(val_patches, torch.Tensor) else np.asarray(val_patches)
        meta = ckpt.write_config(
            model_dir, model_cfg, mask_cfg, train_cfg, mean, std, axes=axes, model_id=model_id, extra=extra_meta,
            noise_std=noise_std(raw_val),
        )
        model_id = meta["model_id"]

    net: torch.nn.Module = model
    if info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if train_cfg.compile:  # opt-in: the fixed-shape step compiled once (not measured to win yet)
        net = torch.compile(net)

    def save() -> None:
        if not info.is_main:
            return
        if lock is not None:  # a run whose lock was taken over stops before it overwrites the other's checkpoint
            lock.check()
        ckpt.save_weights(model_dir, kept, ckpt.WEIGHTS_LAST)
        ckpt.save_training_state(
            model_dir,
            {
                "model": ckpt.cpu_state(model),
                "ema": ckpt.cpu_state(averaged) if averaged is not None else None,
                "optimizer": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "best_val_loss": best,
                "history": history,
                "rng": _rng_state(gen),
                "sampler": sampler.state_dict(patches_served=local_patches) if sampler is not None else None,
                "config": {"train": to_dict(train_cfg)},
            },
        )

    def evaluate(loss: float, elapsed: float, scheduled: bool = True) -> float:
        """Validate; step the plateau schedule; keep the best weights; record both in config.yaml."""
        nonlocal best
        val_loss, per_channel = validate(kept, val, train_cfg.precision, train_cfg.batch_size)
        if train_cfg.schedule == "plateau" and scheduled:
            scheduler.step(val_loss)
        history.append({"step": step, "loss": loss, "val_loss": val_loss,
                        "lr": optimiser.param_groups[0]["lr"], "seconds": elapsed})
        if not info.is_main or meta is None:
            return val_loss
        # the interior masked MSE per channel sets the blend weight at prediction (checkpoint.blend_weight)
        record = meta.setdefault("validation", {})
        record["last"] = {"step": step, "mse": per_channel}
        if val_loss < best:
            best = val_loss
            ckpt.save_weights(model_dir, kept, ckpt.WEIGHTS_BEST)
            record["best"] = {"step": step, "mse": per_channel}
        ckpt.write_meta(model_dir, meta)
        if pictures is not None:
            pictures.update(history, kept)
        return val_loss

    losses = LateScalar()

    def settle(read: tuple[int, float] | None) -> None:
        """Take a step's loss read back from the device; stop a diverged run."""
        nonlocal last_loss
        if read is not None:
            done, last_loss = read
            if not math.isfinite(last_loss):
                raise N2VError(f"training diverged at step {done} (loss {last_loss}); lower the learning rate")

    it: Iterator[Any] = iter(batches)
    bar = Progress(train_cfg.steps, "train", "step", initial=step, enabled=progress and info.is_main)
    start_time = time.perf_counter()
    wait_time, patches, local_patches = 0.0, 0, 0
    last_loss = float("nan")
    if state is None:
        save()  # step 0: from now on a killed run can always be resumed
    model.train()
    try:
        while step < train_cfg.steps:
            if train_cfg.time_budget and time.perf_counter() - start_time > train_cfg.time_budget:
                log.info("time budget of %.0f s reached at step %d", train_cfg.time_budget, step)
                break
            if train_cfg.schedule == "cosine":
                # the budget is the step count or the time, whichever runs out first
                progress = (step + 0.5) / train_cfg.steps  # mid-step: neither the first nor the last rate is 0
                if train_cfg.time_budget:
                    progress = max(progress, (time.perf_counter() - start_time) / train_cfg.time_budget)
                for group in optimiser.param_groups:
                    group["lr"] = train_cfg.lr * cosine_factor(progress, train_cfg.warmup)
            t0 = time.perf_counter()
            try:
                raw = next(it)
            except StopIteration:
                raise N2VError("the patch source ran dry before training finished") from None
            x = norm(_to_tensor(raw, device))
            wait_time += time.perf_counter() - t0
            masked = augment_and_mask(x, mask_cfg, gen, train_cfg.augment)
            inputs = masked.inputs.contiguous(memory_format=torch.channels_last) if channels_last else masked.inputs
            with autocast_context(device, train_cfg.precision):
                pred = net(inputs)
            loss = masked_mse(pred, masked)
            settle(losses.push(step + 1, loss))  # the previous step's loss: no wait for this one
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            patches += x.shape[0] * info.world_size
            local_patches += x.shape[0]
            validated = step % train_cfg.val_interval == 0 or step == train_cfg.steps
            checkpoint = step % train_cfg.checkpoint_interval == 0
            if validated or checkpoint:  # this step's loss is recorded, and a diverged run is never saved
                settle(losses.flush())
            elapsed = time.perf_counter() - start_time
            postfix = {"loss": f"{last_loss:.4f}", "lr": f"{optimiser.param_groups[0]['lr']:.1e}",
                       "patch/s": f"{patches / elapsed:.0f}"}
            if validated:
                postfix["val"] = f"{evaluate(last_loss, elapsed):.4f}"
            bar.update(1, postfix)
            if checkpoint:
                save()
            if validated and stalled(history, train_cfg.stop_patience):
                log.info("early stop at step %d: no better validation loss in the last %d validations (best %.5g); "
                         "the best weights are kept (--stop-patience 0 trains all %d steps)",
                         step, train_cfg.stop_patience, best, train_cfg.steps)
                break
        settle(losses.flush())
    finally:
        bar.close()
    if not history or history[-1]["step"] != step:  # stopped early: validate the final weights too
        # off the validation grid: the plateau schedule must not count it, or a resumed run would differ
        evaluate(last_loss, time.perf_counter() - start_time, scheduled=False)
    save()
    if pictures is not None:
        pictures.close()
    seconds = time.perf_counter() - start_time
    if seconds > 0 and info.is_main:
        log.info("data wait %.1f%% of %.1f s", 100 * wait_time / seconds, seconds)
    return TrainResult(model_dir, step, best, history, seconds, patches / seconds if seconds else 0.0)
