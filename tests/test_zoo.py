"""BioImage Model Zoo: export checked by bioimageio.core's own model test, import through the chunked pipeline."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

pytest.importorskip("bioimageio.core")

from helpers import make_model_dir  # noqa: E402
from zoo_helpers import TwoConv, foreign_package  # noqa: E402

from n2v_chunked.model import checkpoint as ckpt  # noqa: E402
from n2v_chunked import prediction as P  # noqa: E402
from n2v_chunked.cli import main  # noqa: E402
from n2v_chunked.errors import N2VError  # noqa: E402
from n2v_chunked.zoo.export import export  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny 2D (depth 2) and 3D (depth 1) models and their packages."""
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, kw in {"2d": dict(dims=2, depth=2, features=8), "3d": dict(dims=3, depth=1, features=4)}.items():
        md = make_model_dir(root / f"m{name}", **kw)
        out[name] = md
        out[name + "zip"] = export(md, root / f"m{name}.zip", authors=["Ada Lovelace"], license="MIT")
    return out


def _rdf(pkg: Path) -> dict:
    with zipfile.ZipFile(pkg) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("weight_format", ["pytorch_state_dict", "torchscript"])
def test_export_passes_bioimageio_model_test(exported, dims, weight_format):
    from bioimageio.core import test_model

    summary = test_model(str(exported[dims + "zip"]), weight_format=weight_format, devices=["cpu"])
    assert summary.status == "passed", summary.format()


def test_export_description(exported):
    rdf = _rdf(exported["2dzip"])
    assert rdf["format_version"].startswith("0.5")
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace"] and rdf["license"] == "MIT"
    assert {"pytorch_state_dict", "torchscript"} <= set(rdf["weights"])
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]
    sizes = [a["size"] for a in inp["axes"][2:]]
    assert all(s["step"] == 4 and s["min"] % 4 == 0 for s in sizes)  # 2**depth
    assert "fixed_zero_mean_unit_variance" in [op["id"] for op in inp["preprocessing"]]
    assert "scale_linear" in [op["id"] for op in out["postprocessing"]]
    from n2v_chunked.model.unet import halo_width

    trained = ckpt.load_model(exported["2d"], "cpu")
    assert [a["halo"] for a in out["axes"][2:]] == list(halo_width(trained.config))
    assert rdf["config"]["n2v_chunked"]["model"] == ckpt.read_config(exported["2d"])["model"]
    assert any(c.get("doi") == "10.1109/CVPR.2019.00223" for c in rdf["cite"])
    with zipfile.ZipFile(exported["2dzip"]) as zf:
        names = set(zf.namelist())
        assert {"README.md", "cover.png", "config.yaml", "n2v_unet.py"} <= names
        assert "## Validation" in zf.read("README.md").decode()


def test_test_output_is_our_inference(exported):
    """The package's test output is what n2v_chunked's own inference gives, not the exported wrapper's."""
    from n2v_chunked.engine.inference import run_network

    trained = ckpt.load_model(exported["2d"], "cpu")
    with zipfile.ZipFile(exported["2dzip"]) as zf:
        x = np.load(zf.open("test_input.npy"))
        y = np.load(zf.open("test_output.npy"))
    m, s = trained.mean.reshape(1, -1, 1, 1), trained.std.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, run_network(trained, (x - m) / s) * s + m, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(dims=2, depth=2, n2v2=True), dict(dims=3, depth=1, channels=2)])
def test_standalone_architecture_reproduces_our_unet(exported, tmp_path, kw):
    """The architecture file shipped in the package, loaded without n2v_chunked, gives our outputs."""
    with zipfile.ZipFile(exported["2dzip"]) as zf:
        (tmp_path / "n2v_unet.py").write_bytes(zf.read("n2v_unet.py"))
    spec = importlib.util.spec_from_file_location("standalone_unet", tmp_path / "n2v_unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "n2v_chunked" not in (tmp_path / "n2v_unet.py").read_text().split('"""', 2)[2]  # no package imports
    md = make_model_dir(tmp_path / "m", features=4, **kw)
    trained = ckpt.load_model(md, "cpu")
    net = mod.N2VUNet(**ckpt.read_config(md)["model"]).eval()
    net.load_state_dict(torch.load(md / ckpt.WEIGHTS_BEST, weights_only=True))
    x = torch.randn(2, trained.config.in_channels, *([8] * trained.config.dims))
    with torch.no_grad():
        torch.testing.assert_close(net(x), trained.model(x), rtol=0, atol=1e-6)


def test_export_cli(tmp_path, capsys):
    md = make_model_dir(tmp_path / "m", depth=1, features=4)
    out = tmp_path / "pkg.zip"
    assert main(["export", "--model-dir", str(md), str(out), "--author", "A", "--author", "B"]) == 0
    assert [a["name"] for a in _rdf(out)["authors"]] == ["A", "B"]
    assert main(["export", "--model-dir", str(md), str(out)]) == 2  # exists: no silent overwrite
    assert "exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Import: any Zoo model through the chunked pipeline.
# ----------------------------------------------------------------------------


def _image(shape, seed=1):
    return (100 + 20 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _bioimageio_whole(pkg: Path, arr: np.ndarray) -> np.ndarray:
    from bioimageio.core import Tensor, load_description
    from bioimageio.core import predict as bpredict

    descr = load_description(str(pkg))
    out = bpredict(model=descr, inputs={"image": Tensor.from_numpy(arr[None, None], dims=["batch", "channel", "y", "x"])})
    return out.members["restored"].data.values[0, 0]


def test_foreign_model_chunked_equals_bioimageio_whole_image(tmp_path):
    pkg = foreign_package(tmp_path / "f")
    arr = _image((80, 72))
    y = P.predict(xr.DataArray(arr, dims=("y", "x")), None, pkg, chunks=(24, 32), scheduler="sync",
                  progress=False).values
    ref = _bioimageio_whole(pkg, arr)
    assert np.abs(y - ref).max() <= 1e-4 * float(ref.max() - ref.min())


def test_sample_statistics_are_frozen_over_the_whole_input(tmp_path):
    """scale_range per sample: computed per block it would differ between chunkings (seams)."""
    pkg = foreign_package(tmp_path / "f", pre="scale_range")
    arr = _image((96, 80))
    arr[:48] += 60  # blocks differ in range: per-block percentiles would differ
    kw = dict(scheduler="sync", progress=False)
    a = P.predict(xr.DataArray(arr, dims=("y", "x")), None, pkg, chunks=(24, 24), **kw).values
    b = P.predict(xr.DataArray(arr, dims=("y", "x")), None, pkg, chunks=(96, 80), **kw).values
    rng = float(b.max() - b.min())
    assert np.abs(a - b).max() <= 1e-5 * rng
    ref = _bioimageio_whole(pkg, arr)  # its percentiles include the padded border: close, not equal
    assert np.abs(a - ref).max() <= 2e-2 * rng


@pytest.mark.parametrize("dims, shape, chunks", [("yx", (72, 88), (32, 40)), ("zyx", (20, 36, 28), (12, 20, 16))])
def test_our_export_reimported_predicts_like_the_model_dir(exported, dims, shape, chunks):
    key = f"{len(dims)}d"
    arr = xr.DataArray(_image(shape), dims=tuple(dims))
    kw = dict(chunks=chunks, scheduler="sync", progress=False)
    a = P.predict(arr, None, exported[key], **kw).values
    b = P.predict(arr, None, exported[key + "zip"], **kw).values
    assert np.abs(a - b).max() <= 1e-4 * float(a.max() - a.min())


def test_export_of_n2v2_with_independent_channels_passes_the_model_test(tmp_path):
    from bioimageio.core import test_model

    md = make_model_dir(tmp_path / "m", channels=2, depth=2, features=4, n2v2=True)
    meta = ckpt.read_config(md)
    meta["model"]["independent_channels"] = True
    ckpt.write_meta(md, meta)  # a shared 1-channel network: new weights of that shape
    from n2v_chunked.model.config import ModelConfig
    from n2v_chunked.model.unet import UNet

    net = UNet(ModelConfig(**meta["model"]))
    ckpt.save_weights(md, net, ckpt.WEIGHTS_BEST)
    pkg = export(md, tmp_path / "m.zip")
    for wf in ("pytorch_state_dict", "torchscript"):
        summary = test_model(str(pkg), weight_format=wf, devices=["cpu"])
        assert summary.status == "passed", summary.format()


def test_predict_cli_with_zoo_package_writes_complete_ome_zarr(tmp_path, capsys):
    from n2v_chunked.io.ome import write_ome_zarr
    from n2v_chunked.io.sources import open_image

    pkg = foreign_package(tmp_path / "f")
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(_image((64, 64)), dims=("y", "x")), dtype=None, pyramid=False, progress=False)
    out = tmp_path / "out.ome.zarr"
    assert main(["predict", str(src), str(out), "--model", str(pkg), "--chunks", "32,32", "--scheduler", "sync",
                 "--no-progress"]) == 0
    res = open_image(str(out))
    assert res.shape == (64, 64) and np.isfinite(res.values).all()
    import zarr

    prov = zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]
    assert prov["complete"] and prov["zoo"]["halo"] == [4, 4] and prov["model_dir"] == str(pkg)
    assert "wrote" in capsys.readouterr().out


def test_halo_option_when_the_package_declares_none(tmp_path):
    pkg = foreign_package(tmp_path / "f", halo=None)
    arr = xr.DataArray(_image((64, 64)), dims=("y", "x"))
    with pytest.raises(N2VError, match="declares no output halo; pass --halo"):
        P.predict(arr, None, pkg, scheduler="sync", progress=False)
    a = P.predict(arr, None, pkg, halo=3, chunks=(32, 32), scheduler="sync", progress=False).values
    b = P.predict(arr, None, pkg, halo=3, chunks=(64, 64), scheduler="sync", progress=False).values
    assert np.abs(a - b).max() <= 1e-5 * float(b.max() - b.min())


def test_probe_measures_the_reach_of_a_foreign_network(tmp_path):
    from n2v_chunked.zoo.load import load, probe_grid_and_reach, prepare
    from n2v_chunked.zoo.spec import inspect_description, read_description

    pkg = foreign_package(tmp_path / "f")
    ref = prepare(pkg, xr.DataArray(_image((64, 64)), dims=("y", "x")), check_reach=False)
    spec = inspect_description(read_description(pkg), "m")
    # 5x5 then 3x3, no pooling (grid 1)
    assert probe_grid_and_reach(load(ref, "cpu"), spec, np.array([100.0]), np.array([20.0])) == ((1, 1), (3, 3))
    assert TwoConv  # the architecture the reach comes from


def test_train_init_from_our_package_starts_from_its_weights(exported, tmp_path):
    from n2v_chunked.io.ome import write_ome_zarr

    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(_image((4, 64, 64)), dims=("t", "y", "x")), dtype=None, pyramid=False,
                   progress=False)
    md = tmp_path / "m"
    rc = main(["train", str(src), "--model-dir", str(md), "--init-from", str(exported["2dzip"]), "--steps", "1",
               "--batch-size", "2", "--lr", "1e-12", "--val-interval", "1", "--precision", "fp32", "--no-progress"])
    assert rc == 0
    old, new = ckpt.read_config(exported["2d"]), ckpt.read_config(md)
    assert new["model"] == old["model"] and new["normalization"]["mean"] == old["normalization"]["mean"]
    assert new["init_from"] == str(exported["2dzip"])
    start = torch.load(exported["2d"] / ckpt.WEIGHTS_BEST, weights_only=True)
    got = torch.load(md / ckpt.WEIGHTS_LAST, weights_only=True)
    convs = [k for k in start if k.endswith("weight") and start[k].ndim == 4]
    assert convs and all(torch.allclose(got[k], start[k], atol=1e-6) for k in convs)
