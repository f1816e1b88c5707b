"""Pictures (issue 19): the training plot, CSV and preview in the model directory,
TensorBoard when asked, and ``predict --preview``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
from PIL import Image

from n2v_chunked.io import pictures
from n2v_chunked.training import plots
from n2v_chunked.cli import main

from helpers import make_model_dir, noisy

FAST = ["--steps", "4", "--batch-size", "4", "--features", "4", "--patch", "32,32", "--val-interval", "2",
        "--precision", "fp32", "--no-progress"]


def test_side_by_side_uses_the_noisy_grey_scale():
    left = np.tile(np.linspace(0, 100, 50), (20, 1))
    right = np.full((20, 50), 50.0)
    img = pictures.side_by_side(left, right, gap=4)
    assert img.shape == (20, 104) and img.dtype == np.uint8
    assert (img[:, 50:54] == 255).all()  # the white gap
    assert img[0, 0] == 0 and img[0, 49] == 255  # the noisy image spans the scale
    assert np.all(np.abs(img[:, 54:].astype(int) - 128) <= 2)  # the flat image sits at its value's grey


def test_middle_slice():
    a = np.arange(2 * 5 * 3 * 4).reshape(2, 5, 3, 4)
    np.testing.assert_array_equal(pictures.middle_slice(a, "czyx"), a[0, 2])


def test_training_writes_plot_csv_and_preview(tmp_path):
    tifffile.imwrite(tmp_path / "in.tif", noisy((64, 64)))
    model = tmp_path / "m"
    assert main(["train", str(tmp_path / "in.tif"), "--axes", "yx", "--model-dir", str(model), *FAST]) == 0
    with open(model / plots.CSV) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["loss"]) > 0 and float(r["val_loss"]) > 0 and float(r["lr"]) == 4e-4 for r in rows)
    plot = Image.open(model / plots.PLOT)
    assert plot.format == "PNG" and plot.size == (700, 550)
    preview = np.asarray(Image.open(model / plots.PREVIEW))
    # two 32x32 panels and the gap, enlarged 8x to 256 rows
    assert preview.shape == (256, (32 + 32 + pictures.GAP) * 8)
    left, right = preview[:, : 32 * 8], preview[:, (32 + pictures.GAP) * 8:]
    assert left.std() > right.std() > 0  # noisy left, smoother prediction right
    assert not list(model.glob(".*.png"))  # no temporary file left behind


def test_tensorboard_is_optional_with_one_line(tmp_path, capfd):
    tifffile.imwrite(tmp_path / "in.tif", noisy((64, 64)))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        rc = main(["train", str(tmp_path / "in.tif"), "--axes", "yx", "--model-dir", str(tmp_path / "m"),
                   "--tensorboard", *FAST])
        assert rc == 2
        assert capfd.readouterr().err.strip() == ("n2v-chunked: error: --tensorboard needs the tensorboard package: "
                                                   "pip install 'n2v-chunked[tensorboard]'")
        assert not (tmp_path / "m").exists()
    else:
        rc = main(["train", str(tmp_path / "in.tif"), "--axes", "yx", "--model-dir", str(tmp_path / "m"),
                   "--tensorboard", *FAST])
        assert rc == 0 and list((tmp_path / "m" / plots.TENSORBOARD).glob("events.*"))


def test_predict_preview(tmp_path, capfd):
    stack = noisy((5, 48, 64))
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    model = make_model_dir(tmp_path / "m")
    out = tmp_path / "o.ome.zarr"
    assert main(["predict", str(tmp_path / "in.tif"), str(out), "--model-dir", str(model), "--axes", "zyx",
                 "--scheduler", "sync", "--no-progress", "--preview"]) == 0
    text = capfd.readouterr().out
    path = tmp_path / "o.ome.zarr.preview.png"
    assert f"preview (noisy | denoised, middle slice): {path}" in text
    img = np.asarray(Image.open(path))
    factor = -(-256 // 48)
    assert img.shape == (48 * factor, (64 + pictures.GAP + 64) * factor)
    expected = pictures.side_by_side(stack[2], __import__("zarr").open_array(f"{out}/0", mode="r")[2])
    np.testing.assert_array_equal(img[::factor, ::factor], expected)
