"""Predicting collections (issue 26): a plate gives a plate, a container a container, a folder a folder.

Inputs are written by ome-zarr-py's own writer; outputs are read back by
ome-zarr-py and validated by ome-zarr-models, and each output image is
compared with predicting that image alone.  Images are at most 64 x 64
pixels, the model a random 4-feature U-Net (``helpers.make_model_dir``), run
in torch fp32 so that equality is exact.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

from n2v_chunked import prediction as P
from n2v_chunked.cli import main
from n2v_chunked.errors import CollectionError, ConfigError, IncompatibleModelError, OutputExistsError
from n2v_chunked.io.collections import open_collection
from n2v_chunked.io.ome import is_complete, write_ome_zarr
from n2v_chunked.prediction import run

from helpers import make_model_dir, noisy

ome_writer = pytest.importorskip("ome_zarr.writer", reason="ome-zarr-py is in the test extra")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402

KW = dict(runtime="torch", precision="fp32", chunks=(32, 32), progress=False)
FIELDS = {"B/3": 2, "C/5": 1}
NAMES = ["B/3/0", "B/3/1", "C/5/0"]
SCALE = {"y": 0.5, "x": 0.25}  # um per pixel


def _fmt(version: str):
    return FormatV04() if version == "0.4" else FormatV05()


def _root(path: Path, version: str):
    return zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)


def _image(group, data, fmt, channels: int = 1, name: str = "image") -> None:
    axes, scale = ("cyx", {"c": 1.0, **SCALE}) if channels > 1 else ("yx", SCALE)
    arr = np.stack([data] * channels) if channels > 1 else data
    ome_writer.write_image(arr, group, axes=axes, fmt=fmt, scale_factors=[], scale=scale, name=name)


def write_plate(path: Path, version: str, shape=(64, 64), channels=lambda well: 1) -> Path:
    """Two wells (2 + 1 fields), one acquisition, pixel size 0.5 x 0.25 um; through ome-zarr-py."""
    fmt, root = _fmt(version), _root(path, version)
    ome_writer.write_plate_metadata(root, ["A", "B", "C"], ["3", "5"], list(FIELDS), fmt=fmt, name="screen 7",
                                    acquisitions=[{"id": 1, "name": "first pass"}], field_count=2)
    for w, (well, fields) in enumerate(FIELDS.items()):
        row, col = well.split("/")
        group = root.require_group(row).require_group(col)
        ome_writer.write_well_metadata(group, [{"path": str(f), "acquisition": 1} for f in range(fields)], fmt=fmt)
        for f in range(fields):
            _image(group.require_group(str(f)), noisy(shape, seed=10 * w + f), fmt, channels(well), f"field {well}/{f}")
    return path


def write_container(path: Path, version: str = "0.5") -> Path:
    """bioformats2raw's layout of three series (``0/``, ``1/``, ``2/``) named in ``OME/METADATA.ome.xml``."""
    fmt, root = _fmt(version), _root(path, version)
    layout = {"bioformats2raw.layout": 3}
    root.attrs.update(layout if version == "0.4" else {"ome": {"version": "0.5", **layout}})
    for i, shape in enumerate([(48, 40), (40, 48), (44, 44)]):
        _image(root.require_group(str(i)), noisy(shape, seed=i), fmt)
    root.require_group("OME")
    images = "".join(f'<Image ID="Image:{i}" Name="{n}"><Pixels/></Image>' for i, n in enumerate(["dapi", "gfp", "rfp"]))
    (path / "OME" / "METADATA.ome.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        f"{images}</OME>")
    return path


def alone(model: Path, image: str, tmp: Path, **kw) -> np.ndarray:
    """The prediction of one image given alone."""
    out = tmp / f"alone-{image.replace('/', '_')}.zarr"
    return P.predict(image, str(out), model, scheduler="threads", overwrite=out.exists(), **{**KW, **kw}).values


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m")


# ----------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_plate_gives_a_plate_that_ome_zarr_py_reads_and_ome_zarr_models_validates(model, tmp_path, version, capsys):
    plate = write_plate(tmp_path / "plate.zarr", version)
    (tmp_path / "plate.zarr" / "B" / "3" / "0" / "labels").mkdir()  # side data: not copied
    out = tmp_path / "out.zarr"
    res = P.predict(str(plate), str(out), model, scheduler="threads", ngff_version=version, **KW)
    assert isinstance(res, P.PredictedCollection) and res.kind == "plate" and list(res.images) == NAMES
    assert res.blocks_computed == 3 * 4 and res.blocks_skipped == 0
    for name in NAMES:  # each image as predicting it alone writes it, pixel size and all
        assert np.array_equal(res.open(name).values, alone(model, f"{plate}/{name}", tmp_path, ngff_version=version))
        assert res.open(name).attrs["scale"] == SCALE and is_complete(out / name)
        ms = zarr.open_group(str(out / name), mode="r").attrs.asdict()
        assert (ms.get("ome") or ms)["multiscales"][0]["name"] == f"field {name}"
    assert not (out / "B" / "3" / "0" / "labels").exists() and not list(out.rglob(P.MARKER_DIR))

    listed = open_collection(out)  # our own reader: the same plate, complete
    assert (listed.kind, listed.name, listed.ngff_version, listed.complete) == ("plate", "screen 7", version, True)
    assert [im.name for im in listed.images] == NAMES
    assert main(["info", str(out)]) == 0 and "written by:   n2v-chunked, complete" in capsys.readouterr().out

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader

    node = next(iter(Reader(parse_url(str(out)))()))
    assert isinstance(next(s for s in node.specs if isinstance(s, Plate)), Plate)
    plate_meta = (parse_url(str(out)).root_attrs.get("ome") or parse_url(str(out)).root_attrs)["plate"]
    assert plate_meta["name"] == "screen 7" and plate_meta["acquisitions"] == [{"id": 1, "name": "first pass"}]
    assert [w["path"] for w in plate_meta["wells"]] == list(FIELDS) and plate_meta["field_count"] == 2
    models = pytest.importorskip("ome_zarr_models")
    hcs = import_module(f"ome_zarr_models.v0{version[-1]}").HCS.from_zarr(zarr.open_group(str(out), mode="r"))
    ome = (lambda a: a.ome) if version == "0.5" else (lambda a: a)
    fields = [(f"{w.path}/{img.path}", img.acquisition) for i, w in enumerate(ome(hcs.attributes).plate.wells)
              for img in ome(hcs.get_well_group(i).attributes).well.images]
    assert fields == [(n, 1) for n in NAMES] and models


def test_select_writes_a_plate_of_the_selected_wells_and_fields(model, tmp_path):
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    out = tmp_path / "out.zarr"
    res = P.predict(str(plate), str(out), model, select="B3/1,C*", scheduler="threads", **KW)
    assert list(res.images) == ["B/3/1", "C/5/0"]
    assert [im.name for im in open_collection(out).images] == ["B/3/1", "C/5/0"]
    assert zarr.open_group(str(out / "B" / "3"), mode="r").attrs["ome"]["well"]["images"] == \
        [{"path": "1", "acquisition": 1}]
    assert zarr.open_group(str(out), mode="r").attrs["ome"]["plate"]["field_count"] == 1
    with pytest.raises(ConfigError, match="--select picks images of a collection"):
        P.predict(f"{plate}/B/3/0", str(tmp_path / "one.zarr"), model, select="B3", **KW)
    with pytest.raises(ConfigError, match="give an output"):
        P.predict(str(plate), None, model, **KW)


def test_a_container_gives_a_container_with_its_series_names(model, tmp_path):
    src = write_container(tmp_path / "c.zarr")
    out = tmp_path / "out.zarr"
    res = P.predict(str(src), str(out), model, select="0,rfp", scheduler="threads", **KW)
    assert list(res.images) == ["0", "2"]
    listed = open_collection(out)
    assert (listed.kind, [(im.name, im.label) for im in listed.images]) == ("container", [("0", "dapi"), ("2", "rfp")])
    assert np.array_equal(res.open("2").values, alone(model, f"{src}/2", tmp_path))
    pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.v05 import BioFormats2Raw

    BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))


def test_a_folder_of_mixed_tiff_and_ome_zarr_gives_a_folder_through_the_command_line(model, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "day1").mkdir(parents=True)
    tifffile.imwrite(folder / "a.tif", noisy((40, 48), seed=1).astype(np.uint16))
    tifffile.imwrite(folder / "day1" / "b.ome.tif", noisy((48, 36), seed=2))
    write_ome_zarr(folder / "c.ome.zarr", xr.DataArray(noisy((36, 40), seed=3), dims=("y", "x")), pyramid=False,
                   progress=False)
    (folder / "notes.txt").write_text("no image")
    out = tmp_path / "out"
    argv = ["predict", f"{folder}/**", str(out), "--model-dir", str(model), "--no-progress", "--scheduler", "threads",
            "--runtime", "torch", "--precision", "fp32", "--chunks", "32,32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 3 images (folder)" in printed, printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.ome.zarr")) == \
        ["a.ome.zarr", "c.ome.zarr", "day1/b.ome.zarr"]
    for name, src in (("a.ome.zarr", "a.tif"), ("day1/b.ome.zarr", "day1/b.ome.tif"), ("c.ome.zarr", "c.ome.zarr")):
        got = zarr.open_array(str(out / name / "0"))[...]
        assert np.array_equal(got, alone(model, str(folder / src), tmp_path)), name
    assert open_collection(out).complete  # a folder is listed without its subfolders; a glob with ** finds them
    assert [im.name for im in open_collection(f"{out}/**").images] == ["a.ome.zarr", "c.ome.zarr", "day1/b.ome.zarr"]
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # a second run neither overwrites nor resumes
    assert main(argv + ["--overwrite", "--preview"]) == 2 and "--preview shows one image" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # our folder may be replaced


def test_the_next_image_starts_before_the_last_blocks_of_the_one_before_finish(model, tmp_path, monkeypatch):
    """No barrier between images: with 2 threads, image 2's first block is written before image 1's last."""
    from n2v_chunked.cluster import scheduling

    monkeypatch.setattr(scheduling, "usable_cpus", lambda: 2)
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    real, writes = run.write_task, []

    def slow_write(block, block_info=None, *, path, **kwargs):
        res = real(block, block_info=block_info, path=path, **kwargs)  # dask's meta inference fails here: not counted
        time.sleep(0.3)  # blocks that take a while, as real ones do (longer than an image takes to begin)
        writes.append(path.rsplit("/", 3)[-3:])
        return res

    monkeypatch.setattr(run, "write_task", slow_write)
    P.predict(str(plate), str(tmp_path / "out.zarr"), model, scheduler="threads", **KW)
    order = ["/".join(w) for w in writes]
    assert len(order) == 12 and sorted(set(order)) == NAMES
    assert order.index("B/3/1") < len(order) - 1 - order[::-1].index("B/3/0"), order


@pytest.mark.slow  # 16 s on 2 busy cores: the workers import torch and load the model
def test_a_distributed_cluster_writes_the_same_plate(model, tmp_path, local_cluster):
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    ref = P.predict(str(plate), str(tmp_path / "threads.zarr"), model, scheduler="threads", **KW)
    res = P.predict(str(plate), str(tmp_path / "dist.zarr"), model, scheduler=local_cluster.scheduler_address, **KW)
    assert list(res.stats) == NAMES and res.blocks_computed == 12 and is_complete(tmp_path / "dist.zarr")
    for name in NAMES:
        assert np.array_equal(res.open(name).values, ref.open(name).values)


# ----------------------------------------------------------------------------
# Refusals, failures, resume.
# ----------------------------------------------------------------------------


def test_images_that_disagree_or_do_not_fit_the_model_are_refused_up_front(model, tmp_path):
    mixed = write_plate(tmp_path / "mixed.zarr", "0.5", channels=lambda well: 2 if well == "C/5" else 1)
    with pytest.raises(CollectionError, match=r"B/3/0, B/3/1 are yx with 1 channel; C/5/0 is cyx with 2 channels"):
        P.predict(str(mixed), str(tmp_path / "o1.zarr"), model, **KW)
    two = write_plate(tmp_path / "two.zarr", "0.5", channels=lambda well: 2)
    with pytest.raises(IncompatibleModelError, match=r"3 of 3 images do not fit the model \(B/3/0, B/3/1, C/5/0: "
                                                     r"model was trained for 1 channel\(s\) but the input has 2\)"):
        P.predict(str(two), str(tmp_path / "o2.zarr"), model, **KW)
    assert not (tmp_path / "o1.zarr").exists() and not (tmp_path / "o2.zarr").exists()


def test_a_corrupt_image_is_reported_in_one_line_and_the_others_finish(model, tmp_path, capsys):
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    chunk = next(p for p in (plate / "B" / "3" / "1").rglob("*") if p.is_file() and not p.name.startswith((".", "zarr")))
    chunk.write_bytes(b"not a compressed chunk")
    out = tmp_path / "out.zarr"
    rc = main(["predict", str(plate), str(out), "--model-dir", str(model), "--no-progress", "--scheduler", "threads",
               "--runtime", "torch", "--chunks", "32,32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    failed = [line for line in err if "image " in line and " failed: " in line]
    assert len(failed) == 1 and "image B/3/1 failed:" in failed[0], err
    assert err[-1].startswith("n2v-chunked: error: 1 of 3 images failed (B/3/1;") and "--resume" in err[-1], err
    assert is_complete(out / "B" / "3" / "0") and is_complete(out / "C" / "5" / "0")
    assert not is_complete(out / "B" / "3" / "1") and not is_complete(out)
    assert open_collection(out).complete is False


def test_a_kill_in_the_middle_of_a_plate_resumes_to_the_same_plate_skipping_finished_images(model, tmp_path,
                                                                                              monkeypatch, caplog):
    """SIGUSR1 (SLURM's warning; the prediction stops at once, as on Ctrl-C) after the 6th of 12 blocks."""
    from n2v_chunked.cluster import scheduling
    from n2v_chunked.errors import Preempted

    monkeypatch.setattr(scheduling, "usable_cpus", lambda: 1)  # one torch thread: fast on a busy machine
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    ref = P.predict(str(plate), str(tmp_path / "ref.zarr"), model, scheduler="sync", **KW)
    real, written = run.write_task, []

    def write_then_signal(block, block_info=None, **kwargs):
        res = real(block, block_info=block_info, **kwargs)
        written.append(1)
        if len(written) == 6:
            os.kill(os.getpid(), signal.SIGUSR1)
        return res

    out = tmp_path / "out.zarr"
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(Preempted, match=f"stopped on SIGUSR1; {out} stays marked incomplete"):
        mp.setattr(run, "write_task", write_then_signal)
        P.predict(str(plate), str(out), model, scheduler="sync", **KW)
    assert not is_complete(out) and is_complete(out / "B" / "3" / "0") and not is_complete(out / "B" / "3" / "1")
    half = len(P.done_blocks(out / "B" / "3" / "1"))  # 2, or 3: the image's thread finishes the block it runs
    assert half in (2, 3) and not (out / "C" / "5" / "0").exists()
    with caplog.at_level(logging.WARNING, logger="n2v_chunked"):
        half_written = open_collection(out)  # what info lists: the images begun, the plate flagged
    assert half_written.complete is False and [im.name for im in half_written.images] == NAMES[:2]
    assert "marked incomplete: it is an unfinished or failed n2v-chunked output (1 of its 3 images not written yet)" \
        in caplog.text
    with pytest.raises(OutputExistsError, match="other settings.*selection: None -> 'B3'"):
        P.predict(str(plate), str(out), model, scheduler="sync", resume=True, select="B3", **KW)
    (out / "C" / "5" / "0").mkdir()  # a kill as its first file was written leaves an empty folder
    res = P.predict(str(plate), str(out), model, scheduler="sync", resume=True, **KW)
    assert [res.stats[n]["blocks_computed"] for n in NAMES] == [0, 4 - half, 4]
    assert [res.stats[n]["blocks_skipped"] for n in NAMES] == [4, half, 0]
    for name in NAMES:
        assert np.array_equal(res.open(name).values, ref.open(name).values)
        assert zarr.open_group(str(out / name), mode="r").attrs["ome"] == \
            zarr.open_group(str(tmp_path / "ref.zarr" / name), mode="r").attrs["ome"]
    assert is_complete(out) and not list(out.rglob(P.MARKER_DIR))
    again = P.predict(str(plate), str(out), model, resume=True, **KW)
    assert again.blocks_computed == 0 and again.blocks_skipped == 12


def test_a_plate_on_s3_gives_a_plate_on_s3(model, s3_env, tmp_path):
    plate = write_plate(tmp_path / "plate.zarr", "0.5")
    client = s3_env.client()
    client.create_bucket(Bucket="plates")
    for f in plate.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "plates", f"in.zarr/{f.relative_to(plate)}")
    res = P.predict("s3://plates/in.zarr", "s3://plates/out.zarr", model, select="C*", scheduler="threads", **KW)
    listed = open_collection("s3://plates/out.zarr")
    assert [im.name for im in listed.images] == ["C/5/0"] and listed.complete and listed.name == "screen 7"
    assert np.array_equal(res.open("C/5/0").values, alone(model, f"{plate}/C/5/0", tmp_path))
