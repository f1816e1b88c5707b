"""The bad-input catalogue (issue 7): every row of docs/bad_input.md, checked.

Each row of :data:`CASES` builds a bad input in a temporary folder and runs
``n2v_chunked.cli.main(argv)`` in-process (what the ``n2v-chunked`` console
script runs), with stderr captured by ``capfd``.  Every row must give:

* an exit code of 2 (a user error, :class:`~n2v_chunked.errors.N2VError`);
* a last stderr line ``n2v-chunked: error: ...`` naming the problem and the
  offending path or value, on one line, and no traceback anywhere;
* its inputs (data, model directory, config file, an existing output)
  byte-for-byte unchanged;
* no output that looks complete: none at all, an OME-Zarr whose
  ``n2v_chunked.complete`` flag is false, or a model directory without weights;
* nothing else new in the folder (no stray lock or temporary file).

Integer data at its type's limits is accepted, not an error: it has its own
test below.  When a row changes, change docs/bad_input.md with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
import xarray as xr
import yaml
import zarr

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.cli import main
from n2v_chunked.io.ome import is_complete, write_ome_zarr

from helpers import make_model_dir

PREFIX = "n2v-chunked: error:"
# The smallest training run that still goes through every stage (sampler,
# statistics, steps, validation, checkpoint).
FAST_TRAIN = ["--steps", "2", "--batch-size", "4", "--features", "4", "--val-interval", "2",
              "--precision", "fp32", "--no-progress"]


# ----------------------------------------------------------------------------
# Models (built once per module) and small images.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Models:
    """Model directories shared by the rows; rows only read them (hashes say so)."""

    m2d: Path  # 2D, 1 channel, trained by ``n2v-chunked train``
    m3d: Path  # 3D, 1 channel, random weights
    m2c: Path  # 2D, 2 channels, random weights


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    src = root / "train.zarr"
    zarr.create_array(str(src), shape=(4, 64, 64), chunks=(1, 32, 32), dtype="float32")[:] = _noisy((4, 64, 64))
    m2d = root / "m2d"
    rc = main(["train", str(src), "--axes", "tyx", "--model-dir", str(m2d), "--patch", "32,32", *FAST_TRAIN])
    assert rc == 0 and (m2d / ckpt.WEIGHTS_BEST).is_file()
    return Models(m2d, make_model_dir(root / "m3d", dims=3), make_model_dir(root / "m2c", channels=2))


def _noisy(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian noise around 100 (sigma 10), float32."""
    return (100 + 10 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _ome(path: Path, data: np.ndarray, dims: str, chunks: tuple[int, ...] | None = None) -> Path:
    """Write ``data`` as a complete single-level OME-Zarr (NGFF 0.5)."""
    write_ome_zarr(path, xr.DataArray(data, dims=tuple(dims)), dtype=None, chunks=chunks, pyramid=False,
                   progress=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What a row's setup built: the command, what must not change, where output would go."""

    argv: list[str]
    inputs: list[Path]
    output: Path | None
    names: list[str] = dataclasses.field(default_factory=list)  # paths/values the message must name


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of docs/bad_input.md.

    Attributes
    ----------
    id : str
        Row name (the pytest id).
    setup : callable
        ``setup(folder, models) -> Setup``; builds the inputs in ``folder``.
    expect : tuple of str
        Substrings of the error line naming the problem.
    max_seconds : float, optional
        The command must fail within this time (no hanging).
    unprivileged : bool
        Run in a subprocess without the right to bypass file permissions
        (tests run as root, for whom ``chmod`` protects nothing).
    """

    id: str
    setup: Callable[[Path, Models], Setup]
    expect: tuple[str, ...]
    max_seconds: float | None = None
    unprivileged: bool = False


def _predict(tmp: Path, src: Path | str, model: Path, *extra: str, names: list[str] | None = None,
             inputs: list[Path] | None = None) -> Setup:
    out = tmp / "out.ome.zarr"
    argv = ["predict", str(src), str(out), "--model-dir", str(model), "--scheduler", "sync", "--no-progress", *extra]
    return Setup(argv, [Path(src), model, *(inputs or [])], out, names or [])


def _train(tmp: Path, src: Path, *extra: str, names: list[str] | None = None) -> Setup:
    out = tmp / "model"
    argv = ["train", str(src), "--model-dir", str(out), *FAST_TRAIN, *extra]
    return Setup(argv, [src], out, names or [])


def _convert(tmp: Path, src: Path, names: list[str] | None = None) -> Setup:
    out = tmp / "out.ome.zarr"
    return Setup(["convert", str(src), str(out)], [src], out, names or [])


def _truncated_tiff(tmp: Path, m: Models) -> Setup:
    # a 20-slice ImageJ stack cut short by an interrupted copy: once read as its first slice
    src = tmp / "image.tif"
    tifffile.imwrite(src, _noisy((20, 32, 32)), imagej=True, metadata={"axes": "ZYX"})
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp / "out.ome.zarr"
    return Setup(["convert", str(src), str(out), "--axes", "zyx", "--no-progress"], [src], out, [str(src)])


def _axes_contradict_metadata(tmp: Path, m: Models) -> Setup:
    # info prints the canonical order (cyx); --axes is read in the stored order (yxc)
    src = tmp / "rgb.tif"
    tifffile.imwrite(src, np.zeros((48, 64, 3), np.uint8), photometric="rgb")
    out = tmp / "out.ome.zarr"
    return Setup(["convert", str(src), str(out), "--axes", "cyx", "--no-progress"], [src], out,
                 [str(src), "'??c'", "--axes yxc"])


def _missing_input(tmp: Path, m: Models) -> Setup:
    src = tmp / "no-such-image.ome.zarr"
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _missing_model(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _predict(tmp, src, tmp / "no-such-model", names=[str(tmp / "no-such-model")])


def _random_bytes_tif(tmp: Path, m: Models) -> Setup:
    src = tmp / "image.tif"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _text_file(tmp: Path, m: Models) -> Setup:
    src = tmp / "notes.txt"
    src.write_text("not an image\n")
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _empty_zarr_group(tmp: Path, m: Models) -> Setup:
    src = tmp / "empty.zarr"
    zarr.open_group(str(src), mode="w")
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _hcs_plate(tmp: Path, m: Models) -> Setup:
    # a plate is many images: convert refuses it, never converting its first field (train and predict take it)
    src = tmp / "plate.ome.zarr"
    root = zarr.open_group(str(src), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "plate": {"rows": [{"name": "B"}], "columns": [{"name": "3"}],
                                                     "wells": [{"path": "B/3", "rowIndex": 0, "columnIndex": 0}]}}
    well = root.require_group("B").require_group("3")
    well.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "0"}, {"path": "1"}]}}
    for field in "01":
        _ome(src / "B" / "3" / field, _noisy((64, 64)), "yx")
    return _convert(tmp, src, names=[str(src), f"{src}/B/3/0"])


def _bioformats2raw_container(tmp: Path, m: Models) -> Setup:
    # two series: once read as series 0 alone, silently
    src = tmp / "container.zarr"
    zarr.open_group(str(src), mode="w", zarr_format=3).attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    for series in "01":
        _ome(src / series, _noisy((64, 64)), "yx")
    return _convert(tmp, src, names=[str(src), f"{src}/0"])


def _zarr_group_without_multiscales(tmp: Path, m: Models) -> Setup:
    # two arrays and no multiscales: no single obvious image to pick
    src = tmp / "plain.zarr"
    g = zarr.open_group(str(src), mode="w")
    for name in ("raw", "labels"):
        g.create_array(name, shape=(64, 64), chunks=(32, 32), dtype="float32")[:] = _noisy((64, 64))
    return _predict(tmp, src, m.m2d, names=[str(src), "raw"])


def _ngff_with_axes(tmp: Path, axes: list[dict[str, str]]) -> Path:
    """A valid 2D OME-Zarr whose multiscales axes are then replaced by ``axes``."""
    src = _ome(tmp / "axes.ome.zarr", _noisy((64, 64)), "yx")
    g = zarr.open_group(str(src), mode="r+")
    ome = dict(g.attrs["ome"])
    ome["multiscales"] = [{**ome["multiscales"][0], "axes": axes}]
    g.attrs["ome"] = ome
    return src


def _ngff_duplicate_axes(tmp: Path, m: Models) -> Setup:
    src = _ngff_with_axes(tmp, [{"name": "y", "type": "space"}, {"name": "y", "type": "space"}])
    return _predict(tmp, src, m.m2d, names=[str(src), "'y'"])


def _ngff_unknown_axis(tmp: Path, m: Models) -> Setup:
    src = _ngff_with_axes(tmp, [{"name": "angle", "type": "angle"}, {"name": "x", "type": "space"}])
    return _predict(tmp, src, m.m2d, names=[str(src), "'angle'"])


def _ngff_wrong_axis_type(tmp: Path, m: Models) -> Setup:
    src = _ngff_with_axes(tmp, [{"name": "y", "type": "space"}, {"name": "x", "type": "time"}])
    return _predict(tmp, src, m.m2d, names=[str(src), "'x'", "'time'"])


def _corrupt(src: Path) -> Path:
    """Overwrite the last stored chunk of level 0 with bytes no codec decodes."""
    chunk = sorted(p for p in (src / "0" / "c").rglob("*") if p.is_file())[-1]
    chunk.write_bytes(b"garbage" * 10)
    return chunk


def _corrupt_chunk_predict(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx", chunks=(32, 32))
    _corrupt(src)
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _corrupt_chunk_train(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((4, 64, 64)), "tyx", chunks=(1, 32, 32))
    _corrupt(src)
    return _train(tmp, src, "--patch", "32,32", names=[str(src)])


def _with_value(shape: tuple[int, ...], value: float) -> np.ndarray:
    """Noise with one ``value`` in the middle (far from the borders and their reflections)."""
    data = _noisy(shape)
    data[tuple(s // 2 for s in shape)] = value
    return data


def _nan_train(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "nan.ome.zarr", _with_value((4, 64, 64), np.nan), "tyx", chunks=(1, 32, 32))
    return _train(tmp, src, "--patch", "32,32", names=[str(src)])


def _inf_train(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "inf.ome.zarr", _with_value((4, 64, 64), np.inf), "tyx", chunks=(1, 32, 32))
    return _train(tmp, src, "--patch", "32,32", names=[str(src)])


def _nan_predict(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "nan.ome.zarr", _with_value((64, 64), np.nan), "yx"), m.m2d)


def _inf_predict(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "inf.ome.zarr", _with_value((64, 64), -np.inf), "yx"), m.m2d)


def _nan_normalize_data(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "nan.ome.zarr", _with_value((64, 64), np.nan), "yx")
    return _predict(tmp, src, m.m2d, "--normalize", "data", names=[str(src)])


def _one_pixel_axis_predict(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "line.ome.zarr", _noisy((64, 1)), "yx"), m.m2d, names=["x=1"])


def _one_pixel_axis_train(tmp: Path, m: Models) -> Setup:
    return _train(tmp, _ome(tmp / "line.ome.zarr", _noisy((64, 1)), "yx"), names=["'x'", "1 pixel"])


def _smaller_than_patch_train(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "small.ome.zarr", _noisy((20, 24)), "yx")
    return _train(tmp, src, "--patch", "32,32", names=["32", "20 pixels"])


def _mask_density_too_high(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _train(tmp, src, "--mask-density", "0.45", names=["0.45", "0.25", "2D"])


def _model_3d_on_2d(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m3d, names=["3D", "axes yx"])


def _model_other_channels(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _predict(tmp, src, m.m2c, names=["2 channel(s)", "has 1"])


def _blend_without_record(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((2, 64, 64)), "cyx")
    return _predict(tmp, src, m.m2c, "--blend")


def _runtime_without_precision(tmp: Path, m: Models) -> Setup:
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _predict(tmp, src, m.m2d, "--runtime", "onnxruntime", "--precision", "bf16")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncated_checkpoint(tmp: Path, m: Models) -> Setup:
    model = _copy_model(m.m2d, tmp / "model")
    weights = model / ckpt.WEIGHTS_BEST
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), model, names=[str(weights)])


def _config_unknown_key(tmp: Path, m: Models) -> Setup:
    cfg = tmp / "n2v.yaml"
    cfg.write_text("predict:\n  chunkz: [64, 64]\n")
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, names=[str(cfg), "chunkz"],
                 inputs=[cfg])
    s.argv = ["--config", str(cfg), *s.argv]
    return s


def _config_wrong_type(tmp: Path, m: Models) -> Setup:
    cfg = tmp / "n2v.yaml"
    cfg.write_text('predict:\n  batch_blocks: "8"\n')  # quoted: a string, not the number of blocks
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, names=[str(cfg), "'8'"],
                 inputs=[cfg])
    s.argv = ["--config", str(cfg), *s.argv]
    return s


def _model_config_wrong_type(tmp: Path, m: Models) -> Setup:
    model = _copy_model(m.m2d, tmp / "model")
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    meta["model"]["n2v2"] = "no"  # a truthy string: once an N2V2 network built for N2V weights
    (model / ckpt.CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _predict(tmp, src, model, names=[str(model / ckpt.CONFIG), "'n2v2'", "'no'"])


def _model_config_unknown_key(tmp: Path, m: Models) -> Setup:
    model = _copy_model(m.m2d, tmp / "model")
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    meta["model"]["featurez"] = 8
    (model / ckpt.CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    return _predict(tmp, src, model, names=[str(model / ckpt.CONFIG), "featurez"])


def _existing_output(tmp: Path, m: Models) -> Setup:
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d)
    zarr.open_group(str(s.output), mode="w").attrs["mine"] = "keep me"  # someone's store: must survive
    s.inputs.append(s.output)
    s.names.append(str(s.output))
    return s


def _read_only_output_dir(tmp: Path, m: Models) -> Setup:
    # everything in ``tmp``: an unprivileged process must be able to read it
    model = _copy_model(m.m2d, tmp / "model")
    src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
    parent = tmp / "results"
    parent.mkdir()
    s = _predict(tmp, src, model)
    s.output = parent / "out.ome.zarr"
    s.argv[2] = str(s.output)
    s.names += [str(s.output), str(parent)]
    parent.chmod(0o555)
    return s


def _unreachable_scheduler(tmp: Path, m: Models) -> Setup:
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, names=[address])
    s.argv[s.argv.index("sync")] = address
    return s


def _zoo(tmp: Path, **kw) -> Path:
    """A foreign Zoo package (tests/zoo_helpers.py), as a .zip."""
    from zoo_helpers import foreign_package

    return foreign_package(tmp / "pkg", **kw)


def _zoo_folder(tmp: Path, edit: Callable[[dict], None]) -> Path:
    """The foreign package unpacked into a folder, its rdf.yaml edited."""
    import zipfile

    folder = tmp / "unpacked"
    with zipfile.ZipFile(_zoo(tmp)) as zf:
        zf.extractall(folder)
    shutil.rmtree(tmp / "pkg")
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    edit(rdf)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    return folder


def _zoo_predict(tmp: Path, model: Path) -> Setup:
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), model)


def _zoo_invalid(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo_folder(tmp, lambda rdf: rdf.pop("inputs")))


def _zoo_newer_format(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo_folder(tmp, lambda rdf: rdf.update(format_version="0.9.0")))


def _zoo_two_inputs(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo(tmp, two_inputs=True))


def _zoo_onnx_only(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo(tmp, onnx_only=True))


def _zoo_no_halo(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo(tmp, halo=None))


def _zoo_halo_too_small(tmp: Path, m: Models) -> Setup:
    return _zoo_predict(tmp, _zoo(tmp, halo=1))


def _stopped_before_validation(tmp: Path, m: Models) -> Path:
    """A copy of m2d as a run killed before its first validation leaves it: step-2 weights, none validated."""
    model = tmp / "stopped"
    shutil.copytree(m.m2d, model)
    (model / ckpt.WEIGHTS_BEST).unlink()
    return model


def _unvalidated_predict(tmp: Path, m: Models) -> Setup:
    model = _stopped_before_validation(tmp, m)
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), model, names=[str(model)])


def _unvalidated_export(tmp: Path, m: Models) -> Setup:
    model = _stopped_before_validation(tmp, m)
    out = tmp / "pkg.zip"
    return Setup(["export", str(out), "--model-dir", str(model)], [model], out, [str(model)])


def _unvalidated_init_from(tmp: Path, m: Models) -> Setup:
    model = _stopped_before_validation(tmp, m)
    s = _train(tmp, _ome(tmp / "in.ome.zarr", _noisy((4, 64, 64)), "tyx"), "--init-from", str(model),
               names=[str(model)])
    s.inputs.append(model)
    return s


def _resume(tmp: Path, m: Models, *extra: str) -> Setup:
    """``train --resume`` of a copy of m2d (trained with FAST_TRAIN) with ``extra`` options."""
    model = tmp / "resumed"
    shutil.copytree(m.m2d, model)
    src = m.m2d.parent / "train.zarr"
    argv = ["train", str(src), "--axes", "tyx", "--model-dir", str(model), "--resume", "--no-progress", *extra]
    return Setup(argv, [src, model], None, [])


def _resume_batch_size(tmp: Path, m: Models) -> Setup:
    return _resume(tmp, m, "--batch-size", "8")


def _resume_depth(tmp: Path, m: Models) -> Setup:
    return _resume(tmp, m, "--depth", "3")


def _init_from_foreign(tmp: Path, m: Models) -> Setup:
    pkg = _zoo(tmp)
    src = _ome(tmp / "in.ome.zarr", _noisy((4, 64, 64)), "tyx")
    s = _train(tmp, src, "--init-from", str(pkg))
    s.inputs.append(pkg)
    return s


def _http_output(tmp: Path, m: Models) -> Setup:
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, names=["http://127.0.0.1:9/out.zarr"])
    s.argv[2] = "http://127.0.0.1:9/out.zarr"  # nothing listens there: refused before any request
    return s


def _http_server_as_scheduler(tmp: Path, m: Models) -> Setup:
    import http.server
    import threading

    # an HTTP server (like the dashboard port) accepts the connection but never greets like a scheduler;
    # a daemon thread: it lives as long as the test process
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    address = f"tcp://127.0.0.1:{srv.server_address[1]}"
    s = _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, names=[address])
    s.argv[s.argv.index("sync")] = address
    return s


def _negative_chunks(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, "--chunks", "-8,32",
                    names=["-8,32"])


def _vendor_format_without_plugin(tmp: Path, m: Models) -> Setup:
    src = tmp / "scan.czi"
    src.write_bytes(b"ZISRAWFILE" + bytes(200))  # the CZI magic; no CZI plugin is installed
    return _predict(tmp, src, m.m2d, names=[str(src)])


def _bad_progress_interval(tmp: Path, m: Models) -> Setup:
    return _predict(tmp, _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx"), m.m2d, "--progress-interval", "0",
                    names=["'0'"])


def _tensorboard_missing(tmp: Path, m: Models) -> Setup:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        src = _ome(tmp / "in.ome.zarr", _noisy((64, 64)), "yx")
        return _train(tmp, src, "--tensorboard", names=["n2v-chunked[tensorboard]"])
    pytest.skip("tensorboard is installed")


CASES: list[Case] = [
    Case("missing-input", _missing_input, ("input not found",)),
    Case("missing-model-dir", _missing_model, ("model directory not found",)),
    Case("random-bytes-tif", _random_bytes_tif, ("cannot read TIFF",)),
    Case("text-file", _text_file, ("unsupported input file",)),
    Case("axes-contradict-metadata", _axes_contradict_metadata, ("--axes cyx contradicts the metadata", "stored")),
    Case("truncated-tiff", _truncated_tiff, ("is truncated", "ImageJ metadata says 20 images")),
    Case("empty-zarr-group", _empty_zarr_group, ("no OME-Zarr multiscales metadata", "holds no arrays")),
    Case("hcs-plate", _hcs_plate, ("is an HCS plate of 1 well(s)", "`n2v-chunked info` lists its images",
                                   "take it whole")),
    Case("bioformats2raw-container", _bioformats2raw_container,
         ("is a bioformats2raw container of several images", "`n2v-chunked info` lists its images")),
    Case("zarr-group-without-multiscales", _zarr_group_without_multiscales,
         ("no OME-Zarr multiscales metadata", "several arrays")),
    Case("ngff-duplicate-axes", _ngff_duplicate_axes, ("axes", "repeated")),
    Case("ngff-unknown-axis", _ngff_unknown_axis, ("axes", "unknown axis name")),
    Case("ngff-wrong-axis-type", _ngff_wrong_axis_type, ("axes", "type")),
    Case("corrupt-chunk-predict", _corrupt_chunk_predict, ("chunk", "corrupt", "stays marked incomplete")),
    Case("corrupt-chunk-train", _corrupt_chunk_train, ("chunk", "corrupt")),
    Case("nan-train", _nan_train, ("NaN or Inf",)),
    Case("inf-train", _inf_train, ("NaN or Inf",)),
    Case("nan-predict", _nan_predict, ("input has 1 NaN/Inf value(s)",)),
    Case("inf-predict", _inf_predict, ("input has 1 NaN/Inf value(s)",)),
    Case("nan-normalize-data", _nan_normalize_data, ("--normalize data", "NaN or Inf")),
    Case("one-pixel-axis-predict", _one_pixel_axis_predict, ("smaller than 2**depth",)),
    Case("one-pixel-axis-train", _one_pixel_axis_train, ("fewer than the 4",)),
    Case("smaller-than-patch-train", _smaller_than_patch_train, ("larger than the image",)),
    Case("mask-density-too-high", _mask_density_too_high, ("mask density", "at most")),
    Case("model-3d-on-2d-data", _model_3d_on_2d, ("no z axis",)),
    Case("model-other-channel-count", _model_other_channels, ("trained for",)),
    Case("blend-without-noise-record", _blend_without_record, ("cannot blend", "--blend")),
    Case("runtime-without-precision", _runtime_without_precision,
         ("runtime onnxruntime cannot run precision bf16", "--precision fp32")),
    Case("truncated-checkpoint", _truncated_checkpoint, ("corrupt or truncated checkpoint",)),
    Case("config-unknown-key", _config_unknown_key, ("unknown option(s) for 'predict'",)),
    Case("config-wrong-type", _config_wrong_type, ("'batch_blocks' = '8' is a string, expected an integer",)),
    Case("model-config-wrong-type", _model_config_wrong_type,
         ("config section 'model': 'n2v2' = 'no' is a string, expected true or false",)),
    Case("model-config-unknown-key", _model_config_unknown_key, ("unknown config key(s) in section 'model'",)),
    Case("existing-output", _existing_output, ("exists", "--overwrite")),
    Case("read-only-output-dir", _read_only_output_dir, ("cannot create",), unprivileged=True),
    Case("unreachable-scheduler", _unreachable_scheduler, ("cannot reach the dask scheduler",), max_seconds=5.0),
    Case("zoo-invalid-package", _zoo_invalid, ("fails validation", "inputs")),
    Case("zoo-newer-format", _zoo_newer_format, ("format version 0.9.0", "newer than")),
    Case("zoo-two-inputs", _zoo_two_inputs, ("2 input(s)", "one image input")),
    Case("zoo-missing-weight-format", _zoo_onnx_only, ("weights as onnx only", "pytorch_state_dict or torchscript")),
    Case("zoo-no-halo", _zoo_no_halo, ("declares no output halo", "--halo")),
    Case("zoo-halo-too-small", _zoo_halo_too_small, ("halo [1, 1] is smaller than the network's reach [3, 3]",
                                                     "--halo 3,3")),
    Case("init-from-foreign-zoo-model", _init_from_foreign, ("not an N2V model of n2v_chunked",)),
    Case("unvalidated-predict", _unvalidated_predict,
         ("holds no validated weights", "(last checkpoint: step 2)", "--resume", "--allow-unvalidated")),
    Case("unvalidated-export", _unvalidated_export, ("holds no validated weights", "--allow-unvalidated")),
    Case("unvalidated-init-from", _unvalidated_init_from, ("holds no validated weights", "--allow-unvalidated")),
    Case("resume-batch-size", _resume_batch_size,
         ("--batch-size cannot change on --resume (stored 4, asked 8)", "batch size")),
    Case("resume-depth", _resume_depth, ("network setting depth cannot change on --resume (stored 2, asked 3)",)),
    Case("http-output", _http_output, ("http(s) URLs are read-only",), max_seconds=5.0),
    Case("http-server-as-scheduler", _http_server_as_scheduler, ("is not a dask scheduler", "8786"), max_seconds=15.0),
    Case("negative-chunks", _negative_chunks, ("chunks must be positive",)),
    Case("bad-progress-interval", _bad_progress_interval, ("--progress-interval must be seconds",)),
    Case("tensorboard-missing", _tensorboard_missing, ("--tensorboard needs the tensorboard package",)),
    Case("vendor-format-without-plugin", _vendor_format_without_plugin,
         ("no bioio reader", "n2v-chunked[formats]", "bioio-czi")),
]


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------


def _digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under each path (a missing path is recorded as missing)."""
    out: dict[str, str] = {}
    for root in paths:
        if not root.exists():
            out[str(root)] = "<missing>"
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _looks_complete(path: Path | None) -> bool:
    """True for an output a user could take as finished."""
    if path is None or not path.exists():
        return False
    if (path / ckpt.CONFIG).exists():  # a model directory: usable once it has weights
        return (path / ckpt.WEIGHTS_BEST).exists() or (path / ckpt.WEIGHTS_LAST).exists()
    if any((path / m).exists() for m in ("zarr.json", ".zgroup")):
        return is_complete(path)
    return False


def _check(case: Case, s: Setup, rc: int, err: str, before: dict[str, str], folder: Path,
           listed: set[Path]) -> None:
    """Every promise of the catalogue for one run.

    ``listed`` is ``folder``'s content before the run: afterwards only the
    output may have been added (no stray lock or temporary files).
    """
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, f"exit {rc} and nothing on stderr"
    last = lines[-1]
    assert last.startswith(PREFIX), err
    # one error line, the last; warnings (``n2v-chunked: warning: ...``) may come before it, never after
    assert sum(PREFIX in ln for ln in lines) == 1, f"the message is not one line:\n{err}"
    assert all(ln.startswith("n2v-chunked: warning:") for ln in lines[:-1] if "n2v-chunked:" in ln), err
    for text in (*case.expect, *s.names):
        assert text in last, f"{text!r} not in {last!r}"
    assert rc == 2, (rc, err)
    assert _digest(s.inputs) == before, "an input changed"
    assert not _looks_complete(s.output), f"{s.output} looks complete"
    added = {p for p in _listing(folder) - listed if s.output is None or not p.is_relative_to(s.output)}
    assert not added, f"left behind: {sorted(map(str, added))}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, models: Models, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    if case.unprivileged:
        _run_unprivileged(case, models)
        return
    s = case.setup(tmp_path, models)
    before, listed = _digest(s.inputs), _listing(tmp_path)
    capfd.readouterr()
    t0 = time.monotonic()
    rc = main(s.argv)
    seconds = time.monotonic() - t0
    _check(case, s, rc, capfd.readouterr().err, before, tmp_path, listed)
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, f"took {seconds:.1f} s"


# ----------------------------------------------------------------------------
# The read-only output directory: a subprocess that cannot bypass permissions.
# ----------------------------------------------------------------------------

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
NOBODY = 65534


def _drop_privileges() -> None:
    """``preexec_fn``: make a root child obey file permissions.

    First choice: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so the exec'd root process is an ordinary owner (and can
    still run a Python that lives under /root, as in our CI).  Without
    CAP_SETPCAP, become ``nobody`` instead.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if all(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH)):
        return
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _cli_subprocess(argv: list[str], cwd: Path, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "n2v_chunked.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120, preexec_fn=_drop_privileges if unprivileged else None,
    )


def _run_unprivileged(case: Case, models: Models) -> None:
    # pytest's tmp_path lies under a 0700 folder: use a world-readable one
    base = Path(tempfile.mkdtemp(prefix="n2v-bad-input-"))
    try:
        base.chmod(0o755)
        s = case.setup(base, models)
        before, listed = _digest(s.inputs), _listing(base)
        try:
            res = _cli_subprocess(s.argv, base, unprivileged=True)
        except subprocess.TimeoutExpired:
            raise  # a hang is a failure, not a missing privilege
        except (PermissionError, subprocess.SubprocessError) as exc:  # exec or preexec_fn refused
            pytest.skip(f"cannot run an unprivileged Python here: {exc}")
        _check(case, s, res.returncode, res.stderr, before, base, listed)
    finally:
        for d in base.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------
# The console path, and data that is not an error.
# ----------------------------------------------------------------------------


def test_console_script_path(models: Models, tmp_path: Path) -> None:
    """One row through ``python -m n2v_chunked.cli``; ``--debug`` brings the traceback back."""
    case = next(c for c in CASES if c.id == "text-file")
    s = case.setup(tmp_path, models)
    before, listed = _digest(s.inputs), _listing(tmp_path)
    res = _cli_subprocess(s.argv, tmp_path)
    _check(case, s, res.returncode, res.stderr, before, tmp_path, listed)
    debug = _cli_subprocess(["--debug", *s.argv], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UnreadableDataError" in debug.stderr  # an N2VError subclass


@pytest.mark.parametrize("dtype", ["uint16", "int16"])
def test_integer_limits_are_accepted(dtype: str, models: Models, tmp_path: Path,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    """Pixels at 0/65535 (uint16) or -32768/32767 (int16) predict like the same values as floats.

    A wrap-around (65535 read as -1, or an overflow in the normalisation)
    would make the output differ from the float reference; an integer
    output must be rounded and clipped, never wrapped.
    """
    from n2v_chunked.prediction import predict

    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    data = rng.choice(np.array([info.min, info.max, info.min // 2 + info.max // 2], dtype=dtype), size=(64, 64))
    data[0, 0], data[-1, -1] = info.min, info.max
    src = _ome(tmp_path / "in.ome.zarr", data, "yx")
    before = _digest([src])
    reference = predict(data.astype(np.float32), None, models.m2d, scheduler="sync", progress=False).values
    assert np.isfinite(reference).all()
    for out_dtype in ("float32", dtype):
        out = tmp_path / f"out-{out_dtype}.ome.zarr"
        rc = main(["predict", str(src), str(out), "--model-dir", str(models.m2d), "--dtype", out_dtype,
                   "--scheduler", "sync", "--no-progress", "--precision", "fp32", "--runtime", "torch"])
        assert rc == 0, capfd.readouterr().err
        assert is_complete(out)
        got = zarr.open_array(str(out / "0"), mode="r")[:]
        assert got.dtype == np.dtype(out_dtype)
        if out_dtype == "float32":
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))
        else:  # rounded and clipped to the type's range: a wrapped value would sit at the other end
            want = np.clip(np.rint(reference), info.min, info.max)
            assert np.abs(got.astype(np.float64) - want).max() <= 1
    assert _digest([src]) == before
