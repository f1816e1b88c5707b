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
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import N2VError, first_line
from ..model.checkpoint import Trained
from ..model.config import ModelConfig
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
    raise N2VError(f"{where}: {stage}processing {op.id!r} depends on statistics of each "
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
        Halo per spatial axis of the model (``zyx`` order).
    pre, post : str
        JSON of the (frozen) pre- and post-processing.
    """

    path: str
    weight_format: str
    halo: tuple[int, ...]
    pre: str
    post: str

    def __str__(self) -> str:
        return self.path

    @property
    def key(self) -> str:
        """Cache key: the package and the processing (other statistics, other model)."""
        digest = hashlib.sha256(f"{self.weight_format}|{self.pre}|{self.post}".encode()).hexdigest()[:16]
        return f"{self.path}#{digest}"

    def provenance(self) -> dict[str, Any]:
        """What the output records: weights and the processing as applied (statistics frozen)."""
        return {"weight_format": self.weight_format, "halo": list(self.halo),
                "preprocessing": json.loads(self.pre), "postprocessing": json.loads(self.post)}

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
        raise N2VError(f"--halo needs one non-negative size or {n} (one per spatial axis), got {halo}")
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
        Probe the network (one changed pixel) and refuse a halo smaller than its reach.

    Returns
    -------
    ZooRef
    """
    path = Path(path).absolute()
    where = f"Zoo model {path.name}"
    descr = read_description(path)
    spec = inspect_description(descr, where)
    if weight_format is not None and weight_format not in spec.weight_formats:
        raise N2VError(f"{where} has no {weight_format} weights (it has {', '.join(spec.weight_formats)})")
    wf = weight_format or spec.weight_formats[0]
    sizes = dict(zip(data.dims, data.shape))
    if sizes.get("c", 1) != spec.channels:
        raise N2VError(f"{where} takes {spec.channels} channel(s) but the input has {sizes.get('c', 1)}")
    h = parse_halo(halo, len(spec.spatial)) or spec.halo
    if h is None:
        raise N2VError(f"{where} declares no output halo; pass --halo N (the network's reach in pixels) to "
                       "predict it block by block")
    pre, post = freeze_processing(descr, spec, data, where)
    ref = ZooRef(str(path), wf, tuple(h), _dump(pre), _dump(post))
    if check_reach:
        v = sample_values(data, max_bytes=16 * 2**20)
        reach = measure_reach(load(ref, "cpu"), spec, v.mean(axis=1), np.maximum(v.std(axis=1), 1e-6))
        short = [f"{d}: {hh} < {r}" for d, hh, r in zip(spec.spatial, h, reach) if r > hh]
        if short:
            raise N2VError(f"{where}: halo {list(h)} is smaller than the network's reach {list(reach)} "
                           f"({', '.join(short)}, measured by changing one pixel); blocks would show seams; "
                           f"pass --halo {','.join(str(max(a, b)) for a, b in zip(h, reach))}")
    return ref


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

    The normalisation is the identity (the module does the model's own), the
    architecture is unknown (``config`` carries only dims and channels;
    ``depth=0`` so that nothing pads to a power of two), and ``halo`` replaces
    the receptive field of our U-Net.
    """

    halo: tuple[int, ...] = ()
    torch_device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        return self.torch_device


def load(ref: ZooRef, device: str | torch.device | None = None) -> ZooTrained:
    """Build the prediction pipeline of a prepared Zoo model on ``device``."""
    from bioimageio.core import create_prediction_pipeline

    descr = read_description(ref.path)
    spec = inspect_description(descr, f"Zoo model {Path(ref.path).name}")
    inp = descr.inputs[0].model_copy(update={"preprocessing": _load_ops(ref.pre, "pre")})
    out = descr.outputs[0].model_copy(update={"postprocessing": _load_ops(ref.post, "post")})
    descr = descr.model_copy(update={"inputs": [inp], "outputs": [out]})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        pipeline = create_prediction_pipeline(descr, devices=[str(dev)], weights_format=ref.weight_format)
    except Exception as exc:  # the package's own architecture code or weights failed to load
        first = first_line(exc) or type(exc).__name__
        raise N2VError(f"cannot load Zoo model {Path(ref.path).name} ({ref.weight_format}): {first[:200]}") from None
    c = spec.channels
    cfg = ModelConfig(dims=len(spec.spatial), in_channels=c, depth=0)
    meta = {"model_id": str(getattr(descr, "id", None) or descr.name), "zoo_package": ref.path}
    return ZooTrained(model=ZooModule(pipeline, spec), config=cfg, mean=np.zeros(c, np.float32),
                      std=np.ones(c, np.float32), meta=meta, halo=ref.halo, torch_device=dev)


def measure_reach(trained: ZooTrained, spec: ZooSpec, mean: np.ndarray, std: np.ndarray,
                  size: int | None = None) -> tuple[int, ...]:
    """How far one changed input pixel moves the output, per spatial axis.

    Two runs on a random image of side ``size`` (default :data:`PROBE_MAX`)
    with the input's per-channel ``mean`` and ``std``: as it is, and with its
    centre pixel raised by ten standard deviations.  The farthest changed output pixel is the network's reach (a
    lower bound: the probe cannot see beyond its own border).
    """
    dims = len(spec.spatial)
    side = size or PROBE_MAX[dims]
    side = max(valid_size(side, sz) for sz in spec.sizes)
    rng = np.random.default_rng(0)
    shape = (1, -1) + (1,) * dims
    x = rng.normal(0.0, 1.0, (1, spec.channels) + (side,) * dims) * std.reshape(shape) + mean.reshape(shape)
    x = x.astype(np.float32)
    centre = (0, slice(None)) + (side // 2,) * dims
    x2 = x.copy()
    x2[centre] += 10.0 * std.astype(np.float32)
    with torch.inference_mode():
        a = trained.model(torch.from_numpy(x)).numpy()
        b = trained.model(torch.from_numpy(x2)).numpy()
    diff = np.abs(a - b).max(axis=(0, 1))
    tol = 1e-6 * max(float(np.abs(a).max()), 1e-12)
    changed = np.argwhere(diff > tol)
    if changed.size == 0:
        return (0,) * dims
    return tuple(int(np.abs(changed[:, k] - side // 2).max()) for k in range(dims))


# ----------------------------------------------------------------------------
# train --init-from: the weights and settings of one of our exported models.
# ----------------------------------------------------------------------------


def _package_file(path: Path, name: str) -> bytes:
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            return zf.read(name)
    return (path / name).read_bytes()


def init_source(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
        meta = ckpt.read_config(path)
        best = path / ckpt.WEIGHTS_BEST
        return meta, ckpt.safe_torch_load(best if best.is_file() else path / ckpt.WEIGHTS_LAST)
    descr = read_description(path)
    weights = descr.weights.pytorch_state_dict
    arch = getattr(weights, "architecture", None)
    meta = (descr.config.model_dump().get("n2v_chunked") if descr.config is not None else None)
    if weights is None or str(getattr(arch, "callable", "")) != "N2VUNet" or not isinstance(meta, dict):
        raise N2VError(f"Zoo package {path.name} is not an N2V model of n2v_chunked (no pytorch_state_dict of "
                       "N2VUNet with config.n2v_chunked); --init-from continues only our own exported models")
    name = Path(str(weights.source.path if hasattr(weights.source, "path") else weights.source)).name
    try:
        state = torch.load(io.BytesIO(_package_file(path, name)), map_location="cpu", weights_only=True)
    except Exception as exc:  # a missing member, a truncated file, a pickle that is more than tensors
        raise N2VError(f"cannot read the weights {name} of Zoo package {path.name}: {first_line(exc)[:160]}") from None
    return meta, state
