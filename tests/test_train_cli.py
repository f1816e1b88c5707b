"""`n2v-chunked train` end to end: streaming from Zarr/TIFF, odd sizes, resume, DDP under torchrun."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.training import plots
from n2v_chunked.cli import main
from n2v_chunked.model.config import ModelConfig
from n2v_chunked.training.fit import fit_patch_shape

FAST = ["--steps", "3", "--batch-size", "8", "--features", "4", "--val-interval", "2", "--no-progress"]


def _zarr_stack(path: Path, shape=(6, 80, 72), chunks=(1, 40, 36), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    z = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32")
    z[:] = (100 + 10 * rng.standard_normal(shape)).astype(np.float32)
    return path


def test_train_from_plain_zarr_and_resume(tmp_path, capsys):
    src = _zarr_stack(tmp_path / "in.zarr")
    model = tmp_path / "model"
    assert main(["train", str(src), "--axes", "tyx", "--model-dir", str(model), "--patch", "32,32", *FAST]) == 0
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    assert meta["model"]["dims"] == 2 and meta["axes"] == "tyx"
    assert meta["train"]["patch_size"] == [32, 32]
    assert meta["mask"]["replacement"] == "median" and meta["mask"]["density"] == 1 / 64  # N2V2's; the paper's density
    assert meta["train"]["stop_patience"] == 10 and meta["model"]["independent_channels"] is True
    assert ckpt.load_training_state(model)["step"] == 3
    # a second train into the same directory is refused; --resume continues it
    assert main(["train", str(src), "--axes", "tyx", "--model-dir", str(model), *FAST]) == 2
    assert "already holds a model" in capsys.readouterr().err
    args = ["train", str(src), "--axes", "tyx", "--model-dir", str(model), "--resume", *FAST]
    args[args.index("3")] = "5"
    assert main(args) == 0
    assert ckpt.load_training_state(model)["step"] == 5


@pytest.mark.parametrize(
    "flags, replacement, joint, stop, density, lr, ema",
    [([], "median", False, 10, 1 / 64, 4e-4, 0.999), (["--paper"], "uniform", True, 0, 1 / 64, 4e-4, 0.0),
     (["--paper", "--replacement", "median", "--lr", "1e-3"], "median", True, 0, 1 / 64, 1e-3, 0.0),
     (["--paper", "--mask-density", "0.0625", "--ema", "0.99"], "uniform", True, 0, 1 / 16, 4e-4, 0.99),
     (["--replacement", "uniform", "--stop-patience", "3", "--ema", "0"], "uniform", False, 3, 1 / 64, 4e-4, 0.0),
     (["--n2v2"], "median", False, 10, 1 / 64, 4e-4, 0.999)],
)
def test_measured_defaults_and_the_paper_preset(tmp_path, flags, replacement, joint, stop, density, lr, ema):
    src = _zarr_stack(tmp_path / "in.zarr")
    model = tmp_path / "model"
    assert main(["train", str(src), "--axes", "tyx", "--model-dir", str(model), "--patch", "32,32",
                 *FAST, "--steps", "1", *flags]) == 0
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    assert meta["mask"]["replacement"] == replacement and meta["train"]["stop_patience"] == stop
    assert meta["mask"]["density"] == density and meta["train"]["lr"] == lr and meta["train"]["ema"] == ema
    assert meta["model"]["independent_channels"] is not joint and meta["model"]["n2v2"] is ("--n2v2" in flags)


def test_3d_stack_with_few_slices_and_odd_sizes(tmp_path):
    # 5 slices and odd sizes: the default patch shrinks to fit instead of crashing
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "few.tif", rng.normal(50, 5, (5, 61, 47)).astype(np.float32),
                     imagej=True, metadata={"axes": "ZYX"})
    model = tmp_path / "m3d"
    # fp32: "auto" is bf16 on CPUs with AVX-512 BF16/AMX (GPU hosts), so the run would differ by machine (issue 28 item 7)
    assert main(["train", str(tmp_path / "few.tif"), "--model-dir", str(model), "--val-fraction", "0.2", *FAST,
                 "--precision", "fp32"]) == 0
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    assert meta["model"]["dims"] == 3
    assert meta["train"]["patch_size"] == [4, 32, 32]


def test_patch_shape_rules():
    cfg = ModelConfig(dims=3)
    assert fit_patch_shape({"z": 9, "y": 100, "x": 100}, ("z", "y", "x"), cfg, None) == [8, 32, 32]
    with pytest.raises(Exception, match="larger than the image"):
        fit_patch_shape({"y": 50, "x": 100}, ("y", "x"), ModelConfig(), [64, 64])
    with pytest.raises(Exception, match="fewer than the 4"):
        fit_patch_shape({"z": 3, "y": 100, "x": 100}, ("z", "y", "x"), cfg, None)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--patch", "200,200"], "larger than the image"),
        (["--dims", "3"], "needs a 'z' axis"),
        (["--depth", "9"], "depth must be between"),
    ],
)
def test_bad_training_input_is_one_line(tmp_path, capsys, args, message):
    src = _zarr_stack(tmp_path / "in.zarr")
    code = main(["train", str(src), "--axes", "tyx", "--model-dir", str(tmp_path / "m"), *FAST, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("n2v-chunked: error:") and message in err[0]
    assert not (tmp_path / "m" / ckpt.WEIGHTS_LAST).exists()


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes (gloo): one model directory written by rank 0."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this Python")
    src = _zarr_stack(tmp_path / "in.zarr", shape=(8, 64, 64), chunks=(1, 32, 32))
    model = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "n2v_chunked.cli", "train", str(src),
           "--axes", "tyx", "--model-dir", str(model), "--patch", "32,32", "--device", "cpu", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                          "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    assert meta["world_size"] == 2
    state = ckpt.load_training_state(model)
    assert state["step"] == 3
    # checkpoints only from rank 0: no stray temporary files from a second writer
    assert sorted(p.name for p in model.iterdir()) == sorted(
        [ckpt.CONFIG, ckpt.WEIGHTS_BEST, ckpt.WEIGHTS_LAST, ckpt.STATE, plots.CSV, plots.PLOT, plots.PREVIEW])
    weights = torch.load(model / ckpt.WEIGHTS_LAST, weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


@pytest.mark.parametrize("nan", [np.s_[:, :], np.s_[64, 64]])  # every pixel; one pixel of the only chunk
def test_nan_image_stops_with_one_line(tmp_path, nan):
    """Issue 14 (11, 12): one NaN in a single-chunk image is named as such; an all-NaN image hung forever."""
    import os

    img = (100 + 10 * np.random.default_rng(0).standard_normal((128, 128))).astype(np.float32)
    img[nan] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", img)
    proc = subprocess.run(
        [sys.executable, "-m", "n2v_chunked.cli", "train", str(tmp_path / "nan.tif"), "--axes", "yx",
         "--model-dir", str(tmp_path / "m"), "--steps", "2", "--no-progress"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("n2v-chunked: error: ") and "contains NaN or Inf values" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()


def test_resume_after_an_early_stop_takes_the_given_options(tmp_path, monkeypatch, capsys):
    """Issue 28 item 5: `train --resume --stop-patience 0 --ema 0 --lr 0.001` trains on, with those values recorded."""
    from n2v_chunked.training import loop as train_module

    losses = iter([2.0, 1.0] + [1.1 + 0.01 * i for i in range(100)])  # untrained, best at step 2, then worse
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: (next(losses), [0.5]))
    src = _zarr_stack(tmp_path / "in.zarr")
    model = tmp_path / "model"
    base = ["train", str(src), "--axes", "tyx", "--model-dir", str(model), "--patch", "32,32", "--batch-size", "8",
            "--features", "4", "--val-interval", "2", "--no-progress"]
    assert main([*base, "--steps", "20", "--stop-patience", "1"]) == 0
    assert ckpt.load_training_state(model)["step"] == 4  # early stop
    # the given options take effect; --features equal to the stored one is no change; the rest stays stored
    assert main([*base, "--resume", "--steps", "8", "--stop-patience", "0", "--ema", "0", "--lr", "0.001"]) == 0
    assert ckpt.load_training_state(model)["step"] == 8
    train_cfg = yaml.safe_load((model / ckpt.CONFIG).read_text())["train"]
    assert (train_cfg["stop_patience"], train_cfg["ema"], train_cfg["lr"], train_cfg["steps"]) == (0, 0.0, 0.001, 8)
    # an option set back to its default value is a change too, through fit and the loop alike
    assert main([*base, "--resume", "--steps", "10", "--stop-patience", "10"]) == 0
    assert yaml.safe_load((model / ckpt.CONFIG).read_text())["train"]["stop_patience"] == 10
    # what cannot take effect is refused with one line naming it; the model is untouched
    capsys.readouterr()
    assert main([*base, "--resume", "--steps", "12", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed cannot change on --resume (stored 0, asked 3)" in err[0]
    assert ckpt.load_training_state(model)["step"] == 10


def test_config_file_options_count_as_given_on_resume(tmp_path):
    from n2v_chunked.cli.commands import build_parser
    from n2v_chunked.cli.config_file import apply_config_file, given_options

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stop_patience: 0\n")
    parser = build_parser()
    argv = ["--config", str(cfg), "train", "in.zarr", "--model-dir", "m", "--resume", "--steps", "2000"]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    given = given_options(parser, argv, args)
    # --steps given at its default value counts; so does the file's stop_patience; --lr, not given, does not
    assert {"steps", "stop_patience", "resume"} <= given and "lr" not in given


def test_given_options_with_repeatable_options():
    from n2v_chunked.cli.commands import build_parser
    from n2v_chunked.cli.config_file import given_options

    parser = build_parser()
    for argv, author in ((["export", "p.zip", "--model-dir", "m", "--author", "A", "--author", "B"], True),
                         (["export", "p.zip", "--model-dir", "m"], False)):
        args = parser.parse_args(argv)
        assert ("author" in given_options(parser, argv, args)) is author
        assert parser.parse_args(argv).author == (["A", "B"] if author else [])  # defaults restored
