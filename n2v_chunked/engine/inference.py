"""Running a trained network on arrays: padding, batching, precision, TTA.

The one function that turns normalised pixels into predictions,
:func:`run_network`, serves every caller: the whole-image :func:`denoise`,
chunked prediction (one call per dask block) and validation.  Its batch size
comes from a pixel budget derived from the device's free memory, never from
the training batch size (a classic cause of GPU out-of-memory in tiled
prediction).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, IncompatibleModelError, N2VError
from ..model.checkpoint import Trained
from ..model.intensity import resolve_normalize
from ..model.normalization import channel_stats
from ..model.unet import BYTES_PER_PIXEL_FEATURE
from .padding import NUMPY_PAD_MODE, pad_border
from .runtimes import get_runner, resolve
from .symmetry import dihedral
from .transfer import compute_done, ready, to_device, to_host


def pixel_budget(trained: Trained, device: torch.device | None = None) -> int:
    """Pixels one forward pass may hold, from the device's free memory.

    Parameters
    ----------
    trained : Trained
        The model (its width sets the cost per pixel).
    device : torch.device, optional
        Defaults to the model's device.

    Returns
    -------
    int
        Maximum number of input pixels (summed over the batch) per forward pass.
    """
    device = device or trained.device
    per_pixel = BYTES_PER_PIXEL_FEATURE * trained.contract.features
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(0.5 * free) // per_pixel)
    return max(1, (1 << 30) // per_pixel)  # CPU: about 1 GiB of activations


_NO_OP = contextlib.nullcontext()
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_STATE_LOCK = threading.Lock()
_IEEE_USERS = [0, None]  # [active contexts, the setting to restore]


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in true float32 on CUDA while inside (TF32 is PyTorch's default).

    ``precision="fp32"`` promises float32 results; TF32 rounds the operands to
    10 mantissa bits.  The setting is process-wide, so it is reference-counted:
    dask threads predicting blocks at once neither race on it nor restore it
    under each other's feet.
    """
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")  # torch >= 2.9

    def setting(value=None):
        if value is None:
            return conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
        if new_api:
            conv.fp32_precision = value
        else:
            torch.backends.cudnn.allow_tf32 = value

    with _STATE_LOCK:
        if _IEEE_USERS[0] == 0:
            _IEEE_USERS[1] = setting()
            setting("ieee" if new_api else False)
        _IEEE_USERS[0] += 1
    try:
        yield
    finally:
        with _STATE_LOCK:
            _IEEE_USERS[0] -= 1
            if _IEEE_USERS[0] == 0:
                setting(_IEEE_USERS[1])


def pad_to_multiple(x: torch.Tensor, multiples: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``(N, C, *spatial)`` at their ends to a multiple each.

    Returns the padded tensor and the slices that crop the result back.
    """
    spatial = x.shape[2:]
    extra = [(-s) % m for s, m in zip(spatial, multiples)]
    if not any(extra):
        return x, tuple(slice(None) for _ in spatial)
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    mode = "replicate" if all(e < s for e, s in zip(extra, spatial)) else "constant"
    return F.pad(x, pad, mode=mode), tuple(slice(0, s) for s in spatial)


def pad_multiples(trained: Trained, runner: Callable[[torch.Tensor], torch.Tensor], tta: bool) -> list[int]:
    """What each spatial axis is padded to a multiple of: the model's grid step, and the runner's fast width.

    A runner's ``width_multiple`` (:mod:`n2v_chunked.engine.runtimes`) applies to the
    last axis, and with TTA to the last two (its rotations swap them).  Padding
    at the end changes no kept pixel: they lie a halo away from it, and the
    pooling grid still starts at the block's start.
    """
    grid = trained.contract.grid
    # with TTA the rotations swap y and x: both get the same (common) step
    out = list(grid[:-2]) + [math.lcm(*grid[-2:])] * 2 if tta else list(grid)
    width = getattr(runner, "width_multiple", 1)
    for ax in range(-2 if tta else -1, 0):
        out[ax] = math.lcm(out[ax], width)
    return out


@torch.inference_mode()
def run_network(
    trained: Trained,
    x: np.ndarray | torch.Tensor,
    *,
    max_pixels: int | None = None,
    precision: str = "fp32",
    tta: bool = False,
    blend: bool = False,
    runtime: str = "torch",
) -> np.ndarray:
    """Predict normalised ``(N, C, *spatial)`` data, any spatial size.

    Parameters
    ----------
    trained : Trained
        Loaded model.
    x : numpy.ndarray or torch.Tensor
        Normalised input, float32.
    max_pixels : int, optional
        Pixel budget per forward pass (default: :func:`pixel_budget`).
    precision : {"fp32", "bf16", "fp16", "auto"}
        Arithmetic of the forward pass (see :func:`n2v_chunked.engine.runtimes.resolve`).
    tta : bool
        Average the 8 rotations/flips of the YX plane.
    blend : bool
        Mix the prediction with the noisy input, pixel by pixel, with the
        model's per-channel weight (:func:`n2v_chunked.model.checkpoint.blend_weight`):
        the minimum-MSE estimate when the noise is pixel-independent.
    runtime : {"torch", "torch-compile", "openvino", "onnxruntime", "auto"}
        Engine of the forward pass (:mod:`n2v_chunked.engine.runtimes`).

    Returns
    -------
    numpy.ndarray
        Float32 prediction, same shape as ``x``.
    """
    device = trained.device
    weight = blend_tensor(trained) if blend else None
    runtime, precision = resolve(runtime, precision, device)
    runner = get_runner(trained.model, device, runtime, precision, trained.contract)
    strict = ieee_fp32(device) if precision == "fp32" else _NO_OP
    xt = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float32)
    # The copies run outside the lock, on this thread's side stream: one block's input lands on the GPU
    # and another's output leaves it while the GPU computes a third (:mod:`n2v_chunked.engine.transfer`).
    staged = to_device(xt, device)
    with device_lock(device), strict:  # threads sharing a GPU take turns: each sizes its batch from the free memory
        y = _run(trained, runner, device, ready(*staged), max_pixels, tta, weight)
        done = compute_done(y.device)  # only queued: the lock is released before the GPU has finished
    return to_host(y, done)


def device_lock(device: torch.device) -> contextlib.AbstractContextManager:
    """A lock per CUDA device (a no-op context on CPU, where threads split the cores instead)."""
    if device.type != "cuda":
        return _NO_OP
    with _STATE_LOCK:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


def _run(trained: Trained, runner: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
         xt: torch.Tensor, max_pixels: int | None, tta: bool, weight: torch.Tensor | None) -> torch.Tensor:
    """The body of :func:`run_network`: batches within the pixel budget, TTA, blending.

    The result lies where ``xt`` does (the GPU for torch on CUDA, else the host).
    """
    n = xt.shape[0]
    per_item = math.prod(xt.shape[1:]) // xt.shape[1]
    step = max(1, (max_pixels or pixel_budget(trained, device)) // max(per_item, 1))
    out = torch.empty_like(xt)
    ks = range(8) if tta else range(1)
    multiples = pad_multiples(trained, runner, tta)
    out_channels = trained.contract.out_channels
    for start in range(0, n, step):
        part = xt[start : start + step].to(device)
        # Pad once, before any rotation: a rotation maps the padded end onto the start, so
        # padding after it would shift the pooling grid by an amount that depends on the
        # block's length, and chunked prediction would no longer equal whole-image prediction.
        padded, crop = pad_to_multiple(part, multiples)
        acc = None  # the sum over TTA's symmetries (without TTA the runner's output itself: no extra pass)
        for k in ks:
            xk = dihedral(padded, k) if tta else padded
            y = _checked(runner(xk), xk, out_channels).to(device, non_blocking=True)  # ONNX runtimes answer on the CPU
            y = dihedral(y.float(), k, inverse=True) if tta else y.float()
            acc = y if acc is None else acc + y
        y = acc[(slice(None), slice(None), *crop)]
        if tta:
            y = y / len(ks)
        if weight is not None:
            w = weight.to(device)
            y = w * y + (1.0 - w) * part
        out[start : start + step].copy_(y)
    return out


def _checked(y: torch.Tensor, x: torch.Tensor, channels: int) -> torch.Tensor:
    """The runner's output, refused unless it has the shape the contract promises (never an empty tensor)."""
    want = (x.shape[0], channels, *x.shape[2:])
    if tuple(y.shape) != want:
        raise N2VError(f"the network returned shape {tuple(y.shape)} for input {tuple(x.shape)} (expected {want}); "
                       "rerun with --runtime torch")
    return y


def blend_tensor(trained: Trained) -> torch.Tensor:
    """The model's blend weight as a ``(1, C, 1, ...)`` tensor; one clear line when it has none."""
    if trained.blend_weight is None:
        raise IncompatibleModelError(
            "cannot blend: the model has no noise level or validation record (trained by an older version, "
            "or not validated yet); predict without --blend, or retrain it"
        )
    w = torch.as_tensor(np.asarray(trained.blend_weight, np.float32))
    return w.reshape(1, -1, *([1] * trained.contract.dims))


def denoise(
    trained: Trained,
    x: np.ndarray,
    *,
    boundary: str = "reflect",
    precision: str = "fp32",
    tta: bool = False,
    blend: bool = False,
    max_pixels: int | None = None,
    runtime: str = "torch",
    normalize: str = "auto",
) -> np.ndarray:
    """Denoise in-memory data of shape ``(N, C, *spatial)`` in input units.

    The image is padded by the halo with the ``boundary`` mode (dask's names),
    exactly as chunked prediction pads a block at the image border, so
    chunked and whole-image results agree.

    Parameters
    ----------
    trained : Trained
        Loaded model; its dimensionality and channels must match ``x``.
    x : numpy.ndarray
        Noisy data ``(N, C, *spatial)``.
    boundary : {"reflect", "nearest", "periodic", "constant"}
        How to extend the image beyond its borders.
    precision, tta, blend, max_pixels, runtime
        See :func:`run_network`.
    normalize : {"auto", "model", "data"}
        The model's stored statistics, or the input's own mean and std per
        channel (over all of ``x``); ``"auto"``: as the model was trained (its contract's
        ``normalize``), as :func:`n2v_chunked.predict` does.

    Returns
    -------
    numpy.ndarray
        Float32 denoised data in input units, same shape as ``x``.
    """
    con = trained.contract
    if x.ndim != con.dims + 2:
        raise IncompatibleModelError(f"model is {con.dims}D but data has {x.ndim - 2} spatial dims")
    if x.shape[1] != con.in_channels:
        raise IncompatibleModelError(f"model expects {con.in_channels} channel(s), data has {x.shape[1]}")
    if boundary not in NUMPY_PAD_MODE:
        raise ConfigError(f"unknown boundary mode {boundary!r}; use one of {sorted(NUMPY_PAD_MODE)}")
    if resolve_normalize(normalize, con.normalize) == "data":  # the input's own, as predict samples them
        mean, std = channel_stats(x, ("n", "c", *con.spatial))
    else:
        mean, std = trained.mean, trained.std
    mean = np.asarray(mean, np.float32).reshape(1, -1, *([1] * con.dims))
    std = np.asarray(std, np.float32).reshape(1, -1, *([1] * con.dims))
    halo = con.halo
    xn = (np.asarray(x, dtype=np.float32) - mean) / std
    padded = pad_border(xn, [(0, 0), (0, 0), *[(h, h) for h in halo]], boundary)
    y = run_network(trained, padded, max_pixels=max_pixels, precision=precision, tta=tta, blend=blend,
                    runtime=runtime)
    y = y[(slice(None), slice(None), *[slice(h, h + s) for h, s in zip(halo, x.shape[2:])])]
    return (y * std + mean).astype(np.float32)
