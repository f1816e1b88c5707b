"""Export an n2v_chunked model directory as a BioImage Model Zoo package (format 0.5).

The package is built with ``bioimageio.spec``'s own classes and written with
its ``save_bioimageio_package``, so what comes out is what the Zoo validates:

- weights twice: ``pytorch_state_dict`` with :mod:`n2v_chunked.model.architecture` as a
  self-contained architecture file (no n2v_chunked needed to run it), and
  ``torchscript`` (what Fiji/deepImageJ load);
- input axes batch, channel, space with sizes ``min + n * 2**depth``;
- preprocessing ``fixed_zero_mean_unit_variance`` from the stored statistics,
  postprocessing ``scale_linear`` back to input units;
- the output halo from the exact receptive field (:mod:`n2v_chunked.model`);
- test tensors computed by n2v_chunked's own :func:`~n2v_chunked.engine.inference.run_network`,
  a cover (noisy | denoised), a README with a Validation section;
- the model directory's ``config.yaml`` attached and copied into the
  description's ``config.n2v_chunked``, so ``train --init-from`` can continue
  from the package.

Needs the ``zoo`` extra (``pip install n2v-chunked[zoo]``).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.inference import run_network
from ..errors import ConfigError, N2VError, OutputExistsError, first_line
from ..model import architecture as unet_arch
from ..model.checkpoint import CONFIG, Trained, check_trained, cpu_state, load_model
from ..model.unet import halo_width, size_multiple

N2V_DOI = "10.1109/CVPR.2019.00223"
N2V2_DOI = "10.48550/arXiv.2211.08512"
DEFAULT_AUTHOR = "n2v_chunked user"
DEFAULT_LICENSE = "CC-BY-4.0"
INPUT_ID, OUTPUT_ID = "raw", "denoised"


def require_bioimageio() -> None:
    """One clear line when the ``zoo`` extra is not installed."""
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise N2VError(f"BioImage Model Zoo support needs the zoo extra: pip install 'n2v-chunked[zoo]' ({exc})") from None


def min_size(trained: Trained) -> int:
    """Smallest valid spatial size: a multiple of ``2**depth`` larger than twice the halo.

    The spec requires an output halo to leave something after cropping it
    from both sides of the smallest block.
    """
    m = size_multiple(trained.config)
    h = max(halo_width(trained.config))
    return (2 * h // m + 1) * m


def sample_input(trained: Trained, size: int, seed: int = 0) -> np.ndarray:
    """A synthetic noisy test image ``(1, C, *spatial)`` in the model's input units.

    A smooth pattern of one standard deviation plus white noise of one
    standard deviation around the stored mean: the range the model was
    trained for, without needing the training data.
    """
    cfg = trained.config
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(size)] * cfg.dims, indexing="ij")
    pattern = np.sin(grids[-1] / 5.0) * np.cos(grids[-2] / 7.0)
    x = pattern[None, None] + rng.normal(0.0, 1.0, (1, cfg.in_channels) + (size,) * cfg.dims)
    shape = (1, -1) + (1,) * cfg.dims
    return (x * trained.std.reshape(shape) + trained.mean.reshape(shape)).astype(np.float32)


def reference_output(trained: Trained, x: np.ndarray) -> np.ndarray:
    """The test output: our own network pass on the normalised input, in input units.

    No halo padding: the Zoo runs the network on the test input as it is
    (zero padding inside the convolutions), and so does this.
    """
    shape = (1, -1) + (1,) * trained.config.dims
    mean, std = trained.mean.reshape(shape), trained.std.reshape(shape)
    y = run_network(trained, (x - mean) / std, precision="fp32")
    return (y * std + mean).astype(np.float32)


def _cover(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Noisy | denoised PNG (channel 0, middle z slice of a 3D model)."""
    from PIL import Image

    a, b = x[0, 0], y[0, 0]
    while a.ndim > 2:
        a, b = a[a.shape[0] // 2], b[b.shape[0] // 2]
    lo, hi = np.percentile(a, [1, 99.5])
    scale = 255.0 / max(float(hi - lo), 1e-12)
    side = [np.clip((v - lo) * scale, 0, 255).astype(np.uint8) for v in (a, b)]
    img = np.concatenate(side, axis=1)  # 2:1, as the Zoo asks of covers
    img[:, a.shape[1] - 1] = 255  # a white line between the two halves
    factor = max(1, 256 // img.shape[0])
    Image.fromarray(img).resize((img.shape[1] * factor, img.shape[0] * factor), Image.NEAREST).save(path)


def _readme(trained: Trained, name: str, halo: Sequence[int], smallest: int, path: Path) -> None:
    cfg = trained.config
    meta = trained.meta
    variant = "N2V2" if cfg.n2v2 else "Noise2Void"
    text = f"""# {name}

{variant} denoising model ({cfg.dims}D, {cfg.in_channels} channel(s)) trained with
[n2v_chunked](https://github.com/) (model id `{trained.model_id}`, n2v_chunked
{meta.get('n2v_chunked_version', '?')}).  Noise2Void learns to denoise from noisy
images alone by predicting each pixel from its neighbours (a blind spot).

## Inputs and outputs

- input `{INPUT_ID}`: axes batch, channel, {'z, ' if cfg.dims == 3 else ''}y, x, float32, raw
  intensities; spatial sizes {smallest} + n * {size_multiple(cfg)}.
- preprocessing: fixed zero mean / unit variance with the training statistics
  (mean {[round(float(v), 4) for v in trained.mean]}, std {[round(float(v), 4) for v in trained.std]}).
- output `{OUTPUT_ID}`: same shape, in input units (scale_linear undoes the
  normalisation).  Crop a halo of {list(halo)} pixels from each side of a tile
  when predicting tile by tile.

## Validation

The test output was computed by n2v_chunked's own inference on a synthetic
noisy image in the training range (a smooth pattern plus Gaussian noise), and
the package was checked with `bioimageio.core`'s model test for both weight
formats.  Noise2Void assumes pixel-wise independent noise: structured
(correlated) noise, e.g. from some sCMOS cameras or line scanners, survives
denoising, and the model only suits data resembling its training data
(modality, noise level, pixel size).  Check its output against the raw data
before drawing conclusions.

## Training

The training configuration and normalisation are attached as `{CONFIG}` and
in this description's `config.n2v_chunked`; `n2v-chunked train --init-from`
continues from this package.

## Citation

Krull, A., Buchholz, T.-O., Jug, F. Noise2Void - Learning Denoising from
Single Noisy Images. CVPR 2019. doi:{N2V_DOI}
"""
    path.write_text(text)


def _tolerance() -> Any:
    from bioimageio.spec.model.v0_5 import BioimageioConfig, ReproducibilityTolerance

    # float32 convolutions differ between oneDNN, cuDNN and TorchScript's fused paths
    return BioimageioConfig(reproducibility_tolerance=[
        ReproducibilityTolerance(absolute_tolerance=1e-3, relative_tolerance=1e-3, mismatched_elements_per_million=100)
    ])


def build_description(
    trained: Trained, model_dir: Path, work: Path, *, name: str | None = None,
    authors: Sequence[str] = (), license: str = DEFAULT_LICENSE, test_size: int | None = None,
) -> Any:
    """The ``ModelDescr`` (format 0.5) of a loaded model; its files are written into ``work``."""
    from bioimageio.spec.model import v0_5 as s

    cfg = trained.config
    m = size_multiple(cfg)
    halo = halo_width(trained.config)
    smallest = min_size(trained)
    size = max(smallest, -(-(test_size or (64 if cfg.dims == 2 else 32)) // m) * m)
    x = sample_input(trained, size)
    y = reference_output(trained, x)
    np.save(work / "test_input.npy", x)
    np.save(work / "test_output.npy", y)
    _cover(x, y, work / "cover.png")
    name = name or f"N2V {cfg.dims}D {trained.model_id}"
    _readme(trained, name, halo, smallest, work / "README.md")
    arch = work / "n2v_unet.py"
    arch.write_text(inspect.getsource(unet_arch))
    state = cpu_state(trained.model)
    torch.save(state, work / "weights.pt")
    net = unet_arch.N2VUNet(**_kwargs(cfg)).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.from_numpy((x - x.mean()) / max(float(x.std()), 1e-6)), check_trace=False)
    traced.save(str(work / "weights_torchscript.pt"))
    (work / CONFIG).write_text((model_dir / CONFIG).read_text())

    spatial = ("z", "y", "x")[3 - cfg.dims:]
    channel_names = [f"c{i}" for i in range(cfg.in_channels)]
    in_axes = [s.BatchAxis(), s.ChannelAxis(channel_names=channel_names)] + [
        s.SpaceInputAxis(id=s.AxisId(a), size=s.ParameterizedSize(min=smallest, step=m)) for a in spatial
    ]
    out_axes = [s.BatchAxis(), s.ChannelAxis(channel_names=channel_names)] + [
        s.SpaceOutputAxisWithHalo(id=s.AxisId(a), halo=h,
                                  size=s.SizeReference(tensor_id=s.TensorId(INPUT_ID), axis_id=s.AxisId(a)))
        for a, h in zip(spatial, halo)
    ]
    mean = [float(v) for v in trained.mean]
    std = [float(v) for v in trained.std]
    pre = s.FixedZeroMeanUnitVarianceDescr(kwargs=s.FixedZeroMeanUnitVarianceAlongAxisKwargs(
        mean=mean, std=std, axis=s.AxisId("channel")))
    post = s.ScaleLinearDescr(kwargs=s.ScaleLinearAlongAxisKwargs(axis=s.AxisId("channel"), gain=std, offset=mean))
    version = s.Version(torch.__version__.split("+")[0])
    cite = [s.CiteEntry(text="Krull, Buchholz, Jug. Noise2Void - Learning Denoising from Single Noisy Images. CVPR 2019",
                        doi=s.Doi(N2V_DOI))]
    if cfg.n2v2:
        cite.append(s.CiteEntry(text="Hoeck et al. N2V2 - Fixing Noise2Void Checkerboard Artifacts. ECCV Workshops 2022",
                                doi=s.Doi(N2V2_DOI)))
    tags = ["denoising", "noise2void", "n2v2" if cfg.n2v2 else "n2v", f"{cfg.dims}d", "unet", "pytorch",
            "fluorescence-light-microscopy", "n2v-chunked"]
    return s.ModelDescr(
        name=name,
        description=f"{'N2V2' if cfg.n2v2 else 'Noise2Void'} denoising ({cfg.dims}D, {cfg.in_channels} channel(s)), "
                    "trained with n2v_chunked",
        authors=[s.Author(name=a) for a in (authors or [DEFAULT_AUTHOR])],
        cite=cite,
        license=s.LicenseId(license),
        documentation=s.FileDescr(source=work / "README.md"),
        covers=[s.FileDescr(source=work / "cover.png")],
        tags=tags,
        inputs=[s.InputTensorDescr(
            id=s.TensorId(INPUT_ID), axes=in_axes, test_tensor=s.FileDescr(source=work / "test_input.npy"),
            data=s.IntervalOrRatioDataDescr(type="float32"), preprocessing=[pre],
        )],
        outputs=[s.OutputTensorDescr(
            id=s.TensorId(OUTPUT_ID), axes=out_axes, test_tensor=s.FileDescr(source=work / "test_output.npy"),
            data=s.IntervalOrRatioDataDescr(type="float32"), postprocessing=[post],
        )],
        weights=s.WeightsDescr(
            pytorch_state_dict=s.PytorchStateDictWeightsDescr(
                source=work / "weights.pt", pytorch_version=version,
                architecture=s.ArchitectureFromFileDescr(source=arch, callable=s.Identifier("N2VUNet"),
                                                         kwargs=_kwargs(cfg)),
            ),
            torchscript=s.TorchscriptWeightsDescr(source=work / "weights_torchscript.pt", pytorch_version=version,
                                                  parent="pytorch_state_dict"),
        ),
        attachments=[s.FileDescr(source=work / CONFIG)],
        config=s.Config(bioimageio=_tolerance(), n2v_chunked=_jsonable(trained.meta)),
    )


def _kwargs(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def _jsonable(obj: Any) -> Any:
    """``config.yaml`` content as plain YAML values (tuples become lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def export(
    model_dir: str | Path, out: str | Path, *, name: str | None = None, authors: Sequence[str] = (),
    license: str = DEFAULT_LICENSE, overwrite: bool = False, allow_unvalidated: bool = False,
) -> Path:
    """Write the Zoo package ``out`` (a ``.zip``) of a model directory.

    Parameters
    ----------
    model_dir : str or Path
        Directory written by training.
    out : str or Path
        The package to write (``.zip``).
    name : str, optional
        Model name (default: ``N2V <dims>D <model id>``).
    authors : sequence of str
        Author names (default: :data:`DEFAULT_AUTHOR`).
    license : str
        SPDX licence id (default :data:`DEFAULT_LICENSE`).
    overwrite : bool
        Replace an existing package.
    allow_unvalidated : bool
        Use a model directory without validated weights (see
        :func:`n2v_chunked.model.checkpoint.check_trained`); refused by default.

    Returns
    -------
    Path
        The written package.
    """
    check_trained(model_dir, allow_unvalidated)  # no package of step 0's random weights without a word
    require_bioimageio()
    from bioimageio.spec import save_bioimageio_package

    model_dir, out = Path(model_dir), Path(out)
    if out.suffix != ".zip":
        raise ConfigError(f"export writes a .zip package, got {out}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    trained = load_model(model_dir, device="cpu")
    with tempfile.TemporaryDirectory(prefix="n2v-export-") as tmp:
        try:
            descr = build_description(trained, model_dir, Path(tmp), name=name, authors=authors, license=license)
        except ValueError as exc:  # pydantic's ValidationError: a bad --license, --author ...
            raise ConfigError(f"cannot build the Zoo description: {_first_error(exc)}") from None
        partial = out.with_name(f".{out.name}.partial")
        save_bioimageio_package(descr, output_path=partial)
        partial.replace(out)  # a killed export leaves no package that looks complete
    return out


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
    return first_line(exc)
