"""Tests of the chunk-aware streaming patch sampler (n2v_chunked.sampling).

Most tests use "coordinate" volumes whose value is the linear index of the
voxel, so every patch tells where it came from and can be compared with the
source exactly.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import run_benchmark

from n2v_chunked.errors import N2VError
from n2v_chunked.io.sources import open_image
from n2v_chunked.sampling.dataset import ZarrPatchDataset, batches
from n2v_chunked.sampling.grid import BlockGrid, _subtract, draw_origins, make_block_grid, origin_boxes
from n2v_chunked.sampling.order import Permutation, assign_blocks, split_validation


def coord_zarr(path: Path, shape, chunks, compress: bool = False) -> zarr.Array:
    """A zarr array whose voxels hold their own linear index (exact in float32 up to 2**24)."""
    assert math.prod(shape) < 2**24
    kw = {"compressors": [zarr.codecs.BloscCodec(cname="lz4", clevel=1)]} if compress else {}
    z = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype="float32", overwrite=True, **kw)
    z[...] = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    return z


def take(ds: ZarrPatchDataset, n: int | None = None, **stream_kw) -> tuple[np.ndarray, dict]:
    """Up to ``n`` patches (all of a finite stream when None) and the stream stats."""
    out = []
    with ds.stream(**stream_kw) as s:
        got = 0
        while n is None or got < n:
            b = s.next_batch(64 if n is None else min(64, n - got))
            if b is None:
                break
            out.append(b.numpy())
            got += len(b)
        stats = dict(s.stats)
    return np.concatenate(out), stats


def origins_of(ds: ZarrPatchDataset, patches: np.ndarray) -> np.ndarray:
    """Grid-dim origins of coordinate-volume patches, shape (n, n_grid_dims)."""
    full = np.stack(np.unravel_index(patches[:, 0].reshape(len(patches), -1)[:, 0].astype(np.int64),
                                     ds._source.shape), axis=1)
    return full[:, ds._grid_axes]


def check_patches_match(ds: ZarrPatchDataset, patches: np.ndarray, ref: np.ndarray) -> None:
    for p, o in zip(patches, origins_of(ds, patches)):
        region = [slice(None)] * ref.ndim
        for ax, lo, size in zip(ds._grid_axes, o, ds.grid.patch):
            region[ax] = slice(lo, lo + size)
        want = ref[tuple(region)]
        want = np.moveaxis(want, ds._c_axis, 0) if ds._c_axis is not None else want[None]
        np.testing.assert_array_equal(p, want.reshape(p.shape))


def owner_blocks(ds: ZarrPatchDataset, origins: np.ndarray) -> np.ndarray:
    idx = [np.searchsorted(e, origins[:, d], side="right") - 1 for d, e in enumerate(ds.grid.edges)]
    return np.ravel_multi_index(idx, ds.grid.grid_shape)


def train_ids(ds: ZarrPatchDataset) -> np.ndarray:
    return np.asarray(ds.train_blocks)


def quotas(ds: ZarrPatchDataset, blocks=None) -> np.ndarray:
    """Patch quotas of ``blocks`` (default: every block)."""
    return ds.block_quota(np.arange(ds.grid.n_blocks) if blocks is None else np.asarray(blocks))


def overlaps(origins: np.ndarray, patch, box) -> np.ndarray:
    hit = np.ones(len(origins), dtype=bool)
    for d, ((lo, hi), p) in enumerate(zip(box, patch)):
        hit &= (origins[:, d] < hi) & (origins[:, d] + p > lo)
    return hit


# ----------------------------------------------------------------------------
# Block grid and patch positions
# ----------------------------------------------------------------------------


def test_block_grid_groups_chunks_and_merges_short_tail():
    grid = make_block_grid((200, 300), ((32,) * 6 + (8,), (64,) * 4 + (44,)), ("y", "x"), (32, 32),
                           min_block_bytes=0)
    # at least twice the patch along each spatial dim, chunk aligned
    assert grid.edges[0] == (0, 64, 128, 200)  # tail 192..200 (8 < 32) merged
    assert grid.edges[1] == (0, 64, 128, 192, 256, 300)  # tail of 44 >= patch stays
    big = make_block_grid((1024, 1024), ((64,) * 16, (64,) * 16), ("y", "x"), (32, 32), min_block_bytes=2**18)
    assert all(np.diff(e).min() * 4 >= 1 for e in big.edges)
    assert math.prod(np.diff(e)[0] for e in big.edges) * 4 >= 2**18


def test_small_arrays_split_inside_chunks_for_validation():
    grid = make_block_grid((512, 512), ((512,), (512,)), ("y", "x"), (64, 64))
    assert grid.n_blocks >= 10 and min(min(np.diff(e)) for e in grid.edges) >= 128


def test_too_small_volume_names_axis_size_and_patch(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (50, 200), (50, 50))
    with pytest.raises(N2VError, match=r"axis 'y': size 50 < patch 64"):
        ZarrPatchDataset(z, (64, 64), dims=("y", "x"))


def test_origin_boxes_avoid_forbidden_footprints():
    own = ((0, 100), (0, 100))
    forbidden = [((100, 200), (0, 200)), ((0, 200), (100, 200)), ((40, 50), (40, 50))]
    boxes = origin_boxes(own, forbidden, (16, 16))
    o = draw_origins(np.random.default_rng(0), boxes, 5000)
    for f in forbidden:
        assert not overlaps(o, (16, 16), f).any()
    assert o[:, 0].min() == 0 and o[:, 0].max() == 84  # whole allowed range reachable
    vol = sum(math.prod(h - lo for lo, h in b) for b in boxes)
    assert vol == 85 * 85 - 25 * 25  # disjoint pieces: exact area
    assert _subtract(((0, 4), (0, 4)), ((10, 12), (0, 4))) == [((0, 4), (0, 4))]


def test_validation_split_deterministic_and_at_least_one():
    split = split_validation(30, 0.1, seed=3)
    tr, va = split.train, split.val
    assert len(va) == 3 and not set(tr) & set(va) and len(tr) + len(va) == 30
    assert np.array_equal(va, split_validation(30, 0.1, seed=3).val)
    assert len(split_validation(4, 0.01, 0).val) == 1
    with pytest.raises(N2VError, match="only 1 block"):
        split_validation(1, 0.1, 0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 97, 1000, 4099, 65537])  # primes among them
def test_permutation_is_a_seeded_bijection(n):
    p = Permutation(n, 5, 2, 0)
    image = p(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))  # a bijection on range(n)
    np.testing.assert_array_equal(p.index(image), np.arange(n))  # index() inverts it
    for i in range(0, n, max(1, n // 50)):  # one index at a time: the same map
        assert p(i) == image[i] and p.index(image[i]) == i
    np.testing.assert_array_equal(Permutation(n, 5, 2, 0)(np.arange(n)), image)  # same key, same order
    if n >= 10:
        assert not np.array_equal(Permutation(n, 5, 2, 1)(np.arange(n)), image)  # another key, another
    if n >= 1000:  # shuffled, not a shift or a near-identity
        assert abs(np.corrcoef(np.arange(n), image)[0, 1]) < 0.1 and (image == np.arange(n)).sum() < 10
    with pytest.raises(IndexError):
        p(n)


def test_permutation_images_spread_over_keys():
    firsts = np.bincount([Permutation(10, 0, key)(0) for key in range(2000)], minlength=10)
    assert firsts.min() > 100  # each of the 10 blocks is first about 200 times in 2000 keys


def test_split_is_stratified_exact_and_lazy():
    grid = make_block_grid((200, 300), ((32,) * 6 + (8,), (64,) * 4 + (44,)), ("y", "x"), (32, 32),
                           min_block_bytes=0)  # 3 x 5 blocks; the last row and column differ in shape
    split = split_validation(grid, 0.3, seed=1)
    val, train = np.asarray(split.val), np.asarray(split.train)
    assert len(val) == round(0.3 * 15) and sorted([*val, *train]) == list(range(15))
    assert all(split.is_val(b) for b in val) and not any(split.is_val(b) for b in train)
    np.testing.assert_array_equal(split.is_val(np.arange(15)), np.isin(np.arange(15), val))
    assert all(b in split.val and b not in split.train for b in val)
    # each stratum holds out its share, rounded up or down
    stratum = grid.strata.locate(np.arange(15))[0]
    share = len(val) * grid.strata.sizes / 15
    held = np.bincount(stratum[val], minlength=len(share))
    assert (np.floor(share) <= held).all() and (held <= np.ceil(share)).all()
    assert split_validation(grid, 0.3, seed=1).val.tolist() == val.tolist()  # deterministic
    assert any(split_validation(grid, 0.3, seed=s).val.tolist() != val.tolist() for s in range(2, 6))


@pytest.mark.parametrize("n_train, n_streams", [(10, 1), (10, 3), (97, 7), (5, 8)])
def test_streams_of_a_pass_share_no_block(n_train, n_streams):
    train = np.arange(100, 100 + n_train)
    per_stream = [list(assign_blocks(train, 4, s, n_streams, seed=0)) for s in range(n_streams)]
    flat = [b for blocks in per_stream for b in blocks]
    if n_train >= n_streams:
        assert sorted(flat) == train.tolist()  # every training block once, no stream shares one
    else:
        assert [len(b) for b in per_stream] == [1] * n_streams and set(flat) == set(train.tolist())
    assert per_stream[0] == list(assign_blocks(train, 4, 0, n_streams, seed=0))
    if n_train >= 10:
        assert per_stream[0] != list(assign_blocks(train, 5, 0, n_streams, seed=0))  # a fresh order per pass


@pytest.mark.parametrize("straddle", [True, False])
def test_quotas_per_stratum_are_the_per_block_quotas(tmp_path, straddle):
    z = coord_zarr(tmp_path / "a.zarr", (200, 300), (32, 64))
    ds = ZarrPatchDataset(z, (32, 32), dims=("y", "x"), min_block_bytes=0, straddle=straddle, reuse=3)
    per_block = [max(1, round(3 * math.prod(hi - lo for lo, hi in ds.grid.origin_box(b, straddle)) / 32**2))
                 for b in range(ds.grid.n_blocks)]
    assert quotas(ds).tolist() == per_block and len(set(per_block)) > 1
    assert ds._pass_quota == sum(per_block[b] for b in ds.train_blocks)


# ----------------------------------------------------------------------------
# Patches: shapes, contents, coverage, leakage
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, shape, chunks, spatial, patch",
    [
        (("y", "x"), (160, 192), (32, 32), ("y", "x"), (16, 16)),
        (("z", "y", "x"), (40, 48, 64), (8, 16, 16), ("z", "y", "x"), (8, 8, 8)),
        (("z", "y", "x"), (6, 96, 96), (1, 32, 32), ("y", "x"), (16, 16)),  # z as a sample axis
        (("c", "y", "x"), (3, 128, 96), (1, 32, 32), ("y", "x"), (16, 16)),
        (("t", "c", "z", "y", "x"), (3, 2, 4, 64, 64), (1, 1, 2, 32, 32), ("y", "x"), (16, 16)),
    ],
)
def test_patch_shapes_and_contents(tmp_path, dims, shape, chunks, spatial, patch):
    z = coord_zarr(tmp_path / "a.zarr", shape, chunks)
    x = open_image(str(tmp_path / "a.zarr"), axes="".join(dims))  # hands over the zarr array it opened
    ds = ZarrPatchDataset(x, patch, spatial, epochs=1, min_block_bytes=0)
    assert type(ds._source).__name__ == "_ZarrSource"  # read through zarr, not dask
    p, _ = take(ds, 400)
    C = shape[dims.index("c")] if "c" in dims else 1
    assert p.shape == (len(p), C, *patch) and p.dtype == np.float32
    check_patches_match(ds, p, z[...])


def test_every_training_block_visited_and_voxels_covered(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (128, 160), (32, 32))
    ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), epochs=3, reuse=6, min_block_bytes=0, seed=2)
    p, stats = take(ds)
    o = origins_of(ds, p)
    owners = owner_blocks(ds, o)
    # each pass serves every training block's quota exactly once
    counts = np.bincount(owners, minlength=ds.grid.n_blocks)
    np.testing.assert_array_equal(counts[train_ids(ds)], 3 * quotas(ds, ds.train_blocks))
    assert stats["blocks_loaded"] == 3 * len(ds.train_blocks)
    # Patches straddle block borders: every voxel a patch away from the array
    # edge and from validation blocks is covered (edge voxels fit fewer patch
    # positions, as with any random crop), and the extreme origins occur.
    cover = np.zeros(z.shape, dtype=bool)
    for y, x in o:
        cover[y:y + 16, x:x + 16] = True
    near = np.ones(z.shape, dtype=bool)
    near[16:-16, 16:-16] = False
    for b in ds.val_blocks:
        (y0, y1), (x0, x1) = ds.grid.bounds(int(b))
        assert not cover[y0:y1, x0:x1].any()
        near[max(y0 - 16, 0):y1 + 16, max(x0 - 16, 0):x1 + 16] = True
    assert cover[~near].all()
    assert o.min(axis=0).tolist() == [0, 0] and o.max(axis=0).tolist() == [128 - 16, 160 - 16]


def test_no_train_validation_leakage(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (16, 96, 96), (4, 32, 32))
    ds = ZarrPatchDataset(z, (12, 12, 12), dims=("z", "y", "x"), val_fraction=0.25, epochs=2, min_block_bytes=0)
    assert len(ds.val_blocks) >= 1
    p, _ = take(ds)
    o = origins_of(ds, p)
    for b in ds.val_blocks:
        assert not overlaps(o, ds.grid.patch, ds.grid.bounds(int(b))).any()
    v = ds.validation_patches(40)
    assert v.shape == (40, 1, 12, 12, 12) and v.dtype == np.float32
    assert ds.validation_patches(40) is v  # drawn once
    vo = origins_of(ds, v)
    inside = np.zeros(len(v), dtype=bool)
    for b in ds.val_blocks:
        box = ds.grid.bounds(int(b))
        inside |= np.all([(vo[:, d] >= lo) & (vo[:, d] + p_ <= hi)
                          for d, ((lo, hi), p_) in enumerate(zip(box, ds.grid.patch))], axis=0)
    assert inside.all()
    check_patches_match(ds, v, z[...])
    again = ZarrPatchDataset(z, (12, 12, 12), dims=("z", "y", "x"), val_fraction=0.25, min_block_bytes=0)
    np.testing.assert_array_equal(again.validation_patches(40), v)


# ----------------------------------------------------------------------------
# Reproducibility, resume, sharding
# ----------------------------------------------------------------------------


def test_same_seed_same_stream_other_seed_differs(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (256, 256), (32, 32), compress=True)

    def first(seed, threads):
        return take(ZarrPatchDataset(z, (16, 16), dims=("y", "x"), seed=seed, io_threads=threads,
                                     min_block_bytes=0), 700)[0]

    a = first(5, 2)
    np.testing.assert_array_equal(a, first(5, 2))
    np.testing.assert_array_equal(a, first(5, 0))  # threads change nothing
    assert not np.array_equal(a, first(6, 2))


def test_resume_skips_by_reseeding(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (128, 128), (32, 32))
    kw = dict(dims=("y", "x"), seed=1, min_block_bytes=0, epochs=1)
    ds = ZarrPatchDataset(z, (16, 16), **kw)
    per_pass = int(quotas(ds, ds.train_blocks).sum())
    next(iter(batches(ds, 10)))  # served 10 patches in process
    assert ds.state_dict() == {"seed": 1, "epoch": 0, "patches_served": 10}
    # a whole pass served -> the resumed stream is exactly pass 1
    resumed = ZarrPatchDataset(z, (16, 16), **{**kw, "epochs": 2})  # passes 0-1, pass 0 already served
    resumed.load_state_dict({"seed": 1, "epoch": 0, "patches_served": per_pass})
    fresh = ZarrPatchDataset(z, (16, 16), **kw)
    fresh.set_epoch(1)
    np.testing.assert_array_equal(take(resumed)[0], take(fresh)[0])
    # half a pass served -> only the remaining blocks are loaded, none replayed
    half = ZarrPatchDataset(z, (16, 16), **kw)
    half.load_state_dict({"seed": 1, "epoch": 0, "patches_served": per_pass // 2})
    p, stats = take(half)
    n = len(ds.train_blocks)
    assert 0.3 * n <= stats["blocks_loaded"] <= 0.7 * n
    assert abs(len(p) - per_pass / 2) <= quotas(ds).max() * 2
    two = ZarrPatchDataset(z, (16, 16), **kw, rank=1, world_size=2)
    assert two.state_dict(patches_served=7)["patches_served"] == 14  # per-rank count x world size
    full_owners = set(owner_blocks(ds, origins_of(ds, take(ZarrPatchDataset(z, (16, 16), **kw))[0])).tolist())
    assert set(owner_blocks(half, origins_of(half, p)).tolist()) < full_owners


def test_ranks_serve_disjoint_blocks(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (128, 192), (32, 32))
    owners = []
    for rank in (0, 1):
        ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), epochs=1, rank=rank, world_size=2, min_block_bytes=0)
        owners.append(set(owner_blocks(ds, origins_of(ds, take(ds)[0])).tolist()))
    assert owners[0] and owners[1] and not owners[0] & owners[1]
    assert owners[0] | owners[1] == set(ds.train_blocks.tolist())


def test_dataloader_workers_serve_distinct_streams(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (128, 192), (32, 32), compress=True)
    url = str(tmp_path / "a.zarr")  # opened lazily in each worker
    ds = ZarrPatchDataset(url, (16, 16), dims=("y", "x"), epochs=1, min_block_bytes=0, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    p = torch.cat(list(loader)).numpy()
    counts = np.bincount(owner_blocks(ds, origins_of(ds, p)), minlength=ds.grid.n_blocks)
    # every training block served its quota exactly once: no stream duplicated another
    np.testing.assert_array_equal(counts[train_ids(ds)], quotas(ds, ds.train_blocks))
    assert counts[np.asarray(ds.val_blocks)].sum() == 0
    check_patches_match(ds, p[:50], z[...])


def test_pickle_roundtrip_streams_the_same(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (96, 96), (32, 32))
    ds = ZarrPatchDataset(xr.DataArray(da.from_zarr(z), dims=("y", "x")), (16, 16), min_block_bytes=0)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(take(ds, 200)[0], take(clone, 200)[0])


def test_spawned_workers(tmp_path):
    coord_zarr(tmp_path / "a.zarr", (96, 128), (32, 32))
    ds = ZarrPatchDataset(str(tmp_path / "a.zarr"), (16, 16), dims=("y", "x"), epochs=1, min_block_bytes=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="spawn")
    p = torch.cat(list(loader)).numpy()
    counts = np.bincount(owner_blocks(ds, origins_of(ds, p)), minlength=ds.grid.n_blocks)
    np.testing.assert_array_equal(counts[train_ids(ds)], quotas(ds, ds.train_blocks))


# ----------------------------------------------------------------------------
# Buffer, sources
# ----------------------------------------------------------------------------


def test_buffer_never_exceeds_budget(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (256, 256), (32, 32))
    probe = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0)
    window = probe.grid.max_window_voxels(True) * 4
    for budget in (window, 3 * window + 7, 10 * window):
        ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0, buffer_bytes=budget)
        _, stats = take(ds, 3000)
        assert window <= stats["peak_buffer_bytes"] <= budget
    with pytest.raises(N2VError, match="cannot hold one block"):
        ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0, buffer_bytes=window - 1)


def test_fsspec_url_dask_and_numpy_sources(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (96, 96), (32, 32))
    ref = z[...]
    inputs = [
        ("file://" + str(tmp_path / "a.zarr"), None),
        (zarr.open_array("file://" + str(tmp_path / "a.zarr"), mode="r"), None),
        (da.from_array(ref, chunks=32) + 0, None),  # a dask graph that is not a plain zarr view
        (ref, (32, 32)),
    ]
    for data, chunks in inputs:
        ds = ZarrPatchDataset(data, (16, 16), dims=("y", "x"), chunks=chunks, epochs=1, min_block_bytes=0)
        p, _ = take(ds, 100)
        check_patches_match(ds, p, ref)


def test_batches_helper_shapes(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (2, 64, 64), (1, 32, 32))
    ds = ZarrPatchDataset(xr.DataArray(da.from_zarr(z), dims=("c", "y", "x")), (16, 16), min_block_bytes=0)
    b = next(iter(batches(ds, 32)))
    assert b.shape == (32, 2, 16, 16) and b.dtype == torch.float32
    gen = batches((torch.zeros(2, 16, 16) for _ in range(5)), 2)
    assert [len(x) for x in gen] == [2, 2, 1]
    ds = ZarrPatchDataset(z, (16, 16), ("y", "x"), dims=("c", "y", "x"), min_block_bytes=0, epochs=1)
    assert sum(len(x) for x in batches(ds, 7)) == quotas(ds, ds.train_blocks).sum()  # finite: ends once


# ----------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------


def corrupt(path: Path, *idx: int) -> None:
    (path / "c" / Path(*[str(i) for i in idx])).write_bytes(b"not a blosc frame" * 10)


def test_corrupt_chunk_skipped_with_warning(tmp_path):
    path = tmp_path / "a.zarr"
    z = coord_zarr(path, (128, 128), (32, 32), compress=True)
    corrupt(path, 1, 2)
    ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), epochs=1, min_block_bytes=0, val_fraction=0)
    with pytest.warns(RuntimeWarning, match=r"chunk \(1, 2\) of .*a\.zarr.*cannot be read"):
        p, stats = take(ds)
    o = origins_of(ds, p)
    assert not overlaps(o, (16, 16), ((32, 64), (64, 96))).any()
    assert len(p) > 0.8 * quotas(ds).sum()
    check_patches_match(ds, p[:50], np.arange(128 * 128, dtype=np.float32).reshape(128, 128))


def test_too_many_bad_chunks_stop_with_error(tmp_path):
    path = tmp_path / "a.zarr"
    z = coord_zarr(path, (128, 128), (32, 32), compress=True)
    for i in range(4):
        corrupt(path, i, 0)
        corrupt(path, i, 1)
    ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0, max_bad_chunks=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(N2VError, match=r"too many bad chunks in .*a\.zarr: 6 > max_bad_chunks=5"):
            take(ds, 5000)


def test_nan_chunk_skipped(tmp_path):
    a = np.random.default_rng(0).normal(size=(96, 96)).astype(np.float32)
    a[40:50, 70:80] = np.nan  # inside chunk (1, 2)
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0, epochs=1,
                          val_fraction=0)
    with pytest.warns(RuntimeWarning, match=r"chunk \(1, 2\) of numpy array: contains NaN"):
        p, _ = take(ds)
    assert np.isfinite(p).all() and len(p) > 0


def test_foreground_filter_std_and_mask(tmp_path):
    a = np.zeros((128, 128), dtype=np.float32)
    a[:, 64:] = np.random.default_rng(0).normal(size=(128, 64))
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0, min_std=0.5,
                          epochs=1, val_fraction=0)
    p, stats = take(ds)
    assert len(p) and (p.reshape(len(p), -1).std(axis=1) >= 0.5).all() and stats["rejected"] > 0
    mask = np.zeros((32, 32), dtype=bool)  # coarse mask (4x), right half foreground
    mask[:, 16:] = True
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0, mask=mask,
                          min_foreground=1.0, epochs=1, val_fraction=0)
    p, _ = take(ds)
    assert len(p) and (p != 0).all()


def test_all_background_is_an_error_not_a_hang(tmp_path):
    a = np.full((256, 256), 7.0, dtype=np.float32)
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0, min_std=0.1)
    with pytest.raises(N2VError, match="no foreground patch found"):
        take(ds, 10)
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0,
                          mask=np.zeros((256, 256), dtype=bool))
    with pytest.raises(N2VError, match="no foreground patch found|every block was skipped"):
        take(ds, 10)
    with pytest.raises(N2VError, match="all-background"):
        ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0,
                         min_std=0.1).validation_patches(4)


def sampler_measures(tmp_path, *only: str) -> set[str]:
    out, records = run_benchmark("sampler.py", "--smoke", "--workdir", str(tmp_path), "--only", *only)
    assert out.returncode == 0, out.stderr
    assert len(records) == len(out.stdout.splitlines())  # every line is a JSON record
    return {r["measure"] for r in records}


def test_benchmark_smoke_run(tmp_path):
    assert {"throughput_ratio", "starvation"} <= sampler_measures(tmp_path, "throughput", "starvation")


@pytest.mark.slow
def test_benchmark_smoke_run_memory(tmp_path):  # two child interpreters: slow on a loaded machine
    assert "memory_ratio" in sampler_measures(tmp_path, "memory")


def test_batches_prefetch_same_stream_and_errors_surface(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (96, 96), (32, 32))
    kw = dict(dims=("y", "x"), min_block_bytes=0, epochs=1)
    a = torch.cat(list(batches(ZarrPatchDataset(z, (16, 16), **kw), 50, prefetch=3)))
    b = torch.cat(list(batches(ZarrPatchDataset(z, (16, 16), **kw), 50, prefetch=0)))
    torch.testing.assert_close(a, b)
    ds = ZarrPatchDataset(z, (16, 16), **kw)
    assert sum(len(x) for x in batches(ds, 50)) == ds.state_dict()["patches_served"] == len(a)

    def broken():
        yield torch.zeros(1, 4, 4)
        raise N2VError("boom")

    with pytest.raises(N2VError, match="boom"):
        list(batches(broken(), 1))
    it = batches(ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0), 8)
    next(it)
    it.close()  # stops the drawing thread and the readers


def test_rank_from_torch_distributed(tmp_path, monkeypatch):
    z = coord_zarr(tmp_path / "a.zarr", (96, 96), (32, 32))
    ds = ZarrPatchDataset(z, (16, 16), dims=("y", "x"), min_block_bytes=0)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert ds._streams() == (2, 3)
    ds.rank, ds.world_size = 0, 4  # explicit values win
    assert ds._streams() == (0, 4)


def test_zarr_handed_over_by_open_image(tmp_path):
    z = coord_zarr(tmp_path / "a.zarr", (96, 96), (32, 32))
    x = open_image(str(tmp_path / "a.zarr"), chunks=(64, 64))  # dask chunks other than the store's
    ds = ZarrPatchDataset(x, (16, 16), min_block_bytes=0, epochs=1)
    assert type(ds._source).__name__ == "_ZarrSource" and ds._source.chunks[0][0] == 32  # store chunks
    check_patches_match(ds, take(ds, 100)[0], z[...])
    changed = ZarrPatchDataset(x + 0, (16, 16), min_block_bytes=0, epochs=1)  # no longer the stored values
    assert type(changed._source).__name__ == "_DaskSource"
    check_patches_match(changed, take(changed, 100)[0], z[...])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nan", [np.s_[:, :], np.s_[::32, ::32]])  # every pixel, or one NaN in every chunk
def test_no_usable_block_left_stops_instead_of_spinning(nan):
    """An endless stream whose every block is bad stopped never (issue 14, defect 12): now one clear error."""
    a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    a[nan] = np.nan
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(32, 32), min_block_bytes=0, val_fraction=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(N2VError, match=r"no training patches .*every block was skipped \(4 bad chunk\(s\), "
                                           r"e\.g\. chunk \(\d+, \d+\) contains NaN or Inf values\)"):
            take(ds, 10)


@pytest.mark.timeout(60)
def test_validation_blocks_all_bad_name_the_bad_chunks():
    a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    a[::8, ::8] = np.nan  # the one chunk, split into several blocks, holds every block and a NaN in each
    ds = ZarrPatchDataset(a, (16, 16), dims=("y", "x"), chunks=(64, 64), min_block_bytes=0,
                          val_fraction=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(N2VError, match=r"no validation patch .*bad chunk\(s\), e\.g\. chunk \(0, 0\) contains NaN"):
            ds.validation_patches(4)
