"""Any BioImage Model Zoo model as a block function for chunked prediction.

:mod:`n2v_chunked.prediction` turns a loaded model into a per-block function
(normalise, run the network, undo the normalisation, crop the halo).  A model
directory is one provider of such a model; a Zoo package is the second: a
``.zip`` or a folder holding ``rdf.yaml``/``bioimageio.yaml``, with one image
input and one image output on the same spatial grid, 2D or 3D, and
``pytorch_state_dict`` or ``torchscript`` weights.

:func:`prepare` reads and checks the description once, on the client (with
:mod:`n2v_chunked.zoo.spec`), and returns a :class:`ZooRef`: a small picklable
value that the dask workers load with :func:`load` (once per process, through
``predict.blocks.get_model``).  The
loaded :class:`ZooTrained` looks like a model directory's
:class:`~n2v_chunked.model.checkpoint.Trained` whose normalisation is the identity
and whose network is the Zoo model with its own pre- and post-processing,
run by ``bioimageio.core``'s prediction pipeline on each block.

Processing that depends on statistics of the sample (e.g.
``zero_mean_unit_variance`` or ``scale_range`` per sample) is not
block-invariant: computed per block it would change from block to block and
leave seams.  :func:`prepare` computes such statistics once over the whole
input (from a random sample of its chunks when it is larger than
:data:`STATS_MAX_BYTES`) and replaces the operation by its fixed equivalent
(``fixed_zero_mean_unit_variance``, ``scale_linear``), so every block is
processed alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, IncompatibleModelError, N2VError, first_line
from ..model.checkpoint import Trained
from ..model.config import ModelConfig
from ..model.unet import UNet, halo_width, size_multiple
from ..model.contract import ModelContract, round_up
from .spec import RDF_NAMES, ZooSpec, inspect_description, is_zoo_package, read_description

STATS_MAX_BYTES = 256 * 2**20
PROBE_MAX = {2: 256, 3: 64}  # probe image side: the widest reach the halo check can see


# ----------------------------------------------------------------------------
# Freezing sample statistics into fixed operations.
# ----------------------------------------------------------------------------


def sample_values(data: Any, max_bytes: int = STATS_MAX_BYTES, seed: int = 0) -> np.ndarray:
    """The input's values as ``(C, n)`` float64: all of them, or a random sample of whole chunks.

    ``data`` is an ``xarray.DataArray`` with canonical dims (from ``open_image``).
    """
    import dask.array as da

    dims = list(data.dims)
    arr = data.data if isinstance(data.data, da.Array) else da.from_array(np.asarray(data.data))
    if "c" in dims:
        arr = da.moveaxis(arr, dims.index("c"), 0)
    else:
        arr = arr[None]
    arr = arr.rechunk({0: -1})
    grid = arr.numblocks[1:]
    total = math.prod(grid)
    block_bytes = 8 * math.prod(max(c) for c in arr.chunks)
    n = max(1, min(total, max_bytes // max(block_bytes, 1)))
    picks = np.random.default_rng(seed).permutation(total)[:n]
    blocks = [arr.blocks[(0, *np.unravel_index(int(i), grid))] for i in sorted(picks)]
    import dask

    parts = dask.compute(*[b.reshape(b.shape[0], -1) for b in blocks])
    return np.concatenate([np.asarray(p, np.float64) for p in parts], axis=1)


def _per_channel(kwargs: Any) -> bool:
    axes = getattr(kwargs, "axes", None)
    return axes is not None and "channel" not in [str(a) for a in axes]


def _stats_descr(op: Any, values: np.ndarray, spec: ZooSpec, where: str, stage: str) -> Any:
    """The fixed equivalent of a statistics-based operation, with statistics of the whole input."""
    from bioimageio.spec.model import v0_5 as s

    kw = op.kwargs
    per = _per_channel(kw) and spec.channel and spec.channels > 1
    v = values if per else values.reshape(1, -1)
    if op.id == "zero_mean_unit_variance" and stage == "pre":
        mean = v.mean(axis=1)
        std = v.std(axis=1) + float(kw.eps)
        if per:
            return s.FixedZeroMeanUnitVarianceDescr(kwargs=s.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                mean=mean.tolist(), std=std.tolist(), axis=s.AxisId("channel")))
        return s.FixedZeroMeanUnitVarianceDescr(kwargs=s.FixedZeroMeanUnitVarianceKwargs(
            mean=float(mean[0]), std=float(std[0])))
    ref = getattr(kw, "reference_tensor", None)
    if op.id == "scale_range" and (stage == "pre" and ref in (None, spec.input_id) or str(ref) == spec.input_id):
        lo = np.quantile(v, float(kw.min_percentile) / 100.0, axis=1)
        hi = np.quantile(v, float(kw.max_percentile) / 100.0, axis=1)
        gain = 1.0 / (hi - lo + float(kw.eps))
        offset = -lo * gain
        if per:
            return s.ScaleLinearDescr(kwargs=s.ScaleLinearAlongAxisKwargs(
                axis=s.AxisId("channel"), gain=gain.tolist(), offset=offset.tolist()))
        return s.ScaleLinearDescr(kwargs=s.ScaleLinearKwargs(gain=float(gain[0]), offset=float(offset[0])))
    raise IncompatibleModelError(f"{where}: {stage}processing {op.id!r} depends on statistics of each "
                   f"{'output' if stage == 'post' else 'sample'} and cannot be applied block by block")


BLOCK_INVARIANT = {"binarize", "clip", "ensure_dtype", "fixed_zero_mean_unit_variance", "scale_linear", "sigmoid",
                   "softmax"}


def freeze_processing(descr: Any, spec: ZooSpec, data: Any, where: str) -> tuple[list[Any], list[Any]]:
    """Pre- and post-processing with every sample statistic replaced by one over the whole input."""
    values = None
    frozen: list[list[Any]] = []
    for stage, ops in (("pre", descr.inputs[0].preprocessing), ("post", descr.outputs[0].postprocessing)):
        new = []
        for op in ops:
            if op.id in BLOCK_INVARIANT:
                new.append(op)
                continue
            if values is None:
                values = sample_values(data)
            new.append(_stats_descr(op, values, spec, where, stage))
        frozen.append(new)
    return frozen[0], frozen[1]


# ----------------------------------------------------------------------------
# The reference that travels to the workers, and the loaded model.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZooRef:
    """A Zoo model prepared for one input: picklable, hashable, small.

    Attributes
    ----------
    path : str
        Absolute path of the package.
    weight_format : str
        ``pytorch_state_dict`` or ``torchscript``.
    halo : tuple of int
        Halo per spatial axis of the model (``zyx`` order): ``contract.halo``.
    pre, post : str
        JSON of the (frozen) pre- and post-processing.
    contract : ModelContract
        What prediction relies on (:mod:`n2v_chunked.model.contract`).
    """

    path: str
    weight_format: str
    halo: tuple[int, ...]
    pre: str
    post: str
    contract: ModelContract | None = None

    def __str__(self) -> str:
        return self.path

    @property
    def key(self) -> str:
        """Cache key: the package and the processing (other statistics, other model)."""
        digest = hashlib.sha256(f"{self.weight_format}|{self.pre}|{self.post}|{self.contract}".encode()).hexdigest()
        return f"{self.path}#{digest[:16]}"

    def provenance(self) -> dict[str, Any]:
        """What the output records: weights and the processing as applied (statistics frozen)."""
        return {"weight_format": self.weight_format, "halo": list(self.halo),
                "preprocessing": json.loads(self.pre), "postprocessing": json.loads(self.post)}

    def load(self, device: str | torch.device | None = None) -> "ZooTrained":
        """The model on ``device`` (:func:`load`)."""
        return load(self, device)

    def token(self) -> str:
        """Changes when the package changes."""
        p = Path(self.path)
        files = [p] if p.is_file() else [p / n for n in RDF_NAMES if (p / n).is_file()]
        return "|".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files)


def _dump(ops: Sequence[Any]) -> str:
    return json.dumps([op.model_dump(mode="json", exclude_unset=False) for op in ops])


def _load_ops(text: str, stage: str) -> list[Any]:
    from pydantic import TypeAdapter
    from bioimageio.spec.model import v0_5 as s

    kind = s.PreprocessingDescr if stage == "pre" else s.PostprocessingDescr
    return [TypeAdapter(kind).validate_python(d) for d in json.loads(text)]


def parse_halo(halo: Any, n: int) -> tuple[int, ...] | None:
    """``--halo``: one int for every spatial axis, or one per axis (``zyx`` order)."""
    if halo is None:
        return None
    values = [halo] if isinstance(halo, int) else list(halo)
    if len(values) == 1:
        values = values * n
    if len(values) != n or any(int(v) < 0 for v in values):
        raise ConfigError(f"--halo needs one non-negative size or {n} (one per spatial axis), got {halo}")
    return tuple(int(v) for v in values)


def prepare(path: str | Path, data: Any, *, halo: Any = None, weight_format: str | None = None,
            check_reach: bool = True) -> ZooRef:
    """Check a Zoo package against the input and freeze what must be the same for every block.

    Parameters
    ----------
    path : str or Path
        The package (``.zip`` or a folder with its RDF).
    data : xarray.DataArray
        The input (canonical dims), for the channel check and the statistics.
    halo : int or sequence of int, optional
        Halo to use instead of the declared one (one per spatial axis, or one for all).
    weight_format : str, optional
        ``pytorch_state_dict`` or ``torchscript`` (default: the first the package has).
    check_reach : bool
        Refuse a halo smaller than the network's reach (computed for a package
        of ours, else probed, :func:`probe_grid_and_reach`).

    Returns
    -------
    ZooRef
        With its :class:`~n2v_chunked.model.contract.ModelContract`.
    """
    path = Path(path).absolute()
    where = f"Zoo model {path.name}"
    descr = read_description(path)
    spec = inspect_description(descr, where)
    if weight_format is not None and weight_format not in spec.weight_formats:
        raise IncompatibleModelError(f"{where} has no {weight_format} weights (it has {', '.join(spec.weight_formats)})")
    wf = weight_format or spec.weight_formats[0]
    sizes = dict(zip(data.dims, data.shape))
    if sizes.get("c", 1) != spec.channels:
        raise IncompatibleModelError(f"{where} takes {spec.channels} channel(s) but the input has {sizes.get('c', 1)}")
    h = parse_halo(halo, len(spec.spatial)) or spec.halo
    ours = _our_config(descr)
    pre, post = freeze_processing(descr, spec, data, where)
    digest = hashlib.sha256(_package_file(path, _weights_name(descr, wf))).hexdigest()
    ref = ZooRef(str(path), wf, tuple(h or (0,) * len(spec.spatial)), _dump(pre), _dump(post))
    if ours is not None:  # our U-Net: its grid and exact halo follow from its config
        grid, reach = (size_multiple(ours),) * ours.dims, halo_width(ours)
        features, independent = ours.features, ours.independent_channels
    elif h is None or check_reach:
        v = sample_values(data, max_bytes=16 * 2**20)
        grid, reach = probe_grid_and_reach(load(ref, "cpu"), spec, v.mean(axis=1), np.maximum(v.std(axis=1), 1e-6))
        features, independent = 32, False
    else:  # the declared halo, trusted as asked
        grid, reach, features, independent = tuple(st for _, st in spec.sizes), h, 32, False
    exact = round_up(reach, grid)
    if h is None and ours is None:
        raise IncompatibleModelError(f"{where} declares no output halo; pass --halo {','.join(map(str, exact))} (its probed reach "
                       "on its grid) to predict it block by block")
    h = exact if h is None else h
    short = [f"{d}: {hh} < {r}" for d, hh, r in zip(spec.spatial, h, reach) if r > hh]
    if short and check_reach:
        how = "computed from its architecture" if ours is not None else "probed"
        raise IncompatibleModelError(f"{where}: halo {list(h)} is smaller than the network's reach {list(reach)} "
                       f"({', '.join(short)}, {how}); blocks would show seams; "
                       f"pass --halo {','.join(str(max(a, b)) for a, b in zip(round_up(h, grid), exact))}")
    gain, offset = _fast_affine(ref, spec.channels)
    if gain is not None and _torch_net(ref, descr, torch.device("cpu")) is None:
        gain = offset = None  # its weights do not load as a torch module: bioimageio.core's pipeline runs it
    contract = ModelContract(
        in_channels=spec.channels, out_channels=spec.channels, dims=len(spec.spatial), grid=tuple(grid),
        halo=round_up(h, grid), independent_channels=independent,
        mean=tuple(float(v) for v in -offset / gain) if gain is not None else (0.0,) * spec.channels,
        std=tuple(float(v) for v in 1.0 / gain) if gain is not None else (1.0,) * spec.channels,
        features=features, weights_digest=digest, step=_our_step(descr) if ours is not None else None,
        torch_module=gain is not None,
    )
    return dataclasses.replace(ref, halo=contract.halo, contract=contract)


def _weights_name(descr: Any, weight_format: str) -> str:
    src = getattr(descr.weights, weight_format).source
    return Path(str(src.path if hasattr(src, "path") else src)).name


def _our_meta(descr: Any) -> dict[str, Any] | None:
    """``config.n2v_chunked`` of a package we exported (its architecture is our U-Net), else None."""
    weights = descr.weights.pytorch_state_dict
    arch = getattr(weights, "architecture", None)
    meta = descr.config.model_dump().get("n2v_chunked") if descr.config is not None else None
    if weights is None or str(getattr(arch, "callable", "")) != "N2VUNet" or not isinstance(meta, dict):
        return None
    return meta


def _our_config(descr: Any) -> ModelConfig | None:
    """The :class:`ModelConfig` of a package we exported, else None."""
    from ..model.checkpoint import configs_from_meta

    meta = _our_meta(descr)
    if meta is None:
        return None
    try:
        return configs_from_meta(meta)[0]
    except N2VError:
        return None


def _our_step(descr: Any) -> int | None:
    step = (((_our_meta(descr) or {}).get("validation") or {}).get("best") or {}).get("step")
    return None if step is None else int(step)


def _affine(text: str, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Frozen processing as one per-channel ``gain * x + offset``; None when it is not affine."""
    gain, offset = np.ones(channels), np.zeros(channels)

    def per_channel(v: Any) -> np.ndarray:
        arr = np.asarray(v, np.float64).ravel()
        return np.broadcast_to(arr, (channels,)) if arr.size in (1, channels) else None

    for op in json.loads(text):
        kw = op.get("kwargs") or {}
        if op.get("id") == "ensure_dtype" and str(kw.get("dtype")) in ("float32", "float64"):
            continue
        if kw.get("axis") not in (None, "channel"):
            return None
        if op.get("id") == "scale_linear":
            a, b = per_channel(kw.get("gain", 1.0)), per_channel(kw.get("offset", 0.0))
        elif op.get("id") == "fixed_zero_mean_unit_variance":
            std = per_channel(kw.get("std"))
            a = None if std is None else 1.0 / (std + 1e-6)  # bioimageio.core's eps
            b = None if a is None or per_channel(kw.get("mean")) is None else -per_channel(kw.get("mean")) * a
        else:
            return None
        if a is None or b is None:
            return None
        gain, offset = a * gain, a * offset + b
    return gain, offset


def _fast_affine(ref: ZooRef, channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The input's affine normalisation when the package runs as a plain torch module, else ``(None, None)``.

    That needs affine pre- and post-processing (applied outside the network,
    in float32) and weights that load as a module (:func:`_torch_net`).
    """
    pre, post = _affine(ref.pre, channels), _affine(ref.post, channels)
    if pre is None or post is None or not np.all(pre[0] != 0):
        return None, None
    return pre


def valid_size(n: int, size: tuple[int, int]) -> int:
    """The smallest size ``min + k * step`` of a size rule that holds ``n`` pixels."""
    lo, step = size
    return lo if n <= lo else lo + -(-(n - lo) // step) * step


class ZooModule(torch.nn.Module):
    """The Zoo model with its pre- and post-processing as one module on ``(N, C, *spatial)`` raw data.

    Each call pads the block at its end to a size the model accepts
    (``min + n * step``; the padding lies outside the halo, so it never
    reaches the kept region), runs ``bioimageio.core``'s pipeline, and crops.
    """

    def __init__(self, pipeline: Any, spec: ZooSpec) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bioimageio.core import Sample, Tensor

        spec = self.spec
        arr = x.detach().float().cpu().numpy()
        shape = arr.shape[2:]
        target = [valid_size(n, sz) for n, sz in zip(shape, spec.sizes)]
        pad = [(0, 0), (0, 0)] + [(0, t - n) for t, n in zip(target, shape)]
        if any(p[1] for p in pad):
            arr = np.pad(arr, pad, mode="edge")
        dims = ["batch", "channel", *spec.spatial]
        outs = []
        for item in ([arr] if spec.batch else [arr[i : i + 1] for i in range(arr.shape[0])]):
            a, d = item, list(dims)
            if not spec.batch:
                a, d = a[0], d[1:]
            if not spec.channel:
                a, d = a[:, 0] if spec.batch else a[0], [v for v in d if v != "channel"]
            sample = Sample(members={spec.input_id: Tensor.from_numpy(np.ascontiguousarray(a), dims=d)},
                            stat={}, id="block")
            res = self.pipeline.predict_sample_without_blocking(sample, skip_input_padding=True,
                                                                skip_output_cropping=True)
            y = res.members[spec.output_id].data.transpose(*d).values
            if not spec.channel:
                y = y[:, None] if spec.batch else y[None]
            outs.append(y if spec.batch else y[None])
        y = np.concatenate(outs, axis=0)[(slice(None), slice(None), *[slice(0, n) for n in shape])]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(x.device)


@dataclasses.dataclass
class ZooTrained(Trained):
    """A Zoo model in the shape of :class:`~n2v_chunked.model.checkpoint.Trained`.

    ``model`` is the package's network as a plain torch module on normalised
    data (``mean``/``std`` from the affine preprocessing, the postprocessing
    folded into its output) where the package allows (any runtime runs it),
    else bioimageio.core's pipeline with the model's own processing and the
    identity normalisation (fp32 torch only).  ``config`` carries only dims
    and channels; ``zoo_contract`` is what prediction relies on.
    """

    zoo_contract: ModelContract | None = None
    torch_device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        return self.torch_device

    @property
    def contract(self) -> ModelContract:
        return self.zoo_contract

    @property
    def halo(self) -> tuple[int, ...]:
        return self.zoo_contract.halo


class ChannelAffine(torch.nn.Module):
    """``net(x) * gain + offset`` per channel: a package's postprocessing, mapped back to normalised units."""

    def __init__(self, net: torch.nn.Module, gain: np.ndarray, offset: np.ndarray, dims: int) -> None:
        super().__init__()
        self.net = net
        shape = (1, -1) + (1,) * dims
        self.register_buffer("gain", torch.as_tensor(np.asarray(gain, np.float32)).reshape(shape))
        self.register_buffer("offset", torch.as_tensor(np.asarray(offset, np.float32)).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float() * self.gain + self.offset


def _torch_net(ref: ZooRef, descr: Any, device: torch.device) -> torch.nn.Module | None:
    """The package's network as a torch module on ``device`` (None when its weights do not load as one)."""
    try:
        if ref.weight_format == "pytorch_state_dict":
            cfg = _our_config(descr)
            if cfg is not None:  # ours: our own U-Net class (its fast layouts), from the package's weights
                net = UNet(cfg)
                net.load_state_dict(init_source(ref.path)[1])
            else:
                from bioimageio.core.backends.pytorch_backend import load_torch_model

                net = load_torch_model(descr.weights.pytorch_state_dict, devices=[str(device)])
        else:
            data = _package_file(Path(ref.path), _weights_name(descr, ref.weight_format))
            net = torch.jit.load(io.BytesIO(data), map_location=device)
        return net.to(device).eval()
    except Exception:  # the package's own code or weights: the pipeline path says so
        return None


def _fast_model(ref: ZooRef, descr: Any, spec: ZooSpec, dev: torch.device) -> tuple[Any, Any, Any] | None:
    """``(module, mean, std)`` of the package as a plain torch module, or None."""
    gain, offset = _fast_affine(ref, spec.channels)
    if gain is None or (ref.contract is not None and not ref.contract.torch_module):
        return None
    net = _torch_net(ref, descr, dev)
    if net is None:
        return None
    mean, std = -offset / gain, 1.0 / gain
    post_gain, post_offset = _affine(ref.post, spec.channels)
    a, b = post_gain / std, (post_offset - mean) / std  # the output back in the input's normalised units
    if not (np.allclose(a, 1.0, rtol=1e-5) and np.allclose(b, 0.0, atol=1e-5)):
        net = ChannelAffine(net, a, b, len(spec.spatial)).to(dev).eval()
        if isinstance(net.net, torch.jit.ScriptModule):  # the ONNX exporter traces no script module inside a plain one
            net = torch.jit.script(net)
    return net, mean.astype(np.float32), std.astype(np.float32)


def load(ref: ZooRef, device: str | torch.device | None = None) -> ZooTrained:
    """The prepared Zoo model on ``device``: a torch module where the package allows, else its pipeline."""
    descr = read_description(ref.path)
    name = Path(ref.path).name
    spec = inspect_description(descr, f"Zoo model {name}")
    inp = descr.inputs[0].model_copy(update={"preprocessing": _load_ops(ref.pre, "pre")})
    out = descr.outputs[0].model_copy(update={"postprocessing": _load_ops(ref.post, "post")})
    descr = descr.model_copy(update={"inputs": [inp], "outputs": [out]})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    c = spec.channels
    fast = _fast_model(ref, descr, spec, dev)
    if fast is not None:
        module, mean, std = fast
    elif ref.contract is not None and ref.contract.torch_module:
        raise IncompatibleModelError(f"cannot load Zoo model {name} ({ref.weight_format}) as a torch module on {dev}")
    else:
        from bioimageio.core import create_prediction_pipeline

        try:
            pipeline = create_prediction_pipeline(descr, devices=[str(dev)], weights_format=ref.weight_format)
        except Exception as exc:  # the package's own architecture code or weights failed to load
            first = first_line(exc) or type(exc).__name__
            raise N2VError(f"cannot load Zoo model {name} ({ref.weight_format}): {first[:200]}") from None
        module, mean, std = ZooModule(pipeline, spec), np.zeros(c, np.float32), np.ones(c, np.float32)
    contract = ref.contract or ModelContract(  # a provisional one, for the probes of :func:`prepare`
        in_channels=c, out_channels=c, dims=len(spec.spatial), grid=tuple(st for _, st in spec.sizes),
        halo=round_up(ref.halo, [st for _, st in spec.sizes]), independent_channels=False,
        mean=tuple(map(float, mean)), std=tuple(map(float, std)), torch_module=fast is not None)
    cfg = ModelConfig(dims=len(spec.spatial), in_channels=c, depth=0)
    meta = {"model_id": str(getattr(descr, "id", None) or descr.name), "zoo_package": ref.path}
    return ZooTrained(model=module, config=cfg, mean=mean, std=std, meta=meta, zoo_contract=contract,
                      weights_digest=contract.weights_digest, step=contract.step, torch_device=dev)


def probe_grid_and_reach(trained: ZooTrained, spec: ZooSpec, mean: np.ndarray, std: np.ndarray,
                         size: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The network's grid step and its full reach per spatial axis, probed.

    The grid: the smallest power of two ``p`` by which shifting the input
    shifts the output alike (a network that pools ``k`` times has ``2**k``).
    The reach: how far a changed input pixel moves the output, as the union
    over a few random images (input ``mean``/``std``), both signs of a change
    of ten standard deviations, and every position of the changed pixel
    relative to the grid, so no ReLU dead zone or pooling phase hides part of
    it.  The probe image (side ``size``, default :data:`PROBE_MAX`) must be
    wider than twice the reach; a reach that touches its border is refused.
    """
    dims = len(spec.spatial)
    side = size or PROBE_MAX[dims]
    side = max(valid_size(side, sz) for sz in spec.sizes)
    shape = (1, -1) + (1,) * dims
    m, sd = (np.asarray(v, np.float32).reshape(shape) for v in (mean, std))

    def run(x: np.ndarray) -> np.ndarray:
        xn = (x - trained.mean.reshape(shape)) / trained.std.reshape(shape)
        with torch.inference_mode():
            return trained.model(torch.from_numpy(np.ascontiguousarray(xn, np.float32))).float().numpy()

    images = [np.random.default_rng(seed).normal(0.0, 1.0, (1, spec.channels) + (side,) * dims).astype(np.float32)
              * sd + m for seed in (0, 1)]
    base = [run(x) for x in images]
    tol = 1e-5 * max(float(np.abs(base[0]).max()), 1e-12)
    grid = [_period(run, images[0], base[0], ax, tol) for ax in range(dims)]
    reach = np.zeros(dims, int)
    for k in range(max(grid)):  # every phase of the changed pixel relative to the grid
        changed = np.zeros((side,) * dims, bool)
        for x, y in zip(images, base):
            for sign in (1.0, -1.0):
                x2 = x.copy()
                x2[(0, slice(None)) + (side // 2 + k,) * dims] += sign * 10.0 * np.ravel(sd)
                changed |= np.abs(run(x2) - y).max(axis=(0, 1)) > tol
        where = np.argwhere(changed)
        if where.size:
            reach = np.maximum(reach, np.abs(where - (side // 2 + k)).max(axis=0))
    reach = tuple(int(r) for r in reach)
    if any(r >= side // 2 - max(grid) for r in reach):
        raise IncompatibleModelError(f"Zoo model {Path(trained.meta.get('zoo_package', '')).name}: its reach exceeds the probe "
                       f"({side} pixels); pass --halo N with the network's reach")
    return tuple(grid), reach


def _period(run: Any, x: np.ndarray, y: np.ndarray, axis: int, tol: float) -> int:
    """Smallest power of two by which a shift of the input along ``axis`` shifts the output alike."""
    n = x.shape[2 + axis]
    for p in (1, 2, 4, 8, 16, 32):
        if 4 * p >= n:
            break
        cut = [slice(None)] * x.ndim
        cut[2 + axis] = slice(p, None)
        pad = [(0, 0)] * x.ndim
        pad[2 + axis] = (0, p)
        shifted = run(np.pad(x[tuple(cut)], pad, mode="edge"))  # same size: valid for the network
        inner = [slice(None)] * x.ndim
        inner[2 + axis] = slice(n // 4, n // 2)  # far from both borders (the reach is below n / 2)
        moved = list(inner)
        moved[2 + axis] = slice(n // 4 - p, n // 2 - p)
        if np.abs(shifted[tuple(moved)] - y[tuple(inner)]).max() <= tol:
            return p
    raise IncompatibleModelError(f"cannot find the grid of this network along axis {axis} (no shift up to {p} moves its output "
                   "alike); it cannot be predicted block by block")


# ----------------------------------------------------------------------------
# train --init-from: the weights and settings of one of our exported models.
# ----------------------------------------------------------------------------


def _package_file(path: Path, name: str) -> bytes:
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            return zf.read(name)
    return (path / name).read_bytes()


def init_source(path: str | Path, allow_unvalidated: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``config.yaml`` content and weights to start training from.

    Parameters
    ----------
    path : str or Path
        A Zoo package written by ``n2v-chunked export`` (its architecture is
        our U-Net and it carries ``config.n2v_chunked``), or a model directory.

    Returns
    -------
    meta, state_dict
    """
    import io

    from ..model import checkpoint as ckpt

    path = Path(path)
    if not is_zoo_package(path):
        ckpt.check_trained(path, allow_unvalidated)
        meta = ckpt.read_config(path)
        best = path / ckpt.WEIGHTS_BEST
        return meta, ckpt.safe_torch_load(best if best.is_file() else path / ckpt.WEIGHTS_LAST)
    descr = read_description(path)
    meta = _our_meta(descr)
    if meta is None:
        raise IncompatibleModelError(f"Zoo package {path.name} is not an N2V model of n2v_chunked (no pytorch_state_dict of "
                       "N2VUNet with config.n2v_chunked); --init-from continues only our own exported models")
    name = _weights_name(descr, "pytorch_state_dict")
    try:
        state = torch.load(io.BytesIO(_package_file(path, name)), map_location="cpu", weights_only=True)
    except Exception as exc:  # a missing member, a truncated file, a pickle that is more than tensors
        raise IncompatibleModelError(f"cannot read the weights {name} of Zoo package {path.name}: {first_line(exc)[:160]}") from None
    return meta, state
