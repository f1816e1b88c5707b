"""Training one model on a collection (issue 26): plates, mixed folders, the sampler across images, refusals, resume.

Plates are written by ome-zarr-py's own writer; images are at most 64 px and
networks have 4 features, so each training run takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import yaml
import zarr

import n2v_chunked
from n2v_chunked.cli import main
from n2v_chunked.errors import CollectionError, ConfigError
from n2v_chunked.io.collections import open_collection
from n2v_chunked.io.ome import write_ome_zarr
from n2v_chunked.model.config import ModelConfig, TrainConfig
from n2v_chunked.sampling import collection as sampling_collection
from n2v_chunked.sampling.collection import CollectionPatchDataset, allocate
from n2v_chunked.sampling.dataset import batches
from n2v_chunked.training import loop

ome_writer = pytest.importorskip("ome_zarr.writer", reason="ome-zarr-py is in the test extra")
from ome_zarr.format import FormatV05  # noqa: E402

PREFIX = "n2v-chunked: error:"
FAST = ["--steps", "3", "--batch-size", "8", "--features", "4", "--val-interval", "3", "--val-fraction", "0.3",
        "--patch", "16,16", "--no-progress"]
FIELDS = {"B/3": [(40, 48), (32, 56)], "C/4": [(48, 40)]}  # well -> field shapes


def _noisy(shape, seed, scale=100.0, offset=500.0, dtype="u2") -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    clean = offset + scale * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    return (clean + rng.normal(0, scale / 4, shape)).clip(0, None).astype(dtype)


def _plate(path: Path) -> Path:
    """A 2-well plate of noisy fields of different sizes, written by ome-zarr-py (NGFF 0.5)."""
    fmt, root = FormatV05(), zarr.open_group(str(path), mode="w", zarr_format=3)
    ome_writer.write_plate_metadata(root, ["B", "C"], ["3", "4"], list(FIELDS), fmt=fmt, name="screen")
    for w, (well, shapes) in enumerate(FIELDS.items()):
        row, col = well.split("/")
        group = root.require_group(row).require_group(col)
        ome_writer.write_well_metadata(group, [str(f) for f in range(len(shapes))], fmt=fmt)
        for f, shape in enumerate(shapes):
            ome_writer.write_image(_noisy(shape, 10 * w + f), group.require_group(str(f)), axes="yx", fmt=fmt,
                                   scale_factors=[], storage_options={"chunks": (16, 16)})
    return path


def _mixed_folder(path: Path) -> Path:
    """TIFF (uint16, float32) and OME-Zarr (uint8) images of different shapes and value ranges."""
    path.mkdir()
    tifffile.imwrite(path / "a.tif", _noisy((40, 48), 1, 100, 1000))
    tifffile.imwrite(path / "b.tif", _noisy((64, 64), 2, 10, 50, "f4"))
    write_ome_zarr(str(path / "c.ome.zarr"), xr.DataArray(_noisy((56, 33), 3, 20, 100, "u1"), dims=("y", "x")),
                   dtype="uint8", chunks=(16, 16), pyramid=False, progress=False)
    return path


def _config(model: Path) -> dict:
    return yaml.safe_load((model / "config.yaml").read_text())


def _fast(steps: int = 2, **kw) -> dict:
    """fit's options for a run of a few seconds."""
    return dict(model_cfg=ModelConfig(features=4), progress=False, train_cfg=TrainConfig(
        steps=steps, batch_size=8, patch_size=[16, 16], val_interval=2, val_patches=16), **kw)


def _denoised(model: Path, image: np.ndarray) -> np.ndarray:
    return n2v_chunked.denoise(n2v_chunked.load_model(model), image.astype("f4")[None, None])[0, 0]


def test_plate_trains_one_model_that_predicts(tmp_path):
    plate = _plate(tmp_path / "plate.ome.zarr")
    model = tmp_path / "m"
    n2v_chunked.fit(str(plate), model, val_fraction=0.3, **_fast())
    record = _config(model)["collection"]
    assert record["kind"] == "plate" and record["images"] == 3
    assert record["normalize_per"] == "image" and record["val_by"] == "block"  # the measured defaults
    den = _denoised(model, n2v_chunked.open_image(str(plate / "B/3/1")).values)
    assert den.shape == (32, 56) and np.isfinite(den).all()


def test_train_command_hands_the_collection_options_to_fit(tmp_path, monkeypatch):
    """The CLI's wiring (fit itself is tested above and below): --select, --normalize-per, --val-by."""
    from n2v_chunked.training import fit as fit_module

    seen = {}
    monkeypatch.setattr(fit_module, "fit", lambda *a, **k: seen.update(k) or loop.TrainResult(tmp_path, 1, 0.5, [], 1.0, 1.0))
    assert main(["train", "plate.ome.zarr", "--model-dir", str(tmp_path / "m"), "--select", "B3,C*",
                 "--normalize-per", "image", "--val-by", "image", "--no-progress"]) == 0
    assert (seen["select"], seen["normalize_per"], seen["val_by"]) == ("B3,C*", "image", "image")
    main(["train", "plate.ome.zarr", "--model-dir", str(tmp_path / "m"), "--no-progress"])
    assert (seen["select"], seen["normalize_per"], seen["val_by"]) == (None, None, None)  # fit's defaults
    config = tmp_path / "options.yaml"  # the YAML config takes them too
    config.write_text("train:\n  select: B3\n  normalize-per: image\n  val-by: block\n")
    main(["--config", str(config), "train", "plate.ome.zarr", "--model-dir", str(tmp_path / "m"), "--no-progress"])
    assert (seen["select"], seen["normalize_per"], seen["val_by"]) == ("B3", "image", "block")


def test_mixed_folder_trains_and_patches_come_from_every_image_by_size(tmp_path, monkeypatch):
    folder = _mixed_folder(tmp_path / "data")
    images = open_collection(folder).images
    assert {im.format for im in images} == {"tiff", "ome-zarr"} and len({im.dtype for im in images}) == 3
    ds = CollectionPatchDataset(images, (8, 8), val_fraction=0.0, seed=1)
    patches = torch_cat(batches(ds, 256), 3000)
    # the images' value ranges do not overlap: a patch's median names its image
    median = np.median(patches.reshape(len(patches), -1), axis=1)
    which = np.digitize(median, [40, 80, 200, 600])  # b ~ 50, c ~ 100, a ~ 1000
    share = np.bincount(which, minlength=5)[[4, 1, 2]] / len(which)
    origins = np.array([(h - 7) * (w - 7) for h, w in (im.shape for im in images)], float)
    np.testing.assert_allclose(share, origins / origins.sum(), atol=0.06)  # by size, every image

    model = tmp_path / "m"
    res = n2v_chunked.fit(str(folder), model, val_fraction=0.3, **_fast())
    assert res.step == 2 and _config(model)["collection"]["images"] == 3
    den = _denoised(model, tifffile.imread(folder / "a.tif"))
    assert den.shape == (40, 48) and np.isfinite(den).all()


def torch_cat(stream, n: int) -> np.ndarray:
    out, got = [], 0
    for batch in stream:
        out.append(batch.numpy())
        got += len(batch)
        if got >= n:
            break
    return np.concatenate(out)[:n]


def test_normalize_per_image_maps_each_image_to_its_own_statistics(tmp_path):
    folder = _mixed_folder(tmp_path / "data")
    images = open_collection(folder).images
    per_image = CollectionPatchDataset(images, (8, 8), val_fraction=0.0, normalize_per="image")
    per_image.reference = (np.zeros(1), np.ones(1))  # the loop's units: each image by its own statistics
    x = torch_cat(batches(per_image, 256), 1024)
    assert abs(x.mean()) < 0.3 and 0.6 < x.std() < 1.5
    raw = torch_cat(batches(CollectionPatchDataset(images, (8, 8), val_fraction=0.0), 256), 1024)
    assert raw.std() > 100  # over the collection the images' offsets dominate
    mean, std = CollectionPatchDataset(images, (8, 8)).collection_stats()
    assert 100 < mean[0] < 1000 and std[0] > 100


def test_start_up_opens_a_bounded_number_of_images(tmp_path, monkeypatch):
    """Before the first step: the statistics' regions, the validation blocks and the buffer; not every image."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        zarr.create_array(str(folder / f"im{i:02d}.zarr"), data=_noisy((32, 32), i), chunks=(16, 16), zarr_format=2)
    opened, at_first_step = [], []
    real_open = sampling_collection.open_image
    monkeypatch.setattr(sampling_collection, "open_image", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(sampling_collection, "COLLECTION_STATS_REGIONS", 4)
    real_step = loop.Trainer.step
    monkeypatch.setattr(loop.Trainer, "step", lambda self, raw: at_first_step.append(len(opened)) or real_step(self, raw))
    n2v_chunked.fit(str(folder), tmp_path / "m", axes="yx", model_cfg=ModelConfig(features=4),
                    train_cfg=TrainConfig(steps=1, batch_size=4, patch_size=[16, 16], val_patches=4),
                    buffer_bytes=8 * 2**10, progress=False)
    assert 0 < at_first_step[0] <= 4 + 4 + 4  # stats regions + validation blocks + buffer slots, of 40 images


def test_disagreeing_images_and_images_smaller_than_the_patch_are_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    tifffile.imwrite(folder / "gray.tif", _noisy((32, 32), 0))
    write_ome_zarr(str(folder / "rgb.ome.zarr"), xr.DataArray(np.stack([_noisy((32, 32), s) for s in (1, 2)]),
                                                             dims=("c", "y", "x")), dtype="uint16", pyramid=False,
                   progress=False)
    assert main(["train", str(folder), "--model-dir", str(tmp_path / "m"), *FAST]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(PREFIX) and "gray.tif" in err and "rgb.ome.zarr" in err

    small = tmp_path / "small"
    small.mkdir()
    tifffile.imwrite(small / "big.tif", _noisy((64, 64), 0))
    tifffile.imwrite(small / "tiny.tif", _noisy((24, 40), 1))
    assert main(["train", str(small), "--model-dir", str(tmp_path / "m2"), *FAST[:-3], "--patch", "32,32"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiny.tif" in err and "big.tif" not in err and "32x32 patch" in err


def test_select_restricts_training_and_resume_continues_a_collection_model(tmp_path, capsys, monkeypatch):
    plate = _plate(tmp_path / "plate.ome.zarr")
    model = tmp_path / "m"
    opened: list[str] = []
    real_open = sampling_collection.open_image
    monkeypatch.setattr(sampling_collection, "open_image", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    n2v_chunked.fit(str(plate), model, select="B3", val_fraction=0.3, **_fast())
    record = _config(model)["collection"]
    assert record["images"] == 2 and record["selection"] == "B3"
    assert opened and all("/B/3/" in p for p in opened)  # C/4/0 was never read
    # resume: same images, more steps
    res = n2v_chunked.fit(str(plate), model, select="B3", resume=True, train_cfg={"steps": 3}, progress=False)
    assert res.step == 3 and _config(model)["train"]["steps"] == 3
    # other images, or another normalisation, cannot continue this model; nor can one image
    for extra, words in ((["--select", "B3,C4"], "the images the model began with"),
                         (["--select", "B3", "--normalize-per", "collection"], "normalize_per cannot change"),
                         ([], "the images the model began with")):
        code = main(["train", str(plate), *extra, "--model-dir", str(model), "--resume", "--steps", "6",
                     "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and words in err and err.count("\n") == 0
    code = main(["train", str(plate / "B/3/0"), "--model-dir", str(model), "--resume", "--steps", "6", "--no-progress"])
    assert code != 0 and "trained on a collection" in capsys.readouterr().err


def test_validation_by_image_and_options_that_need_a_collection(tmp_path):
    plate = _plate(tmp_path / "plate.ome.zarr")
    collection = open_collection(plate)
    n2v_chunked.fit(collection, tmp_path / "m", val_by="image", val_fraction=0.3, **_fast(steps=1))
    record = _config(tmp_path / "m")["collection"]
    assert record["val_by"] == "image" and len(record["held_out"]) == 1
    assert record["held_out"][0] in {im.name for im in collection.images}
    with pytest.raises(ConfigError, match="needs at least 2 images"):
        n2v_chunked.fit(collection, tmp_path / "m2", select="C4", val_by="image", **_fast())
    with pytest.raises(ConfigError, match="is one image"):
        n2v_chunked.fit(str(plate / "B/3/0"), tmp_path / "m3", select="B3", **_fast())
    with pytest.raises(CollectionError, match="smaller than the 64x64 patch"):
        CollectionPatchDataset(collection.images, (64, 64))


def test_allocation_is_proportional_to_size():
    counts = allocate([10, 0, 30, 60], 20, seed=3)
    assert counts.tolist() == [2, 0, 6, 12]


def test_a_model_trained_per_image_is_predicted_with_each_images_own_statistics(tmp_path, caplog):
    """The model's contract says how it was normalised; predict and denoise follow it by default (every door)."""
    folder = tmp_path / "data"
    folder.mkdir()
    bright, dim = _noisy((48, 48), 1, 100, 1000, "f4"), _noisy((40, 56), 2, 100, 1000, "f4") / 20  # two shapes: a collection
    tifffile.imwrite(folder / "bright.tif", bright)
    tifffile.imwrite(folder / "dim.ome.tif", dim)
    model = tmp_path / "m"
    n2v_chunked.fit(str(folder), model, val_fraction=0.3, **_fast())
    trained = n2v_chunked.load_model(model)
    assert trained.contract.normalize == "data"
    # in memory: the input's own statistics, not the stored ones (which fit neither image)
    x = dim[None, None]
    auto, own = (n2v_chunked.denoise(trained, x, normalize=n) for n in ("auto", "data"))
    np.testing.assert_array_equal(auto, own)
    assert not np.allclose(auto, n2v_chunked.denoise(trained, x, normalize="model"), rtol=1e-3)
    # chunked, through the CLI's default and Python's: the same, recorded as "data"
    out = tmp_path / "dim.ome.zarr"
    assert main(["predict", str(folder / "dim.ome.tif"), str(out), "--model-dir", str(model), "--no-progress",
                 "--scheduler", "sync", "--runtime", "torch", "--precision", "fp32"]) == 0
    meta = zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]
    assert meta["parameters"]["normalize"] == meta["normalization"]["mode"] == "data"
    written = n2v_chunked.open_image(str(out)).values
    np.testing.assert_allclose(written, own[0, 0], rtol=1e-4, atol=1e-4 * float(np.ptp(own)))
    caplog.clear()
    n2v_chunked.predict(str(folder / "dim.ome.tif"), None, model, normalize="model", runtime="torch",
                        precision="fp32", progress=False)
    assert "fit no image" in caplog.text  # an explicit --normalize model on such a model is said
