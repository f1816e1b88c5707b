"""User errors vs bugs (issue 14): typed user errors, and a bug that says it is one.

Only problems a user can act on become the one-line ``n2v-chunked: error:``;
a bug in our code keeps its type and traceback and asks for a report (exit 70).
The typed :class:`N2VError` subclasses also derive from the matching built-in,
so a Python caller can catch ``FileNotFoundError`` for a missing input.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import xarray as xr

from n2v_chunked import prediction as predict_mod
from n2v_chunked.cli import main
from n2v_chunked.errors import (
    INTERNAL_ERROR_EXIT, AxesError, ConfigError, IncompatibleModelError, InputNotFoundError, LockHeldError, N2VError,
    OutputExistsError, UnreadableDataError, UnvalidatedModelError,
)
from n2v_chunked.io.ome import is_complete, write_ome_zarr
from n2v_chunked.io.sources import open_image
from n2v_chunked.prediction import blocks

from helpers import make_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m") / "m")


def _image(path):
    data = (100 + 10 * np.random.default_rng(0).standard_normal((64, 64))).astype(np.float32)
    write_ome_zarr(path, xr.DataArray(data, dims=("y", "x")), pyramid=False, progress=False)
    return path


def _predict_argv(src, out, model):
    return ["predict", str(src), str(out), "--model-dir", str(model), "--scheduler", "sync", "--no-progress"]


@pytest.mark.parametrize("cls, builtin", [
    (InputNotFoundError, FileNotFoundError), (UnreadableDataError, ValueError), (AxesError, ValueError),
    (IncompatibleModelError, ValueError), (OutputExistsError, FileExistsError), (LockHeldError, BlockingIOError),
    (ConfigError, ValueError), (UnvalidatedModelError, IncompatibleModelError),
])
def test_subclasses_are_n2verrors_and_builtins_and_survive_pickling(cls, builtin):
    exc = cls("one line", 3)
    assert isinstance(exc, N2VError) and isinstance(exc, builtin)
    back = pickle.loads(pickle.dumps(exc))  # errors travel from dask workers
    assert type(back) is cls and str(back) == "one line" and back.exit_code == 3


def test_python_api_raises_builtin_catchable_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_image(tmp_path / "missing.ome.zarr")
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict_mod.predict(str(tmp_path / "missing.ome.zarr"), str(tmp_path / "o.ome.zarr"), str(model),
                            scheduler="sync", progress=False)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        predict_mod.predict(np.zeros((64, 64), np.float32), None, str(tmp_path / "no-model"), scheduler="sync")
    src = _image(tmp_path / "in.ome.zarr")
    (tmp_path / "taken.ome.zarr").mkdir()
    (tmp_path / "taken.ome.zarr" / "zarr.json").write_text("{}")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        predict_mod.predict(str(src), str(tmp_path / "taken.ome.zarr"), str(model), scheduler="sync",
                            progress=False)
    with pytest.raises(IncompatibleModelError, match="channel"):
        predict_mod.predict(np.zeros((2, 64, 64), np.float32), None, str(model), axes="cyx", scheduler="sync")


def test_a_bug_in_a_block_keeps_its_traceback_and_asks_for_a_report(tmp_path, model, monkeypatch, capfd):
    src = _image(tmp_path / "in.ome.zarr")
    out = tmp_path / "out.ome.zarr"

    def broken(*args, **kwargs):
        return {}["missing"]  # a deliberate bug: KeyError inside the block function

    monkeypatch.setattr(blocks, "predict_block", broken)
    capfd.readouterr()
    assert main(_predict_argv(src, out, model)) == INTERNAL_ERROR_EXIT == 70
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "while predicting block (0, 0)" in err and "stays marked incomplete" in err  # the notes
    assert lines[-1] == ("n2v-chunked: internal error (a bug): KeyError: 'missing'; "
                         "please report it with the traceback above")
    assert "n2v-chunked: error:" not in err  # not dressed up as a user error
    assert not is_complete(out)
    with pytest.raises(KeyError):  # the Python API: the bug's own type, not N2VError
        predict_mod.predict(str(src), None, str(model), scheduler="sync").values


def test_machine_failures_and_user_errors_stay_one_line(tmp_path, model, monkeypatch, capfd):
    src = _image(tmp_path / "in.ome.zarr")

    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 64 GiB")

    monkeypatch.setattr(blocks, "predict_block", no_memory)
    capfd.readouterr()
    assert main(_predict_argv(src, tmp_path / "out.ome.zarr", model)) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "n2v-chunked: error: prediction stopped: block (0, 0): MemoryError: cannot allocate 64 GiB;")


def test_a_user_error_inside_a_block_keeps_its_type(tmp_path, model):
    data = (100 + 10 * np.random.default_rng(0).standard_normal((64, 64))).astype(np.float32)
    data[10, 10] = np.nan
    src = tmp_path / "nan.ome.zarr"
    write_ome_zarr(src, xr.DataArray(data, dims=("y", "x")), pyramid=False, progress=False)
    with pytest.raises(UnreadableDataError, match=r"prediction stopped: block \(0, 0\): input has \d+ NaN"):
        predict_mod.predict(str(src), str(tmp_path / "o.ome.zarr"), str(model), scheduler="sync", progress=False)


def _dataset(**kw):
    from n2v_chunked.sampling.dataset import ZarrPatchDataset

    data = kw.pop("data", np.zeros((64, 64), np.float32))
    return ZarrPatchDataset(data, **{"dims": ("y", "x"), "patch_shape": (16, 16), **kw})


@pytest.mark.parametrize(
    "call, cls, match",
    [
        (lambda: open_image(np.zeros((8, 8)), axes="yx", level=-1), ConfigError, "level must be >= 0"),
        (lambda: open_image(np.zeros((8, 8)), axes="yx", level=1), ConfigError, "single resolution level"),
        (lambda: __import__("n2v_chunked.io.stores").io.stores.parse_storage_options(["novalue"]), ConfigError,
         "KEY=VALUE"),
        (lambda: _dataset(dims=None), AxesError, "dims are required"),
        (lambda: _dataset(spatial_dims=("x", "y")), AxesError, "spatial_dims must be"),
        (lambda: _dataset(val_fraction=1.5), ConfigError, "val_fraction"),
        (lambda: _dataset(data=np.zeros((8, 8), np.float32)), ConfigError, "smaller than the patch"),
    ],
    ids=["level<0", "level-of-array", "storage-option", "no-dims", "spatial-dims", "val-fraction",
         "patch-too-big"],
)
def test_io_and_sampling_errors_are_typed(call, cls, match):
    """Issue 27: io/ and sampling/ raise the typed subclass a caller can catch, not the bare base error."""
    with pytest.raises(cls, match=match):
        call()


def _jobqueue(tmp_path, text):
    from n2v_chunked.cluster.slurm import read_jobqueue_config

    path = tmp_path / "jobqueue.yaml"
    path.write_text(text)
    return read_jobqueue_config(path)


def _zoo_package(tmp_path, rdf):
    """A Zoo package zip holding ``rdf`` as its rdf.yaml (None: no RDF at all), read as a description."""
    import zipfile

    from n2v_chunked.zoo.spec import read_description

    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("rdf.yaml" if rdf is not None else "README.md", rdf or "no RDF")
    return read_description(path)


def _mod(name):
    """A submodule of n2v_chunked by its dotted name below the package."""
    import importlib

    return importlib.import_module(f"n2v_chunked.{name}")


_TYPED = [
    # cluster/
    ("cluster-interval", lambda tmp: _mod("cluster.progress").parse_interval("fast"),
     ConfigError, "--progress-interval must be"),
    ("cluster-scheduler", lambda tmp: _mod("cluster.client")._classify("nowhere"),
     ConfigError, "unknown scheduler"),
    ("jobqueue-missing", lambda tmp: _mod("cluster.slurm").read_jobqueue_config(
        tmp / "none.yaml"), InputNotFoundError, "no such file"),
    ("jobqueue-yaml", lambda tmp: _jobqueue(tmp, "jobqueue: [\n"), ConfigError, "invalid YAML"),
    ("jobqueue-key", lambda tmp: _jobqueue(tmp, "jobqueue:\n  slurm:\n    cpus: 4\n"), ConfigError, "unknown key"),
    ("jobqueue-cores", lambda tmp: _jobqueue(tmp, "jobqueue:\n  slurm:\n    cores: -1\n"), ConfigError,
     "positive integer"),
    # zoo/
    ("zoo-halo", lambda tmp: _mod("zoo.load").parse_halo([1, -2], 2), ConfigError,
     "--halo needs one non-negative size"),
    ("zoo-no-rdf", lambda tmp: _zoo_package(tmp, None), IncompatibleModelError, "not a BioImage Model Zoo package"),
    ("zoo-rdf-list", lambda tmp: _zoo_package(tmp, "- 1\n"), IncompatibleModelError, "its RDF is not a mapping"),
    ("zoo-not-a-model", lambda tmp: _zoo_package(tmp, "type: dataset\nformat_version: 0.5.0\n"),
     IncompatibleModelError, "describes a 'dataset', not a model"),
    # training/, engine/, model/
    ("patch-axes", lambda tmp: _mod("training.loop")._check_patch([16], _mod("model.config").ModelConfig(dims=2)),
     ConfigError, "has 1 axes but the model is 2D"),
    ("mask-density", lambda tmp: _mod("training.masking").grid_cell(0.5, 2), ConfigError, "mask density 0.5"),
    ("runtime", lambda tmp: _mod("engine.runtimes").resolve("fastest", "fp32"), ConfigError, "unknown runtime"),
    ("precision", lambda tmp: _mod("engine.runtimes").resolve("torch", "fp8"), ConfigError, "unknown precision"),
    ("normalize-mode", lambda tmp: _mod("model.intensity").choose_normalization(
        np.ones((8, 8)), np.zeros(1), np.ones(1), mode="both"), ConfigError, "normalize must be one of"),
    ("stats-nan", lambda tmp: _mod("model.normalization").channel_stats(
        np.array([[np.nan, 1.0], [2.0, 3.0]]), dims=("y", "x")), UnreadableDataError, "contains NaN or Inf"),
    ("stats-constant", lambda tmp: _mod("model.normalization").channel_stats(np.ones((4, 4)), dims=("y", "x")),
     UnreadableDataError, "is constant"),
    ("stats-dims", lambda tmp: _mod("model.normalization").channel_stats(np.ones((4, 4))), AxesError,
     "dims are required"),
    # io/, sampling/, cli/
    ("level-missing", lambda tmp: open_image(_image(tmp / "in.ome.zarr"), level=5), ConfigError,
     "level 5 does not exist"),
    ("no-group", lambda tmp: _mod("io.ngff").open_group(str(tmp / "none.zarr"), "r"), InputNotFoundError,
     "no Zarr group at"),
    ("http-output", lambda tmp: _mod("io.stores").check_writable("https://example.org/out.ome.zarr"), ConfigError,
     "http\\(s\\) URLs are read-only"),
    ("no-validation-block", lambda tmp: _dataset(data=np.zeros((16, 16), np.float32), val_fraction=0.5), ConfigError,
     "cannot hold out validation data"),
    ("demo-sample", lambda tmp: _mod("cli.demo").sample_path("cells"), ConfigError, "unknown sample"),
    ("cli-option", lambda tmp: _mod("cli.commands")._Parser(prog="n2v-chunked").parse_args(["--bogus"]), ConfigError,
     "unrecognized arguments"),
]


@pytest.mark.parametrize("call, cls, match", [case[1:] for case in _TYPED], ids=[case[0] for case in _TYPED])
def test_refusals_are_typed(tmp_path, call, cls, match):
    """Issue 27: each module's refusals raise the typed subclass (a bare N2VError fails this), text unchanged."""
    with pytest.raises(cls, match=match) as info:
        call(tmp_path)
    assert type(info.value) is not N2VError
