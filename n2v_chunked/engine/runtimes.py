"""Which engine runs the network, and in which arithmetic.

:func:`resolve` turns the user's ``runtime``/``precision`` (``auto`` or a
name) into what this device can run; :func:`get_runner` turns a loaded model
into a *runner*: a callable from a padded ``(N, C, *spatial)`` float32 tensor
to the network's float32 output (a new tensor), with an optional
``width_multiple`` attribute (the last axis's size multiple at which it runs
fastest).  Everything around the network call (padding, batching, TTA,
blending) stays in :mod:`n2v_chunked.engine.inference`, so it works
with every runtime.

Runtimes:

- ``torch``: eager PyTorch; channels-last for 2D, autocast for bf16/fp16;
  on CUDA cuDNN autotuning (blocks have a few fixed shapes).
- ``torch-compile``: the same, through ``torch.compile`` (one graph per
  block shape).  Opt-in only, never ``auto``: it made CPU inference slower in
  one probe (issue 15) and is not measured on a GPU yet.
- ``openvino``: the network exported to ONNX once per process, compiled
  with dynamic shapes (no recompile per block shape) and
  ``INFERENCE_PRECISION_HINT`` f32/bf16/f16 (bf16 uses AMX where present).
- ``onnxruntime``: the same ONNX graph, fp32 only.

Measured on a 2-core AVX-512 BF16/AMX CPU, depth-2 32-feature U-Net, 1024^2
tile (issue 15): torch NCHW fp32 0.46 MPix/s, torch channels-last bf16 1.44,
ONNX Runtime fp32 1.42, OpenVINO f32 1.43, OpenVINO bf16 6.50.  Hence
``auto`` = OpenVINO on CPU when installed, else ONNX Runtime for fp32, else
torch; torch on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import torch

from ..errors import ConfigError, N2VError, first_line
from ..model.architecture import N2VUNet

log = logging.getLogger(__name__)

Runtime = Literal["auto", "torch", "torch-compile", "openvino", "onnxruntime"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# what each runtime can run (ONNX Runtime's CPU provider has no bf16/fp16 convolutions)
SUPPORTED = {"torch": ("fp32", "bf16", "fp16"), "torch-compile": ("fp32", "bf16", "fp16"),
             "openvino": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32",)}
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}

Runner = Callable[[torch.Tensor], torch.Tensor]
_WARNED: set[str] = set()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX).

    Asks torch first, then the kernel's CPU flags (older torch builds lack
    the probes).  Without native bf16, autocast emulates it and is slower
    than fp32.
    """
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if probe is not None and probe():
                return True
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (and supported), else a no-op context (training's mixed precision)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
        if not ok:
            return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def openvino_precisions() -> tuple[str, ...]:
    """The precisions OpenVINO's CPU plugin really runs here (its ``OPTIMIZATION_CAPABILITIES``).

    Without native bf16/fp16 the plugin ignores the precision hint and runs
    f32, so asking for bf16 there would be an option silently dropped.
    """
    import openvino as ov

    caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return ("fp32",) + tuple(p for p, cap in (("bf16", "BF16"), ("fp16", "FP16")) if cap in caps)


def can_run(runtime: str, precision: str) -> bool:
    """Whether ``runtime`` (installed) runs ``precision`` on this machine's CPU, not only in principle."""
    if precision not in SUPPORTED[runtime]:
        return False
    return runtime != "openvino" or precision in openvino_precisions()


def installed(runtime: str) -> bool:
    """Whether the runtime's package can be imported here (torch always can)."""
    return runtime.startswith("torch") or importlib.util.find_spec(runtime) is not None


def resolve(runtime: str, precision: str, device: str | torch.device | None = None) -> tuple[str, str]:
    """The ``(runtime, precision)`` that ``auto`` stands for on ``device``.

    Parameters
    ----------
    runtime : {"auto", "torch", "torch-compile", "openvino", "onnxruntime"}
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``auto``: bf16 where the hardware has it (CUDA with bf16, CPUs with
        AVX-512 BF16/AMX), else fp32.  bf16 passed the quality bar (PSNR
        within 0.05 dB of fp32, see ``benchmarks/precision.py``).
    device : str or torch.device, optional
        Defaults to CUDA when available, else CPU.

    Returns
    -------
    tuple of str
        Concrete runtime and precision.  A named runtime that is not
        installed falls back to torch with one WARNING line.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if runtime != "auto" and cuda and not runtime.startswith("torch"):
        raise ConfigError(f"runtime {runtime} runs on CPU only; use --runtime torch (or auto) with device {dev}")
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()
        precision = "bf16" if fast else "fp32"
    if runtime == "auto":
        if cuda:
            runtime = "torch"
        elif installed("openvino") and can_run("openvino", precision):
            runtime = "openvino"
        elif installed("onnxruntime") and precision == "fp32":
            runtime = "onnxruntime"
        else:
            runtime = "torch"
    if precision not in SUPPORTED[runtime]:
        raise ConfigError(f"runtime {runtime} cannot run precision {precision}; "
                       f"use --precision {' or '.join(SUPPORTED[runtime])}, or another --runtime")
    if runtime == "openvino" and installed(runtime) and not can_run(runtime, precision):
        raise ConfigError(f"runtime openvino cannot run precision {precision} on this CPU (OpenVINO runs "
                       f"{', '.join(openvino_precisions())} here: no native {precision}); use --precision "
                       f"{' or '.join(openvino_precisions())}, or --runtime torch (emulated {precision}, slower)")
    if not installed(runtime):
        if runtime not in _WARNED:  # once per process, not once per block
            _WARNED.add(runtime)
            log.warning("runtime %s is not installed (pip install %s); using torch, which is slower on CPUs",
                        runtime, runtime)
        runtime = "torch"
    return runtime, precision


# ----------------------------------------------------------------------------
# Runners, one per (model, runtime, precision, threads) and process.
# ----------------------------------------------------------------------------

_RUNNERS: dict[tuple, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(model: torch.nn.Module, device: torch.device, runtime: str, precision: str,
               contract: Any = None) -> Runner:
    """A cached runner for ``model`` with a concrete runtime and precision (see :func:`resolve`).

    ``contract`` (:class:`n2v_chunked.model.contract.ModelContract`) gives
    the ONNX export its channels and dimensions (default: read from ``model``).

    The cache key holds the model object itself (a retrained model is a new
    object, see ``predict.blocks.get_model``) and the process's torch thread count,
    which the ONNX runtimes copy at compile time so that dask threads and the
    runtime's threads do not oversubscribe the cores.
    """
    threads = torch.get_num_threads()
    key = (id(model), str(device), runtime, precision, threads)
    runner = _RUNNERS.get(key)
    if runner is None:
        with _RUNNERS_LOCK:
            runner = _RUNNERS.get(key)
            if runner is None:
                for k in [k for k in _RUNNERS if k[0] == key[0] and k[1:] != key[1:] and not k[2].startswith("torch")]:
                    del _RUNNERS[k]  # a compiled model per thread count is enough
                runner = _build(model, device, runtime, precision, threads, contract)
                _RUNNERS[key] = runner
                # keep the model alive as long as its key: id() is reused after garbage collection
                runner.model = model  # type: ignore[attr-defined]
    return runner


def _build(model: torch.nn.Module, device: torch.device, runtime: str, precision: str, threads: int,
           contract: Any = None) -> Runner:
    if runtime.startswith("torch"):
        return _torch_runner(model, device, precision, compiled=runtime == "torch-compile")
    try:
        onnx = export_onnx(model, contract)
        if runtime == "openvino":
            return _openvino_runner(onnx, precision, threads)
        return _onnxruntime_runner(onnx, threads)
    except Exception as exc:  # a runtime that imports but cannot load this network
        first = first_line(exc) or type(exc).__name__
        raise N2VError(f"runtime {runtime} could not load the network ({first}); "
                       "rerun with --runtime torch") from exc


def _torch_runner(model: torch.nn.Module, device: torch.device, precision: str, compiled: bool = False) -> Runner:
    """Torch: channels-last in 2D (oneDNN/cuDNN's fast layout), autocast for bf16/fp16; ``compiled``: torch.compile.

    Only our U-Net changes layout; another network (a Zoo model's pipeline) runs as it is.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few fixed block shapes: autotune once per shape
    # 2D only: channels-last-3d is not measured yet for the 3D U-Net, so 3D keeps the default layout
    ours_2d = isinstance(model, N2VUNet) and _is_2d(model)
    net = model.eval()
    if ours_2d:  # its own copy: the memory format is a property of the weights
        net = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    dtype = _DTYPE.get(precision)
    if compiled:  # static shapes: blocks come in a few fixed shapes, each compiled once
        net = torch.compile(net, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        if ours_2d:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            return net(x).float().contiguous()

    return run


def _first_conv(net: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


def _is_2d(net: torch.nn.Module) -> bool:
    return isinstance(_first_conv(net), torch.nn.Conv2d)


def _module_io(net: torch.nn.Module) -> tuple[int, int, bool]:
    """``(dims, channels, independent)`` of a network without a contract: our U-Net's config, else its first layer."""
    cfg = getattr(net, "cfg", None)
    if cfg is not None:
        return cfg.dims, cfg.in_channels, cfg.independent_channels
    return (2 if _is_2d(net) else 3), _first_conv(net).in_channels, False


def export_onnx(model: torch.nn.Module, contract: Any = None) -> bytes:
    """The network as ONNX bytes (exported on CPU, in float32).

    Batch and spatial sizes are dynamic; the channel axis has the contract's
    channel count, and is dynamic too where one network serves every channel
    independently (``contract.independent_channels``).
    """
    net = copy.deepcopy(model).float().cpu().eval()
    if contract is not None:
        nd, channels, independent = contract.dims, contract.in_channels, contract.independent_channels
    else:
        nd, channels, independent = _module_io(net)
    x = torch.zeros((1, channels) + (16,) * nd)
    axes = {0: "n", **({1: "c"} if independent else {}), **{2 + i: f"s{i}" for i in range(nd)}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes, "y": axes}, opset_version=17)
    return buf.getvalue()


def _openvino_runner(onnx: bytes, precision: str, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(onnx, b""), "CPU", {
        "INFERENCE_PRECISION_HINT": _OV_HINT[precision], "INFERENCE_NUM_THREADS": threads,
        # OpenVINO pins its inference threads to the first cores it may use; every single-threaded
        # dask worker process then runs on the same core (two workers on 2 cores ran at 0.51x one
        # process with 2 threads; unpinned at 1.05x).  The OS places the processes' threads.
        "ENABLE_CPU_PINNING": False,
    })
    # The bindings' first numpy view of a tensor (``Tensor.data``) initialises a C++ static that waits for
    # the GIL: two dask threads making that first call at once deadlock (one holds the GIL and waits for
    # the static, the other holds the static and waits for the GIL; 4 of 8 fresh processes hung).  Make
    # it here, once, in the one thread that builds runners (get_runner holds its lock).
    _ = ov.Tensor(np.zeros(1, np.float32)).data
    local = threading.local()  # an infer request is not thread-safe; one per dask thread

    def run(x: torch.Tensor) -> torch.Tensor:
        req = getattr(local, "req", None)
        if req is None:
            req = local.req = compiled.create_infer_request()
        y = req.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.array(y, dtype=np.float32, copy=True))  # the request reuses its buffer

    if precision == "bf16":
        # AMX bf16 convolutions are up to 13% slower per pixel at some widths (1048, 1072, 1096 of
        # 1024-1152) and at their fastest at multiples of 32; the height does not matter (issue 15)
        run.width_multiple = 32  # type: ignore[attr-defined]
    return run


def _onnxruntime_runner(onnx: bytes, threads: int) -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(y)

    return run


@functools.lru_cache(maxsize=None)
def describe(runtime: str, precision: str) -> str:
    """One line for logs: ``openvino bf16`` and which package version runs it."""
    if runtime.startswith("torch"):
        return f"{runtime} {torch.__version__} {precision}"
    with contextlib.suppress(Exception):
        mod = __import__(runtime)
        return f"{runtime} {getattr(mod, '__version__', '?')} {precision}"
    return f"{runtime} {precision}"
