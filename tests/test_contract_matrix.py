"""The model contract at every seam: each model source x runtime x precision x mode x size.

Every source (our model directories, Zoo packages exported from them, a
package whose declared halo is smaller than its reach) promises one
:class:`~n2v_chunked.model.contract.ModelContract`; these tests check the
promises where they are used: chunked equals whole-image prediction in the
same configuration, every runtime agrees with torch fp32, the command line
with default options exits 0, and what cannot run is refused in one line.
A representative slice runs by default; the whole matrix is ``slow``.
"""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from helpers import make_model_dir, noisy

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked import prediction as P
from n2v_chunked.engine import runtimes as R
from n2v_chunked.cli import main
from n2v_chunked.errors import ConfigError, N2VError
from n2v_chunked.engine.inference import run_network
from n2v_chunked.model.contract import ModelContract, unet_contract
from n2v_chunked.prediction.options import PredictOptions, choices

SOURCES = {  # name: (kind, model options); "zoo" = exported from that model, "short" = its halo edited to 16
    "2d": ("dir", dict(dims=2, depth=2)),
    "2c-independent": ("dir", dict(channels=2)),
    "2c-joint": ("dir", dict(channels=2, independent_channels=False)),
    "3d": ("dir", dict(dims=3, depth=1)),
    "zoo-depth2": ("zoo", dict(depth=2)),
    "zoo-depth3": ("zoo", dict(depth=3)),
    "zoo-short-halo": ("short", dict(depth=2)),
}
RUNTIMES = ("torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
MODES = ("plain", "tta", "blend")
# per dims: size name -> (shape, chunks); chunks off the grid of every depth, an axis shorter than the halo
SIZES = {
    2: {"odd": ((45, 51), (24, 28)), "off-grid": ((71, 93), (30, 30)), "short-axis": ((12, 70), (30, 30))},
    3: {"odd": ((11, 21, 19), (9, 10, 11)), "off-grid": ((14, 30, 26), (10, 14, 14)),
        "short-axis": ((3, 26, 22), (10, 10, 10))},
}
TOL = {"fp32": 1e-5, "bf16": 1e-4}  # chunked vs whole, of the input's range (bf16: measured 0, test_runtime.py)
AGREE = {"fp32": 1e-4, "bf16": 5e-2}  # a runtime vs torch fp32, of the input's range (bf16: test_runtime.py's bar)


def _short_halo(pkg: Path, out: Path, halo: int = 16) -> Path:
    """A copy of ``pkg`` whose declared output halo is ``halo`` (smaller than the reach of a depth-2 U-Net)."""
    with zipfile.ZipFile(pkg) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                for axis in rdf["outputs"][0]["axes"]:
                    if "halo" in axis:
                        axis["halo"] = halo
                data = yaml.safe_dump(rdf, sort_keys=False).encode()
            dst.writestr(item, data)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each source's path, built once (tiny networks: 4 features, random weights with a blend record)."""
    root = tmp_path_factory.mktemp("contract")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            kind, kw = SOURCES[name]
            md = make_model_dir(root / name, features=4, blend=True, **kw)
            if kind != "dir":
                from n2v_chunked.zoo.export import export

                md = export(md, root / f"{name}.zip")
            if kind == "short":
                md = _short_halo(md, root / f"{name}-short.zip")
            cache[name] = md
        return cache[name]

    return get


def _dims(name: str) -> int:
    return SOURCES[name][1].get("dims", 2)


def _array(name: str, shape: tuple[int, ...], seed: int = 0) -> xr.DataArray:
    channels = SOURCES[name][1].get("channels", 1)
    spatial = ("z", "y", "x")[3 - len(shape):]
    if channels == 1:
        return xr.DataArray(noisy(shape, seed=seed), dims=spatial)
    return xr.DataArray(np.stack([noisy(shape, seed=seed + c) + 30 * c for c in range(channels)]), dims=("c", *spatial))


def _predict(model, arr: xr.DataArray, chunks, **kw) -> np.ndarray:
    y = P.predict(arr, None, model, chunks=chunks, scheduler="sync", progress=False, **kw)
    assert isinstance(y.data, da.Array)
    out = y.data.compute(scheduler="sync")
    assert out.shape == arr.shape and np.isfinite(out).all()
    return out


def _err(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    """Largest difference as a fraction of ``scale`` (the input's range; default ``b``'s)."""
    return float(np.abs(a - b).max() / max(np.ptp(b) if scale is None else scale, 1e-12))


def _refusal(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg, msg  # one line
    return msg


def check_case(sources, name: str, runtime: str, precision: str, mode: str, size: str) -> None:
    """One cell of the matrix: refused in one line, or chunked == whole and close to torch fp32."""
    if not R.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    model = sources(name)
    shape, chunks = SIZES[_dims(name)][size]
    arr = _array(name, shape)
    kw = dict(runtime=runtime, precision=precision, tta=mode == "tta", blend=mode == "blend")
    kind = SOURCES[name][0]
    if kind == "short":  # refused with the exact halo as advice; following it is exact
        with pytest.raises(N2VError) as exc:
            _predict(model, arr, chunks, **kw)
        msg = _refusal(exc)
        assert "smaller than the network's reach" in msg and msg.endswith("pass --halo 24,24"), msg
        kw["halo"] = (24, 24)
    if not R.can_run(runtime, precision) or (mode == "blend" and kind != "dir"):
        with pytest.raises(N2VError) as exc:
            _predict(model, arr, chunks, **kw)
        assert any(w in _refusal(exc) for w in ("cannot run precision", "cannot blend")), exc.value
        return
    whole = _predict(model, arr, shape, **kw)
    scale = float(np.ptp(arr.values))  # tolerances are fractions of the data's range, as in test_runtime.py
    assert _err(_predict(model, arr, chunks, **kw), whole, scale) <= TOL[precision]
    if (runtime, precision) != ("torch", "fp32"):
        ref = _predict(model, arr, shape, **{**kw, "runtime": "torch", "precision": "fp32"})
        assert _err(whole, ref, scale) <= AGREE[precision]


def check_cli_defaults(sources, name: str, tmp_path: Path) -> None:
    """The command line with default options (the fast runtime) exits 0 and writes a complete output."""
    import zarr

    from n2v_chunked.io.ome import write_ome_zarr

    model = sources(name)
    shape = SIZES[_dims(name)]["odd"][0]
    arr = _array(name, shape)
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, arr, dtype=None, pyramid=False, progress=False)
    out = tmp_path / "out.ome.zarr"
    argv = ["predict", str(src), str(out), "--model", str(model), "--scheduler", "sync", "--no-progress"]
    if SOURCES[name][0] == "short":
        argv += ["--halo", "24"]
    assert main(argv) == 0
    prov = zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]
    assert prov["complete"] and prov["weights"]["digest"]
    got = np.asarray(zarr.open_array(str(out / "0"), mode="r"))
    ref = _predict(model, arr, shape, runtime="torch", precision="fp32", halo=(24, 24) if "short" in name else None)
    assert _err(got, ref, float(np.ptp(arr.values))) <= AGREE[prov["parameters"]["precision"]]


# ----------------------------------------------------------------------------
# The representative slice (default run).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_two_channel_independent_model_runs_on_the_onnx_runtimes(sources, runtime):
    """Issue 28 item 1: the export had 1 static channel, so OpenVINO returned an empty tensor."""
    if not R.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    trained = ckpt.load_model(sources("2c-independent"), "cpu")
    assert trained.contract.independent_channels and trained.contract.in_channels == 2
    x = np.random.default_rng(0).normal(size=(3, 2, 64, 96)).astype(np.float32)
    ref = run_network(trained, x, runtime="torch", precision="fp32")
    got = run_network(trained, x, runtime=runtime, precision="fp32")
    assert got.shape == x.shape and _err(got, ref) <= 1e-5


def test_two_channel_independent_model_with_default_cli(sources, tmp_path):
    check_cli_defaults(sources, "2c-independent", tmp_path)


def test_runner_output_of_the_wrong_shape_is_refused(sources, monkeypatch):
    """The runner never hands back an empty (or otherwise wrong) tensor as a prediction."""
    from n2v_chunked.engine import inference as I

    trained = ckpt.load_model(sources("2d"), "cpu")
    monkeypatch.setattr(I, "get_runner", lambda *a: (lambda x: torch.empty((0, 1, 0, 0))))
    with pytest.raises(N2VError, match=r"returned shape \(0, 1, 0, 0\)"):
        run_network(trained, np.zeros((2, 1, 32, 32), np.float32))


@pytest.mark.parametrize("name", ["zoo-depth2", "zoo-depth3"])
def test_zoo_package_contract_carries_its_grid_and_exact_halo(sources, name):
    """Issue 28 item 2: an imported model had grid 1 (``depth=0``); now 2**depth and the exact halo."""
    depth = SOURCES[name][1]["depth"]
    src = P.open_source(sources(name), _array(name, (64, 64)))
    con = src.contract
    ours = ckpt.load_model(Path(str(sources(name))).with_suffix(""), "cpu").contract
    assert con.grid == ours.grid == (2**depth,) * 2 and con.halo == ours.halo
    assert con.torch_module and len(con.weights_digest) == 64


@pytest.mark.parametrize("name, size, mode", [("zoo-depth2", "off-grid", "plain"), ("zoo-depth3", "off-grid", "plain"),
                                              ("zoo-depth2", "off-grid", "tta")])
def test_zoo_package_chunked_equals_whole_off_the_grid(sources, name, size, mode):
    check_case(sources, name, "torch", "fp32", mode, size)


def test_zoo_package_runs_on_the_default_fast_runtime(sources):
    """Issue 28 item 8: a Zoo package runs through the same runtimes as a model directory (OpenVINO here)."""
    check_case(sources, "zoo-depth2", "openvino", "fp32", "plain", "off-grid")


def test_declared_halo_smaller_than_the_reach_is_refused_with_exact_advice(sources):
    check_case(sources, "zoo-short-halo", "torch", "fp32", "plain", "off-grid")


def test_onnxruntime_bf16_is_refused_in_one_line(sources):
    check_case(sources, "2d", "onnxruntime", "bf16", "plain", "odd")


def test_default_plan_of_a_large_image_is_on_the_grid(sources):
    """A 3001 x 3001 input at the paper's width (32 features): default blocks on the grid (a Zoo model's were 1001)."""
    import dataclasses
    import types

    arr = xr.DataArray(da.zeros((3001, 3001), chunks=(3001, 3001), dtype=np.float32), dims=("y", "x"))
    for name in ("2d", "zoo-depth2", "zoo-depth3"):
        con = P.get_model(P.open_source(sources(name), _array(name, (64, 64))), "", "cpu").contract
        p = P.plan(types.SimpleNamespace(contract=dataclasses.replace(con, features=32)), arr)
        assert p.numblocks == (3, 3) and all(c % g == 0 for c, g in zip(p.chunks, con.grid)), (name, p.chunks)


def test_contract_checks_its_halo_is_on_the_grid():
    from n2v_chunked.model.config import ModelConfig

    con = unet_contract(ModelConfig(dims=3, depth=2), [0.0], [1.0])
    assert con.spatial == ("z", "y", "x") and con.grid == (4, 4, 4) and all(h % 4 == 0 for h in con.halo)
    with pytest.raises(ValueError, match="multiple of the grid"):
        ModelContract(1, 1, 2, (4, 4), (22, 21), True, (0.0,), (1.0,))


def test_options_are_declared_once_with_the_same_defaults_for_every_door(monkeypatch, tmp_path):
    """Python, the command line and the --config file build one PredictOptions, with one set of defaults."""
    import n2v_chunked.prediction as predict_pkg
    from n2v_chunked.prediction import run as predict_run

    seen = []
    monkeypatch.setattr(predict_pkg, "predict", lambda src, out, model, opts: seen.append(opts) or xr.DataArray([]))
    assert main(["predict", "in.tif", str(tmp_path / "o.ome.zarr"), "--model", "m"]) == 0
    cli = seen[-1]
    for name in ("runtime", "precision", "boundary", "normalize", "ngff_version", "tta", "blend", "dtype", "chunks"):
        assert getattr(cli, name) == getattr(PredictOptions(), name), name
    assert PredictOptions().runtime == "auto" and PredictOptions().precision == "auto"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("predict:\n  runtime: onnxruntime\n  precision: fp32\n")
    assert main(["--config", str(cfg), "predict", "in.tif", str(tmp_path / "o2.ome.zarr"), "--model", "m"]) == 0
    assert (seen[-1].runtime, seen[-1].precision) == ("onnxruntime", "fp32")
    cfg.write_text("predict:\n  runtime: tensorrt\n")
    assert main(["--config", str(cfg), "predict", "in.tif", str(tmp_path / "o3.ome.zarr"), "--model", "m"]) != 0
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; use one of " + ", ".join(choices("runtime"))):
        predict_run.predict(np.zeros((8, 8)), None, "m", runtime="tensorrt")


# ----------------------------------------------------------------------------
# The whole matrix (slow).
# ----------------------------------------------------------------------------


def _cells():
    for name, runtime, precision, mode in itertools.product(SOURCES, RUNTIMES, PRECISIONS, MODES):
        for size in SIZES[_dims(name)]:
            yield name, runtime, precision, mode, size


@pytest.mark.slow
@pytest.mark.parametrize("name, runtime, precision, mode, size", list(_cells()))
def test_matrix(sources, name, runtime, precision, mode, size):
    check_case(sources, name, runtime, precision, mode, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_matrix_default_cli(sources, name, tmp_path):
    check_cli_defaults(sources, name, tmp_path)


def test_zoo_package_that_is_no_torch_module_runs_its_pipeline_in_fp32_and_says_so(tmp_path, monkeypatch, caplog):
    """Weights that do not load as a plain module: one info line under auto, a one-line refusal for a named runtime."""
    import logging

    from zoo_helpers import foreign_package

    import n2v_chunked.zoo.load as Z

    pkg = foreign_package(tmp_path / "f")
    arr = xr.DataArray(noisy((48, 40)), dims=("y", "x"))
    fast = _predict(pkg, arr, (24, 24))
    monkeypatch.setattr(Z, "_torch_net", lambda *a: None)
    with caplog.at_level(logging.INFO, logger="n2v_chunked.prediction.run"):
        slow = _predict(pkg, arr, (24, 24))
    assert [r for r in caplog.records if "bioimageio.core's pipeline in torch fp32" in r.getMessage()]
    assert _err(slow, fast) <= AGREE["fp32"]
    with pytest.raises(ConfigError) as exc:
        _predict(pkg, arr, (24, 24), runtime="openvino")
    assert "drop --runtime openvino" in _refusal(exc)
