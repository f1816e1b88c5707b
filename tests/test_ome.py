"""OME-Zarr writing: metadata per NGFF 0.4 / 0.5, pyramids, the complete flag, safety.

Outputs are checked by independent readers: ome-zarr-py (``parse_url`` +
``Reader``; version 0.18 reads both NGFF 0.4 on Zarr v2 and 0.5 on Zarr v3)
and, where installed, the pydantic models of ``ome-zarr-models``, which
validate the metadata against the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from n2v_chunked import __version__
from n2v_chunked.errors import N2VError
from n2v_chunked.io.ome import create_ome_zarr, default_chunks, is_complete, mark_complete, write_ome_zarr
from n2v_chunked.io.pyramid import build_pyramid, cast_block
from n2v_chunked.io.sources import open_image


def ramp(shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 1000).astype(dtype).reshape(shape)


def image(shape: tuple[int, ...], dims: str, **attrs) -> xr.DataArray:
    scale = {d: {"z": 2.0, "y": 0.5, "x": 0.5, "t": 10.0}.get(d, 1.0) for d in dims}
    units = {d: "micrometer" for d in dims if d in "zyx"}
    if "t" in dims:
        units["t"] = "second"
    base = {"scale": scale, "units": units, "translation": {d: (1.5 if d == "x" else 0.0) for d in dims}}
    return xr.DataArray(da.from_array(ramp(shape), chunks=5), dims=tuple(dims), attrs={**base, **attrs})


def read_with_ome_zarr(path: Path):
    """First image node as ome-zarr-py sees it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    loc = parse_url(str(path))
    assert loc is not None, f"ome-zarr cannot open {path}"
    node = next(iter(Reader(loc)()))
    return loc, node


def validate_with_models(path: Path, version: str) -> None:
    pytest.importorskip("ome_zarr_models")
    from importlib import import_module

    mod = import_module("ome_zarr_models.v04" if version == "0.4" else "ome_zarr_models.v05")
    mod.Image.from_zarr(zarr.open_group(str(path), mode="r"))  # raises on any spec violation


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def test_default_chunks_are_a_few_mib_and_one_along_t_and_c():
    for shape, dims in [((5, 3, 200, 2048, 2048), "tczyx"), ((8192, 8192), "yx"), ((60, 256, 256), "zyx")]:
        c = default_chunks(shape, dims, "float32")
        nbytes = np.prod(c) * 4
        assert nbytes <= 2 * 2**20 and (nbytes >= 2**20 or c == shape)
        for s, ch, d in zip(shape, c, dims):
            assert 1 <= ch <= s and (d not in "tc" or ch == 1)
    assert default_chunks((16, 16), "yx") == (16, 16)


def test_cast_block_rounds_and_clips_integers():
    x = np.array([-3.0, 0.4, 0.6, 254.5, 300.0, np.nan], dtype="f4")
    np.testing.assert_array_equal(cast_block(x, "uint8"), [0, 0, 1, 254, 255, 0])
    np.testing.assert_array_equal(cast_block(np.array([-5, 70000]), "uint16"), [0, 65535])
    assert cast_block(x, "float32") is x


# ----------------------------------------------------------------------------
# Creating: layout of both NGFF versions.
# ----------------------------------------------------------------------------


def test_create_ngff_05_layout(tmp_path):
    out = tmp_path / "o.zarr"
    arr = create_ome_zarr(out, (4, 32, 48), "zyx", scale={"z": 2.0, "y": 0.5, "x": 0.5},
                          units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
                          translation={"x": 3.0}, provenance={"command": "test"}, chunks=(2, 16, 16),
                          name="raw")
    assert arr.shape == (4, 32, 48) and arr.dtype == np.float32 and not arr.read_only
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and ms["name"] == "raw"
    assert ms["axes"][0] == {"name": "z", "type": "space", "unit": "micrometer"}
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [2.0, 0.5, 0.5]}, {"type": "translation", "translation": [0.0, 0.0, 3.0]}]}]
    assert meta["attributes"]["n2v_chunked"] == {"complete": False, "version": __version__, "command": "test"}
    level = json.loads((out / "0" / "zarr.json").read_text())
    assert level["dimension_names"] == ["z", "y", "x"]
    assert level["chunk_grid"]["configuration"]["chunk_shape"] == [2, 16, 16]
    blosc = next(c for c in level["codecs"] if c["name"] == "blosc")["configuration"]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("zstd", 1, "shuffle")
    validate_with_models(out, "0.5")


def test_create_ngff_04_layout(tmp_path):
    out = tmp_path / "o.zarr"
    create_ome_zarr(out, (2, 3, 32, 32), "tcyx", dtype="uint16", ngff_version="0.4")
    attrs = json.loads((out / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and "ome" not in attrs
    assert [a["type"] for a in ms["axes"]] == ["time", "channel", "space", "space"]
    zarray = json.loads((out / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["dtype"] == "<u2"
    assert zarray["compressor"]["id"] == "blosc" and zarray["compressor"]["cname"] == "zstd"
    assert zarray["compressor"]["clevel"] == 1
    assert zarray["compressor"]["shuffle"] == 1
    assert zarray["chunks"][:2] == [1, 1]
    assert not is_complete(out)
    validate_with_models(out, "0.4")


def test_create_rejects_bad_requests(tmp_path):
    with pytest.raises(N2VError, match="order tczyx"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8, 2), "yxc")
    with pytest.raises(N2VError, match="needs y and x"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "zy")
    with pytest.raises(N2VError, match="shards need NGFF 0.5"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "yx", chunks=(4, 4), shards=(8, 8), ngff_version="0.4")
    with pytest.raises(N2VError, match="multiples of chunks"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "yx", chunks=(4, 4), shards=(6, 8))
    with pytest.raises(N2VError, match="2 positive sizes"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "yx", chunks=(4, 4, 4))
    with pytest.raises(N2VError, match="unknown dtype"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "yx", dtype="nonsense")
    with pytest.raises(N2VError, match="NGFF version"):
        create_ome_zarr(tmp_path / "a.zarr", (8, 8), "yx", ngff_version="0.3")
    assert not (tmp_path / "a.zarr").exists()


def test_complete_flag(tmp_path):
    out = tmp_path / "o.zarr"
    create_ome_zarr(out, (8, 8), "yx", provenance={"step": 3})
    assert not is_complete(out)
    mark_complete(out)
    assert is_complete(out)
    assert zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]["step"] == 3
    mark_complete(out, False)
    assert not is_complete(out)
    with pytest.raises(N2VError, match="no Zarr group"):
        is_complete(tmp_path / "missing.zarr")


# ----------------------------------------------------------------------------
# Existing outputs and unwritable places.
# ----------------------------------------------------------------------------


def test_existing_output_needs_overwrite_and_only_zarr_is_replaced(tmp_path):
    out = tmp_path / "o.zarr"
    create_ome_zarr(out, (8, 8), "yx")
    with pytest.raises(N2VError, match="exists; pass --overwrite"):
        create_ome_zarr(out, (8, 8), "yx")
    arr = create_ome_zarr(out, (16, 8), "yx", overwrite=True)
    assert arr.shape == (16, 8)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(N2VError, match="not a Zarr store"):
        create_ome_zarr(folder, (8, 8), "yx", overwrite=True)
    assert (folder / "thesis.txt").read_text() == "precious"
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(N2VError, match="it is a file"):
        create_ome_zarr(tmp_path / "file.bin", (8, 8), "yx", overwrite=True)


def test_output_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(N2VError, match=r"blocker is not a directory"):
        create_ome_zarr(tmp_path / "blocker" / "sub" / "o.zarr", (8, 8), "yx")


# A read-only output folder: tests/test_bad_input.py (row read-only-output-dir), which also runs as root.


def test_refuses_to_write_onto_the_input(tmp_path):
    src = tmp_path / "in.zarr"
    write_ome_zarr(src, image((8, 8), "yx"), pyramid=False)
    data = open_image(src)
    before = sorted(p.name for p in src.rglob("*"))
    for target in (src, src / "0", tmp_path):
        with pytest.raises(N2VError, match="refusing to write"):
            write_ome_zarr(target, data, overwrite=True)
    assert sorted(p.name for p in src.rglob("*")) == before and is_complete(src)


# ----------------------------------------------------------------------------
# Round trips, verified by ome-zarr-py.
# ----------------------------------------------------------------------------


CASES = [
    ((24, 40), "yx"),
    ((6, 24, 40), "zyx"),
    ((3, 6, 24, 40), "tzyx"),
    ((2, 3, 24, 40), "czyx"),
    ((2, 2, 3, 24, 40), "tczyx"),
]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("shape,dims", CASES, ids=[d for _, d in CASES])
def test_round_trip_read_back_and_by_ome_zarr(tmp_path, version, shape, dims):
    data = image(shape, dims)
    out = tmp_path / "o.zarr"
    write_ome_zarr(out, data, ngff_version=version, pyramid_levels=2, provenance={"command": "test"})
    assert is_complete(out)
    back = open_image(out)
    assert back.dims == tuple(dims) and back.dtype == np.float32
    assert back.attrs["ngff_version"] == version
    for key in ("scale", "units", "translation"):
        assert back.attrs[key] == data.attrs[key]
    np.testing.assert_array_equal(back.values, data.values)

    loc, node = read_with_ome_zarr(out)
    assert loc.version == version
    assert [a["name"] for a in node.metadata["axes"]] == list(dims)
    assert [d.shape for d in node.data] == [shape, back.shape[:-2] + (12, 20)]
    transforms = node.metadata["coordinateTransformations"]
    assert transforms[0][0]["scale"] == [data.attrs["scale"][d] for d in dims]
    assert transforms[1][0]["scale"][-1] == 2 * data.attrs["scale"]["x"]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data.values)
    validate_with_models(out, version)


def test_integer_output_dtype_is_rounded_and_clipped(tmp_path):
    x = xr.DataArray(np.array([[-7.0, 1.4], [1.6, 1e6]], dtype="f4"), dims=("y", "x"))
    write_ome_zarr(tmp_path / "o.zarr", x, dtype="uint16", pyramid=False)
    back = open_image(tmp_path / "o.zarr")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back.values, [[0, 1], [2, 65535]])


def test_sharded_output_round_trip(tmp_path):
    data = image((4, 64, 64), "zyx")
    write_ome_zarr(tmp_path / "s.zarr", data, chunks=(2, 16, 16), shards=(4, 32, 64), pyramid_levels=2)
    meta = json.loads((tmp_path / "s.zarr" / "0" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 32, 64]
    np.testing.assert_array_equal(open_image(tmp_path / "s.zarr").values, data.values)
    assert open_image(tmp_path / "s.zarr", level=1).shape == (4, 32, 32)  # z pixel 4x y: z kept


# ----------------------------------------------------------------------------
# Pyramids.
# ----------------------------------------------------------------------------


def test_pyramid_is_block_mean_with_scale_and_translation_updates(tmp_path):
    x = np.random.default_rng(0).random((4, 33, 64)).astype("f4")
    data = xr.DataArray(x, dims=("z", "y", "x"),
                        attrs={"scale": {"z": 1.0, "y": 1.0, "x": 1.0}, "translation": {"z": 0.0, "y": 10.0, "x": 0.0}})
    write_ome_zarr(tmp_path / "p.zarr", data, pyramid_levels=3)
    one = open_image(tmp_path / "p.zarr", level=1)
    assert one.shape == (2, 16, 32)  # trim_excess drops the odd last row
    expect = x[:, :32].reshape(2, 2, 16, 2, 32, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(one.values, expect, rtol=1e-6)
    assert one.attrs["scale"] == {"z": 2.0, "y": 2.0, "x": 2.0}
    assert one.attrs["translation"] == {"z": 0.5, "y": 10.5, "x": 0.5}  # centre of the 2x2x2 block
    two = open_image(tmp_path / "p.zarr", level=2)
    assert two.shape == (1, 8, 16) and two.attrs["translation"]["x"] == 1.5


def test_pyramid_keeps_anisotropic_z_until_xy_catch_up(tmp_path):
    data = image((8, 64, 64), "zyx")
    data.attrs["scale"] = {"z": 2.0, "y": 0.5, "x": 0.5}  # z pixel 4x y pixel
    write_ome_zarr(tmp_path / "a.zarr", data, pyramid=False)
    shapes = build_pyramid(tmp_path / "a.zarr", levels=4)
    # z halves only once its pixel is at most twice the y pixel: at level 1, 2 <= 2 * 1.0
    assert shapes == [(8, 64, 64), (8, 32, 32), (4, 16, 16), (2, 8, 8)]
    assert open_image(tmp_path / "a.zarr", level=3).attrs["scale"] == {"z": 8.0, "y": 4.0, "x": 4.0}
    # automatic: stop once y and x fit in one 256-pixel tile
    assert build_pyramid(tmp_path / "a.zarr") == [(8, 64, 64)]
    _, node = read_with_ome_zarr(tmp_path / "a.zarr")
    assert len(node.data) == 1


def test_failed_write_stays_incomplete_and_nothing_is_deleted(tmp_path):
    def boom(block):
        if block.sum() > 0:
            raise N2VError("simulated read failure")
        return block

    x = xr.DataArray(da.from_array(ramp((16, 16)), chunks=8).map_blocks(boom), dims=("y", "x"))
    out = tmp_path / "o.zarr"
    with pytest.raises(N2VError, match="simulated"):
        write_ome_zarr(out, x)
    assert out.exists() and not is_complete(out)


def test_write_to_an_fsspec_url(tmp_path):
    url = "memory://n2v-out/o.zarr"
    data = image((4, 24, 24), "zyx")
    write_ome_zarr(url, data, pyramid_levels=2, overwrite=True)
    assert is_complete(url)
    back = open_image(url)
    assert back.attrs["scale"] == data.attrs["scale"]
    np.testing.assert_array_equal(back.values, data.values)
    with pytest.raises(N2VError, match="exists; pass --overwrite"):
        write_ome_zarr(url, data)
