"""Formats beyond Zarr and TIFF through bioio (issue 19): PNG, JPEG, OME-TIFF, and one
line naming what to install for a format without a reader."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from n2v_chunked.errors import N2VError
from n2v_chunked.io.formats import open_with_bioio, plugin_for
from n2v_chunked.io.sources import open_image

pytest.importorskip("bioio")
iio = pytest.importorskip("imageio.v3")


def _ramp(shape, dtype=np.uint8):
    return (np.arange(int(np.prod(shape))) % 251).reshape(shape).astype(dtype)


@pytest.mark.parametrize("name", ["gray.png", "gray16.png"])
def test_png_reads_exactly(tmp_path, name):
    img = _ramp((40, 50), np.uint16 if "16" in name else np.uint8) * (7 if "16" in name else 1)
    path = tmp_path / name
    iio.imwrite(path, img)
    a = open_image(str(path))
    assert a.dims == ("y", "x") and a.attrs["format"] == "bioio-imageio"
    np.testing.assert_array_equal(a.values, img)


def test_rgb_png_samples_become_channels(tmp_path):
    img = _ramp((40, 50, 3))
    iio.imwrite(tmp_path / "rgb.png", img)
    a = open_image(str(tmp_path / "rgb.png"))
    assert a.dims == ("c", "y", "x")
    np.testing.assert_array_equal(a.values, np.moveaxis(img, -1, 0))


def test_jpeg_reads_as_imageio_decodes_it(tmp_path):
    img = _ramp((40, 50))
    iio.imwrite(tmp_path / "g.jpg", img)
    a = open_image(str(tmp_path / "g.jpg"))
    assert a.dims == ("y", "x")
    np.testing.assert_array_equal(a.values, iio.imread(tmp_path / "g.jpg"))  # lossy: what the decoder gives


def test_ome_tiff_through_bioio_has_axes_and_pixel_sizes(tmp_path):
    img = np.random.default_rng(0).random((3, 2, 40, 50)).astype(np.float32)
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, img, ome=True,
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5})
    from n2v_chunked.io.sources import _canonical

    a, _ = _canonical(open_with_bioio(str(path)), None)
    assert a.dims == ("c", "z", "y", "x")
    assert a.attrs["scale"] == {"c": 1.0, "z": 1.5, "y": 0.25, "x": 0.2}
    assert a.attrs["units"] == {"z": "micrometer", "y": "micrometer", "x": "micrometer"}
    np.testing.assert_array_equal(a.values, np.moveaxis(img, 1, 0))
    b = open_image(str(path))  # the default path stays tifffile's, with the same result
    assert b.attrs["format"] == "tiff" and b.dims == a.dims
    np.testing.assert_array_equal(b.values, a.values)


def test_vendor_format_without_plugin_names_what_to_install(tmp_path):
    path = tmp_path / "scan.czi"
    path.write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(N2VError, match=r"no bioio reader for it is installed; pip install 'n2v-chunked\[formats\]' bioio-czi"):
        open_image(str(path))


def test_plugin_for():
    assert plugin_for("a.OME.TIFF") == "bioio-ome-tiff" and plugin_for("b.nd2") == "bioio-nd2"
    assert plugin_for("c.txt") is None


def test_png_predicts_end_to_end(tmp_path):
    from helpers import make_model_dir, noisy

    from n2v_chunked.prediction import predict

    img = np.clip(noisy((64, 64)), 0, 255).astype(np.uint8)
    iio.imwrite(tmp_path / "n.png", img)
    out = predict(str(tmp_path / "n.png"), str(tmp_path / "o.ome.zarr"), make_model_dir(tmp_path / "m"),
                  scheduler="sync", progress=False, pyramid=False)
    ref = predict(img.astype(np.float32), None, tmp_path / "m", scheduler="sync")
    np.testing.assert_allclose(out.values, ref.values, rtol=1e-5, atol=1e-4)


def test_without_bioio_png_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from n2v_chunked.io import formats

    real = importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None if name == "bioio" else real(name))
    iio.imwrite(tmp_path / "g.png", _ramp((8, 8)))
    with pytest.raises(N2VError, match=r"g.png: reading it needs bioio; pip install 'n2v-chunked\[formats\]'$"):
        open_image(str(tmp_path / "g.png"))
