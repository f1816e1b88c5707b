"""Zoo packages for the tests: a foreign model (not our U-Net) built with bioimageio.spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class TwoConv(torch.nn.Module):
    """A 2-layer conv net: reach 2 + 1 = 3 pixels."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(channels, 4, 5, padding=2)
        self.b = torch.nn.Conv2d(4, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def foreign_package(folder: Path, *, halo: int | None = 4, pre: str = "scale_linear", post: bool = True,
                    two_inputs: bool = False, onnx_only: bool = False, channels: int = 1, seed: int = 0) -> Path:
    """A torchscript Zoo package (format 0.5) of :class:`TwoConv`, saved as ``folder/model.zip``.

    ``pre`` is ``scale_linear`` (fixed) or ``scale_range`` (per-sample percentiles).
    """
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as s

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = TwoConv(channels).eval()
    ts = torch.jit.script(net)
    ts.save(str(folder / "weights.pt"))
    rng = np.random.default_rng(seed)
    x = (100 + 20 * rng.standard_normal((1, channels, 32, 32))).astype(np.float32)
    if pre == "scale_range":
        pre_ops: list[Any] = [s.ScaleRangeDescr(kwargs=s.ScaleRangeKwargs(
            axes=[s.AxisId("y"), s.AxisId("x")], min_percentile=1.0, max_percentile=99.5))]
        lo, hi = np.percentile(x, 1.0), np.percentile(x, 99.5)
        xn = (x - lo) / (hi - lo + 1e-6)
    else:
        pre_ops = [s.ScaleLinearDescr(kwargs=s.ScaleLinearKwargs(gain=0.05, offset=-5.0))]
        xn = x * 0.05 - 5.0
    with torch.no_grad():
        y = net(torch.from_numpy(xn.astype(np.float32))).numpy()
    post_ops = [s.ScaleLinearDescr(kwargs=s.ScaleLinearKwargs(gain=30.0, offset=100.0))] if post else []
    if post:
        y = y * 30.0 + 100.0
    np.save(folder / "in.npy", x)
    np.save(folder / "out.npy", y.astype(np.float32))

    def in_axes() -> list[Any]:
        return [s.BatchAxis(), s.ChannelAxis(channel_names=[f"c{i}" for i in range(channels)]),
                s.SpaceInputAxis(id=s.AxisId("y"), size=s.ParameterizedSize(min=16, step=8)),
                s.SpaceInputAxis(id=s.AxisId("x"), size=s.ParameterizedSize(min=16, step=8))]

    def out_axis(a: str) -> Any:
        ref = s.SizeReference(tensor_id=s.TensorId("image"), axis_id=s.AxisId(a))
        if halo:
            return s.SpaceOutputAxisWithHalo(id=s.AxisId(a), size=ref, halo=halo)
        return s.SpaceOutputAxis(id=s.AxisId(a), size=ref)

    inputs = [s.InputTensorDescr(id=s.TensorId("image"), axes=in_axes(),
                                 test_tensor=s.FileDescr(source=folder / "in.npy"),
                                 data=s.IntervalOrRatioDataDescr(type="float32"), preprocessing=pre_ops)]
    if two_inputs:
        inputs.append(s.InputTensorDescr(id=s.TensorId("mask"), axes=in_axes(),
                                         test_tensor=s.FileDescr(source=folder / "in.npy"),
                                         data=s.IntervalOrRatioDataDescr(type="float32")))
    version = s.Version(torch.__version__.split("+")[0])
    if onnx_only:
        (folder / "model.onnx").write_bytes(b"not really onnx")
        weights = s.WeightsDescr(onnx=s.OnnxWeightsDescr(source=folder / "model.onnx", opset_version=15))
    else:
        weights = s.WeightsDescr(torchscript=s.TorchscriptWeightsDescr(source=folder / "weights.pt",
                                                                       pytorch_version=version))
    descr = s.ModelDescr(
        name="two conv test model", description="a small foreign model for the tests",
        authors=[s.Author(name="test")], cite=[s.CiteEntry(text="none", url="https://example.com")],
        license=s.LicenseId("MIT"),
        documentation=s.FileDescr(source=_readme(folder)),
        inputs=inputs,
        outputs=[s.OutputTensorDescr(
            id=s.TensorId("restored"), axes=[s.BatchAxis(), s.ChannelAxis(channel_names=[f"c{i}" for i in range(channels)]),
                                             out_axis("y"), out_axis("x")],
            test_tensor=s.FileDescr(source=folder / "out.npy"), data=s.IntervalOrRatioDataDescr(type="float32"),
            postprocessing=post_ops)],
        weights=weights,
    )
    return save_bioimageio_package(descr, output_path=folder / "model.zip")


def _readme(folder: Path) -> Path:
    p = folder / "README.md"
    p.write_text("# test model\n")
    return p
