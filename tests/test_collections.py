"""Collections (issue 26, first layer): listing plates, containers and folders; ``info``, ``--select``, refusals.

Plates and containers are written by ome-zarr-py's own writer (an
independent implementation), validated with ome-zarr-models where installed,
and what ``open_collection`` lists is compared with what those libraries read.
Images are a few KiB; the S3 tests use the moto server of ``conftest.py``.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

from n2v_chunked.cli import main
from n2v_chunked.errors import CollectionError, ConfigError, N2VError
from n2v_chunked.io.collections import (
    ImageEntry, check_consistent, collection_kind, open_collection, select_images,
)
from n2v_chunked.io.ome import write_ome_zarr
from n2v_chunked.io.sources import open_image


ome_writer = pytest.importorskip("ome_zarr.writer", reason="ome-zarr-py is in the test extra")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402

PREFIX = "n2v-chunked: error:"
WELLS = {"B/3": 2, "B/4": 1, "C/3": 2}  # well -> fields
NAMES = ["B/3/0", "B/3/1", "B/4/0", "C/3/0", "C/3/1"]


def _fmt(version: str):
    return FormatV04() if version == "0.4" else FormatV05()


def _group(path: Path, version: str):
    return zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)


def _field_shape(i: int) -> tuple[int, int, int]:
    return (2, 16 + 8 * i, 24)  # fields of a well differ in size


def write_plate(path: Path, version: str) -> Path:
    """A 3-well plate through ome-zarr-py: fields of (2, 16|24, 24) pixels, uint16 except well C/3 (uint8)."""
    fmt, root = _fmt(version), _group(path, version)
    ome_writer.write_plate_metadata(root, ["A", "B", "C"], ["3", "4"], list(WELLS), fmt=fmt, name="screen 1")
    for well, fields in WELLS.items():
        row, col = well.split("/")
        group = root.require_group(row).require_group(col)
        ome_writer.write_well_metadata(group, [str(f) for f in range(fields)], fmt=fmt)
        for f in range(fields):
            dtype = "u1" if well == "C/3" else "u2"
            ome_writer.write_image(np.zeros(_field_shape(f), dtype), group.require_group(str(f)), axes="cyx", fmt=fmt,
                                   scale_factors=[])
    return path


SERIES = [("yx", (20, 30), "u2", "first"), ("yx", (12, 16), "f4", "second"), ("yx", (8, 8), "u1", None)]


def write_container(path: Path, version: str, series=SERIES, series_attr: bool = False) -> Path:
    """bioformats2raw's layout: images written by ome-zarr-py as ``0/``, ``1/``, ..., plus ``OME/METADATA.ome.xml``."""
    fmt, root = _fmt(version), _group(path, version)
    layout = {"bioformats2raw.layout": 3}
    root.attrs.update(layout if version == "0.4" else {"ome": {"version": "0.5", **layout}})
    for i, (axes, shape, dtype, _) in enumerate(series):
        ome_writer.write_image(np.zeros(shape, dtype), root.require_group(str(i)), axes=axes, fmt=fmt, scale_factors=[])
    ome = root.require_group("OME")
    if series_attr:
        paths = [str(i) for i in range(len(series))]
        ome.attrs.update({"series": paths} if version == "0.4" else {"ome": {"version": "0.5", "series": paths}})
    named = [f' Name="{name}"' if name else "" for *_, name in series]
    images = "".join(f'<Image ID="Image:{i}"{n}><Pixels/></Image>' for i, n in enumerate(named))
    xml = f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">{images}</OME>'
    (path / "OME" / "METADATA.ome.xml").write_text(xml)
    return path


def write_folder(path: Path) -> Path:
    """Images of three formats, shapes and dtypes, and files that are no images."""
    path.mkdir()
    tifffile.imwrite(path / "a.tif", np.zeros((32, 48), "u2"))
    tifffile.imwrite(path / "b.tif", np.zeros((3, 16, 16), "u1"), imagej=True, metadata={"axes": "ZYX"})
    write_ome_zarr(path / "c.ome.zarr", xr.DataArray(np.zeros((2, 20, 20), "f4"), dims=("c", "y", "x")),
                   pyramid=False, progress=False)
    (path / "notes.txt").write_text("not an image")
    tifffile.imwrite(path / ".hidden.tif", np.zeros((4, 4), "u2"))
    return path


def one_error(capsys, rc: int) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert rc == 2 and len(err) == 1 and err[0].startswith(PREFIX), err
    return err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("collections")
    return {"tmp": tmp, "p04": write_plate(tmp / "p04.zarr", "0.4"), "p05": write_plate(tmp / "p05.zarr", "0.5"),
            "c04": write_container(tmp / "c04.zarr", "0.4"),
            "c05": write_container(tmp / "c05.zarr", "0.5", series_attr=True),
            "folder": write_folder(tmp / "folder")}


# ----------------------------------------------------------------------------
# Listing, against what ome-zarr-py and ome-zarr-models read.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_plate_written_by_ome_zarr_py_is_listed_as_it_and_ome_zarr_models_read_it(data, version):
    path = data["p04" if version == "0.4" else "p05"]
    coll = open_collection(path)
    assert (coll.kind, coll.ngff_version, coll.name, coll.total) == ("plate", version, "screen 1", 5)
    assert [im.name for im in coll.images] == NAMES and coll.wells == ["B3", "B4", "C3"]
    for im in coll.images:
        field = int(im.name[-1])
        assert (im.shape, im.axes, im.channels, im.format) == (_field_shape(field), "cyx", 2, "ome-zarr")
        assert im.dtype == ("uint8" if im.label == "C3" else "uint16")
        assert im.path == f"{path}/{im.name}" and open_image(im.path).shape == im.shape
    assert coll.nbytes == sum(int(np.prod(im.shape)) * np.dtype(im.dtype).itemsize for im in coll.images)

    # ome-zarr-py: its Plate reader stitches fields of one shape only, so the wells from its metadata reader
    # and each field through its image reader
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    wells = [w["path"] for w in parse_url(str(path)).root_attrs["plate"]["wells"]]
    assert wells == list(WELLS) == list(dict.fromkeys(im.name[:3] for im in coll.images))
    for im in coll.images:
        node = next(iter(Reader(parse_url(im.path))()))
        assert (node.data[0].shape, str(node.data[0].dtype)) == (im.shape, im.dtype)
        assert "".join(a["name"] for a in node.metadata["axes"]) == im.axes

    models = pytest.importorskip("ome_zarr_models")
    hcs = import_module(f"ome_zarr_models.v0{version[-1]}").HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    def ome(attrs):  # 0.5 keeps the metadata under "ome"
        return attrs.ome if version == "0.5" else attrs

    fields = [f"{w.path}/{img.path}" for i, w in enumerate(ome(hcs.attributes).plate.wells)
              for img in ome(hcs.get_well_group(i).attributes).well.images]
    assert fields == NAMES and models


def test_a_damaged_plate_is_one_line_naming_the_well(data, tmp_path):
    import shutil

    plate = shutil.copytree(data["p05"], tmp_path / "p.zarr")
    shutil.rmtree(plate / "C" / "3" / "1")
    with pytest.raises(N2VError, match=r"p\.zarr/C/3/1"):
        open_collection(plate, select="C3")
    assert [im.name for im in open_collection(plate, select="B*").images] == NAMES[:3]  # C/3/1 is never opened
    shutil.rmtree(plate / "B" / "4")
    with pytest.raises(N2VError, match=r"plate well .*p\.zarr/B/4 is missing or not a Zarr group"):
        open_collection(plate)
    # bioformats2raw writes a screen as a plate with its layout key: the plate is what counts
    root = zarr.open_group(str(plate), mode="r+")
    root.attrs["ome"] = {**root.attrs["ome"], "bioformats2raw.layout": 3}
    assert collection_kind(plate) == "plate"


def test_a_well_is_a_collection_of_its_fields(data):
    coll = open_collection(data["p05"] / "C" / "3")
    assert (coll.kind, [im.name for im in coll.images], coll.ngff_version) == ("well", ["0", "1"], "0.5")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_container_series_are_listed_with_their_ome_xml_names(data, version, capsys):
    path = data["c04" if version == "0.4" else "c05"]  # 0.4: consecutive series; 0.5: the OME group's list
    coll = open_collection(path)
    assert coll.kind == "container" and coll.ngff_version == version
    got = [(im.name, im.label, im.shape, im.dtype, im.axes, im.index) for im in coll.images]
    assert got == [("0", "first", (20, 30), "uint16", "yx", 0), ("1", "second", (12, 16), "float32", "yx", 1),
                   ("2", "", (8, 8), "uint8", "yx", 2)]
    assert main(["info", str(path), "--select", "0,second"]) == 0
    rows = capsys.readouterr().out.split("\n\n", 1)[1].splitlines()
    assert rows[0].split()[:3] == ["image", "series", "name"] and [r.split()[:2] for r in rows[1:]] == [
        ["0", "first"], ["1", "second"]]
    pytest.importorskip("ome_zarr_models")
    model = import_module(f"ome_zarr_models.v0{version[-1]}").BioFormats2Raw
    assert model.from_zarr(zarr.open_group(str(path), mode="r")).image_paths == ["0", "1", "2"]


def test_folder_of_mixed_tiff_and_ome_zarr_of_different_shapes_and_dtypes(data):
    coll = open_collection(data["folder"])
    got = [(im.name, im.shape, im.axes, im.dtype, im.format) for im in coll.images]
    assert got == [("a.tif", (32, 48), "yx", "uint16", "tiff"), ("b.tif", (3, 16, 16), "zyx", "uint8", "tiff"),
                   ("c.ome.zarr", (2, 20, 20), "cyx", "float32", "ome-zarr")]  # no notes.txt, no hidden file
    assert collection_kind(data["folder"]) == "folder"
    glob = open_collection(f"{data['folder']}/*.tif")
    assert [im.name for im in glob.images] == ["a.tif", "b.tif"]


def test_listing_reads_metadata_only_and_concurrently():
    import virtual_store as vs

    url = vs.add_plate("listed", 2, 2, 2, (256, 256), (64, 64))
    vs.COUNTS.reset()
    vs.LATENCY_S = 0.02
    try:
        coll = open_collection(url)
        concurrent = vs.COUNTS.max_in_flight
        vs.COUNTS.reset()
        open_collection(url, threads=1)
        serial = vs.COUNTS.max_in_flight
    finally:
        vs.LATENCY_S = 0.0
    assert [im.name for im in coll.images][:3] == ["A/1/0", "A/1/1", "A/2/0"] and len(coll.images) == 8
    assert (vs.COUNTS.chunk_reads, vs.COUNTS.listings) == (0, 0)
    assert serial == 1 and concurrent > 1


# ----------------------------------------------------------------------------
# info and --select.
# ----------------------------------------------------------------------------


def test_info_lists_a_plate_as_a_table_and_select_picks_wells_and_fields(data, capsys):
    assert main(["info", str(data["p05"])]) == 0
    out = capsys.readouterr().out
    assert "collection:   HCS plate 'screen 1' (NGFF 0.5)" in out and "images:       5 (3 wells)" in out
    assert "dtype:        mixed: uint16 (3), uint8 (2)" in out and "axes:         cyx\n" in out
    rows = out.split("\n\n", 1)[1].splitlines()
    assert rows[0].split() == ["image", "axes", "channels", "shape", "dtype", "in", "memory"]
    assert [r.split()[0] for r in rows[1:]] == NAMES and rows[4].split()[:6] == ["C/3/0", "cyx", "2", "2", "x", "16"]

    assert main(["info", str(data["p04"]), "--select", "b3,C*/1"]) == 0  # wells ignore case; C*/1: field 1 of row C
    out = capsys.readouterr().out
    assert "selected by --select b3,C*/1 from 5" in out
    assert [r.split()[0] for r in out.split("\n\n", 1)[1].splitlines()[1:]] == ["B/3/0", "B/3/1", "C/3/1"]


def test_select_by_well_field_series_range_name_and_file(data):
    plate = open_collection(data["p05"])
    assert [im.name for im in select_images(plate, "*/1").images] == ["B/3/1", "C/3/1"]
    assert [im.name for im in select_images(plate, ["B/4", "C3/0"]).images] == ["B/4/0", "C/3/0"]
    container = open_collection(data["c05"])
    assert [im.name for im in select_images(container, "1-2").images] == ["1", "2"]
    assert [im.name for im in select_images(container, "sec*").images] == ["1"]
    folder = open_collection(data["folder"], select="*.zarr")
    assert [im.name for im in folder.images] == ["c.ome.zarr"] and folder.total == 3


def test_a_selection_that_picks_nothing_is_one_line(data, capsys):
    with pytest.raises(ConfigError, match=r"--select 'Z9' matches none of the 5 images .* \(e\.g\. B/3/0"):
        open_collection(data["p05"], select="B3,Z9")  # one typo among good patterns is refused too
    with pytest.raises(ConfigError, match="--select is empty"):
        open_collection(data["p05"], select=" , ")
    assert "matches none" in one_error(capsys, main(["info", str(data["p05"]), "--select", "Z9"]))
    msg = one_error(capsys, main(["info", str(data["p05"] / "B" / "3" / "0"), "--select", "0"]))
    assert "is one image, not a collection" in msg


def test_single_images_are_unchanged(data, tmp_path, capsys):
    stack = tmp_path / "frames"
    stack.mkdir()
    for i in range(3):
        tifffile.imwrite(stack / f"f{i}.tif", np.zeros((8, 8), "u2"))
    assert main(["info", str(stack)]) == 0  # same-shaped TIFFs: one stack, as before
    out = capsys.readouterr().out
    assert "format:       tiff" in out and "shape:        3 x 8 x 8" in out and "collection" not in out
    one = write_container(tmp_path / "one.zarr", "0.5", series=SERIES[:1])  # one series: the image itself
    assert open_image(one).shape == (20, 30)
    assert main(["info", str(data["p05"] / "B" / "3" / "1")]) == 0
    assert "shape:        2 x 24 x 24" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, what", [
    ("p04", "an HCS plate of 3 well(s)"), ("p05", "an HCS plate of 3 well(s)"), ("c04", "bioformats2raw container"),
    ("folder", "a set of 3 images, not all TIFFs"), ("well", "a plate well of 2 field(s)"),
    ("tiffs", "TIFFs of different shapes or dtypes")])
def test_other_commands_refuse_a_collection_in_one_line(data, name, what, capsys):
    source = {"well": data["p05"] / "B" / "3", "tiffs": f"{data['folder']}/*.tif"}.get(name) or data[name]
    with pytest.raises(CollectionError, match="take it whole"):
        open_image(source)  # never its first image
    out = data["tmp"] / f"out-{name}.zarr"
    for argv in (["convert", str(source), str(out)],):  # train and predict take collections (test_collection_*.py)
        msg = one_error(capsys, main(argv))
        assert what in msg and "`n2v-chunked info` lists its images" in msg and "take it whole" in msg, msg
    assert not out.exists() and not (data["tmp"] / "m").exists()
    assert main(["info", str(source)]) == 0 and "collection:" in capsys.readouterr().out


def test_images_whose_axes_or_channels_disagree_are_named(data):
    folder = open_collection(data["folder"])
    with pytest.raises(CollectionError, match=r"a\.tif is yx with 1 channel; b\.tif is zyx with 1 channel; "
                                              r"c\.ome\.zarr is cyx with 2 channels \(pick one kind with --select\)"):
        check_consistent(folder.images)
    check_consistent(open_collection(data["p05"]).images)  # dtypes and sizes may differ
    many = [ImageEntry(f"B/{i}/0", "", (1, 8, 8), "cyx", "uint8", "ome-zarr") for i in range(5)]
    odd = ImageEntry("C/1/0", "", (3, 8, 8), "cyx", "uint8", "ome-zarr")
    with pytest.raises(CollectionError, match=r"B/0/0, B/1/0, B/2/0 and 2 more are cyx with 1 channel; "
                                              r"C/1/0 is cyx with 3 channels"):
        check_consistent([*many, odd], "one model")


# ----------------------------------------------------------------------------
# Object stores.
# ----------------------------------------------------------------------------


def _upload(s3, folder: Path, bucket: str, prefix: str) -> str:
    client = s3.client()
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for f in folder.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder)}")
    return f"s3://{bucket}/{prefix}"


def test_plate_container_and_folder_on_s3_list_as_on_disk(s3_env, data, tmp_path, capsys):
    local = {k: open_collection(data[k]) for k in ("p04", "p05", "c05")}
    for key, coll in local.items():
        url = _upload(s3_env, data[key], "collections", f"{key}.zarr")
        remote = open_collection(url)
        assert remote.kind == coll.kind and remote.ngff_version == coll.ngff_version
        strip = [(im.name, im.shape, im.dtype, im.axes, im.label) for im in coll.images]
        assert [(im.name, im.shape, im.dtype, im.axes, im.label) for im in remote.images] == strip
        assert remote.images[0].path == f"{url}/{remote.images[0].name}"

    zarrs = tmp_path / "zarrs"  # a prefix of OME-Zarr images of two shapes
    zarrs.mkdir()
    for name, shape in (("x.ome.zarr", (8, 8)), ("y.ome.zarr", (4, 6, 6))):
        write_ome_zarr(zarrs / name, xr.DataArray(np.zeros(shape, "u2"), dims=tuple("zyx"[-len(shape):])), pyramid=False,
                       progress=False)
    (zarrs / "readme.txt").write_text("no image")
    url = _upload(s3_env, zarrs, "collections", "folder")
    folder = open_collection(url)
    assert [(im.name, im.shape) for im in folder.images] == [("x.ome.zarr", (8, 8)), ("y.ome.zarr", (4, 6, 6))]
    assert main(["info", url, "--select", "y*"]) == 0
    assert "selected by --select y* from 2" in capsys.readouterr().out
    for source in (url, f"{url}/*.zarr", "s3://collections/p05.zarr"):
        assert "take it whole" in one_error(capsys, main(["convert", source, str(tmp_path / "o.zarr")]))


def test_a_container_over_http_which_cannot_list_is_probed_series_by_series(data):
    from s3server import serve_folder

    url, stop = serve_folder(data["tmp"])
    try:
        coll = open_collection(f"{url}/c04.zarr")  # NGFF 0.4, no series list: consecutive series found by probing
    finally:
        stop()
    assert [(im.name, im.label, im.shape) for im in coll.images] == [
        ("0", "first", (20, 30)), ("1", "second", (12, 16)), ("2", "", (8, 8))]


def test_listing_a_folder_of_many_tiffs_holds_no_file_handles(tmp_path):
    import subprocess
    import sys

    for i in range(120):
        tifffile.imwrite(tmp_path / f"f{i}.tif", np.zeros((8, 8 + i % 2), "u2"))
    script = ("import os, resource, sys\n"
              "from n2v_chunked.io.collections import open_collection\n"
              "n = len(os.listdir('/proc/self/fd'))\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (n + 48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              "print(len(open_collection(sys.argv[1]).images))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "120", proc.stderr[-2000:]
