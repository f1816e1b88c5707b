"""Chunked prediction: exactness vs whole-image prediction, writing, resume, batching,
the distributed path, the CLI's errors, and the benchmark's smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked import prediction as P
from n2v_chunked.cluster import scheduling
from n2v_chunked.cli import main
from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig
from n2v_chunked.errors import N2VError
from n2v_chunked.engine.inference import denoise
from n2v_chunked.training.masking import mask_batch, masked_mse
from n2v_chunked.model.unet import UNet
from n2v_chunked.io.ome import is_complete, write_ome_zarr
from n2v_chunked.prediction import blocks
from n2v_chunked.prediction.plan import batches

from helpers import make_model_dir, noisy, run_benchmark

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # of the data range, float32


# ----------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A 2D model trained for a few N2V steps by hand (blind-spot masking + masked MSE)."""
    d = tmp_path_factory.mktemp("trained")
    torch.manual_seed(1)
    cfg = ModelConfig(dims=2, depth=2, features=4)
    img = noisy((96, 96), seed=3)
    mean, std = np.array([img.mean()]), np.array([img.std()])
    net = UNet(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ys, xs = rng.integers(0, 64, 2), rng.integers(0, 64, 2)
        patches = np.stack([img[y : y + 32, x : x + 32] for y, x in zip(ys, xs)])[:, None]
        batch = mask_batch(torch.from_numpy((patches - mean[0]) / std[0]).float(), MaskConfig(), gen)
        loss = masked_mse(net(batch.inputs), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt.write_config(d, cfg, MaskConfig(), TrainConfig(), mean, std)
    ckpt.save_weights(d, net.eval(), ckpt.WEIGHTS_BEST)
    return d


def whole_image(model_dir, arr, dims, **kw):
    """``denoise`` of the whole array, in the array's own layout."""
    trained = ckpt.load_model(model_dir, "cpu")
    spatial = P.model_spatial_dims(trained)
    samples = [d for d in dims if d not in spatial and d != "c"]
    order = samples + (["c"] if "c" in dims else []) + list(spatial)
    x = xr.DataArray(arr, dims=tuple(dims)).transpose(*order).values
    x = x.reshape((-1,) + ((x.shape[len(samples)],) if "c" in dims else (1,)) + x.shape[-len(spatial) :])
    y = denoise(trained, x, **kw).reshape(xr.DataArray(arr, dims=tuple(dims)).transpose(*order).shape)
    return xr.DataArray(y, dims=tuple(order)).transpose(*dims).values


def chunked(model_dir, arr, dims, chunks, **kw):
    kw = {"runtime": "torch", "precision": "fp32", **kw}  # the engine of whole_image's denoise, unless named
    y = P.predict(xr.DataArray(arr, dims=tuple(dims)), None, model_dir, chunks=chunks, **kw)
    assert isinstance(y, xr.DataArray) and isinstance(y.data, da.Array)
    return y.data.compute(scheduler="sync")


def assert_close(a, b, arr):
    assert a.shape == b.shape and a.dtype == np.float32
    err = np.abs(a - b).max() / np.ptp(arr)
    assert err <= TOL, err


# ----------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------


def test_plan_halo_chunks_and_grid(tmp_path):
    trained = ckpt.load_model(make_model_dir(tmp_path / "m"), "cpu")
    x = xr.DataArray(da.zeros((3, 77, 131), chunks=(3, 77, 131)), dims=("t", "y", "x"))
    p = P.plan(trained, x, chunks=(1, 32, 48))
    assert p.halo == (0, 24, 24) and p.multiple == 4 and p.spatial == ("y", "x")
    assert p.chunks == (1, 32, 48)
    # a last block shorter than the halo joins the one before it: every block is whole output chunks
    assert p.grid == ((1, 1, 1), (32, 45), (48, 48, 35)) and p.rechunked
    # spatial sizes become multiples of 2**depth and at least the halo; one-per-spatial-axis form
    assert P.plan(trained, x, chunks=(30, 50)).chunks == (3, 32, 52)  # t: as many as fit
    assert P.plan(trained, x, chunks=(10, 500)).chunks == (3, 24, 131)
    # defaults (paper-size model): spatial multiples of 2**depth and of the stored chunk, all channels in one block
    trained = ckpt.load_model(make_model_dir(tmp_path / "m32", features=32), "cpu")
    xc = xr.DataArray(da.zeros((2, 1, 3000, 2500), chunks=(1, 1, 256, 256)), dims=("t", "c", "y", "x"))
    p = P.plan(trained, xc)
    assert p.chunks[1] == 1 and all(c % 4 == 0 and c % 256 == 0 for c in p.chunks[2:])
    # batches of at most N blocks cover the grid exactly once
    for n in (1, 5, 7, 10**6):
        sizes = [int(np.prod(np.subtract(hi, lo))) for lo, hi in batches(p.numblocks, n)]
        assert sum(sizes) == p.nblocks and max(sizes) <= n


def test_plan_rejects_models_that_do_not_fit(tmp_path):
    m3 = ckpt.load_model(make_model_dir(tmp_path / "m3", dims=3), "cpu")
    m2c = ckpt.load_model(make_model_dir(tmp_path / "m2c", channels=2), "cpu")
    yx = xr.DataArray(da.zeros((64, 64)), dims=("y", "x"))
    with pytest.raises(N2VError, match="3D"):
        P.plan(m3, yx)
    with pytest.raises(N2VError, match="2 channel"):
        P.plan(m2c, yx)
    with pytest.raises(N2VError, match="smaller than 2\\*\\*depth"):
        P.plan(m3, xr.DataArray(da.zeros((3, 64, 64)), dims=("z", "y", "x")))


# ----------------------------------------------------------------------------
# Chunked == whole image.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "boundary, n2v2",
    [("reflect", False), ("nearest", False), ("periodic", False), ("constant", False), ("reflect", True)],
)
def test_2d_odd_sizes_equal_whole_image(tmp_path, boundary, n2v2):
    md = make_model_dir(tmp_path / "m", n2v2=n2v2)
    arr = noisy((77, 131))
    got = chunked(md, arr, "yx", (32, 48), boundary=boundary)
    assert_close(got, whole_image(md, arr, "yx", boundary=boundary), arr)


def test_3d_equal_whole_image(tmp_path):
    arr = noisy((13, 45, 37), seed=1)
    # depth 1: halo 10, blocks of 10 (z is one block: 13 = 10 + a tail shorter than the halo)
    md = make_model_dir(tmp_path / "d1", dims=3, depth=1, features=2)
    got = chunked(md, arr, "zyx", (10, 10, 10))
    assert_close(got, whole_image(md, arr, "zyx"), arr)
    # depth 2, N2V2: every axis shorter than twice the halo (z even shorter than the halo)
    md = make_model_dir(tmp_path / "d2", dims=3, depth=2, n2v2=True, features=2)
    assert_close(chunked(md, arr, "zyx", (16, 24, 24)), whole_image(md, arr, "zyx"), arr)


def test_trained_model_interiors_and_borders(trained_dir):
    arr = noisy((2, 150, 131), seed=2)
    got = chunked(trained_dir, arr, "tyx", (1, 32, 48))
    ref = whole_image(trained_dir, arr, "tyx")
    assert_close(got, ref, arr)
    # the interior away from every border agrees as well as the borders
    assert np.abs(got - ref)[:, 40:-40, 40:-40].max() / np.ptp(arr) <= TOL
    assert np.abs(got - ref)[:, :24].max() / np.ptp(arr) <= TOL


def test_channels_and_2d_model_on_z_stack(tmp_path):
    md = make_model_dir(tmp_path / "c2", channels=2, n2v2=True)
    arr = noisy((2, 2, 50, 70))
    assert_close(chunked(md, arr, "tcyx", (1, 1, 24, 32)), whole_image(md, arr, "tcyx"), arr)
    md = make_model_dir(tmp_path / "z")
    arr = noisy((5, 40, 70)).astype(np.uint16)
    got = chunked(md, arr, "zyx", (2, 24, 32), boundary="constant")
    assert_close(got, whole_image(md, arr, "zyx", boundary="constant"), arr)


def test_tta_and_bf16(tmp_path):
    md = make_model_dir(tmp_path / "m")
    arr = noisy((48, 64))  # sizes multiples of 2**depth: the rotated pooling grids line up
    assert_close(chunked(md, arr, "yx", (24, 32), tta=True), whole_image(md, arr, "yx", tta=True), arr)
    got = chunked(md, arr, "yx", (24, 32), precision="bf16")
    assert np.abs(got - whole_image(md, arr, "yx")).max() / np.ptp(arr) < 0.05


def test_fp32_turns_off_tf32_convolutions_on_cuda_while_any_block_runs():
    """``precision="fp32"`` on CUDA: cuDNN in IEEE float32 (PyTorch's default is TF32), restored after the last user."""
    import threading

    from n2v_chunked.engine.inference import ieee_fp32

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    cuda = torch.device("cuda")  # only the flag is touched: no GPU needed
    inside, release = threading.Event(), threading.Event()

    def block():
        with ieee_fp32(cuda):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=block)
    t.start()
    inside.wait(10)
    with ieee_fp32(cuda):
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == "ieee"  # the other block is still running
    release.set()
    t.join()
    assert conv.fp32_precision == before
    with ieee_fp32(torch.device("cpu")):
        assert conv.fp32_precision == before


def test_blend_mixes_the_input_and_chunked_equals_whole_image(tmp_path):
    md = make_model_dir(tmp_path / "m", channels=2, blend=True)
    w = ckpt.load_model(md, "cpu").blend_weight
    assert np.allclose(w, [0.3, 0.5])
    arr = noisy((2, 2, 50, 70))
    got = chunked(md, arr, "tcyx", (1, 1, 24, 32), blend=True)
    assert_close(got, whole_image(md, arr, "tcyx", blend=True), arr)
    plain = whole_image(md, arr, "tcyx")
    mix = w[None, :, None, None] * plain + (1 - w[None, :, None, None]) * arr  # per channel, in input units
    assert_close(got, mix.astype(np.float32), arr)


@pytest.mark.parametrize("n2v2", [False, True])
def test_blend_warns_for_a_median_trained_model(tmp_path, caplog, n2v2):
    md = make_model_dir(tmp_path / "m", n2v2=n2v2, blend=True)  # n2v2 trains with median replacement
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        chunked(md, noisy((40, 48)), "yx", (24, 32), blend=True)
    assert ("median replacement" in caplog.text) is n2v2


# ----------------------------------------------------------------------------
# Writing, batching, resume.
# ----------------------------------------------------------------------------


def test_writes_ome_zarr_with_provenance(tmp_path):
    md = make_model_dir(tmp_path / "m")
    arr = noisy((2, 77, 131))
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(arr, dims=("t", "y", "x")), chunks=(1, 32, 64), progress=False)
    out = tmp_path / "out.ome.zarr"
    res = P.predict(str(src), str(out), md, chunks=(1, 32, 48), scheduler="sync", progress=False,
                    ngff_version="0.4", dtype="uint16")
    assert res.dtype == np.uint16 and res.dims == ("t", "y", "x")
    assert res.attrs["predict_stats"]["blocks_computed"] == res.attrs["predict_stats"]["blocks_total"] == 12
    ref = np.clip(np.rint(whole_image(md, arr, "tyx")), 0, 65535)
    assert np.abs(res.values.astype(np.float64) - ref).max() <= 1
    group = zarr.open_group(str(out), mode="r")
    meta = group.attrs["n2v_chunked"]
    assert meta["complete"] is True and is_complete(out)
    assert meta["model_id"] == ckpt.read_config(md)["model_id"] and meta["input"] == str(src)
    assert meta["parameters"]["chunks"] == [1, 32, 48] and meta["parameters"]["halo"] == [0, 24, 24]
    assert group["0"].chunks == (1, 32, 48) and group["0"].metadata.zarr_format == 2
    assert not (out / P.MARKER_DIR).exists()


def test_batches_give_the_same_output(tmp_path):
    md = make_model_dir(tmp_path / "m")
    arr = noisy((77, 131))
    kw = dict(chunks=(32, 48), scheduler="sync", progress=False, pyramid=False)
    a = P.predict(arr, str(tmp_path / "a.zarr"), md, **kw).values
    b = P.predict(arr, str(tmp_path / "b.zarr"), md, batch_blocks=1, **kw).values  # one block per graph
    assert np.array_equal(a, b)
    assert_close(a, whole_image(md, arr, "yx"), arr)


def _failing(arr, chunks, bad_block):
    """A lazy array whose block ``bad_block`` raises (a corrupt chunk, a dying disk)."""

    def read(block, block_info=None):
        if block_info[None]["chunk-location"] == bad_block:
            raise OSError("input/output error")
        return block

    return da.from_array(arr, chunks=chunks).map_blocks(read, dtype=arr.dtype)


def test_failure_stays_incomplete_then_resume_is_bit_identical(tmp_path):
    md = make_model_dir(tmp_path / "m", blend=True)
    arr = noisy((150, 131))
    kw = dict(chunks=(32, 48), scheduler="sync", progress=False)
    full = P.predict(arr, str(tmp_path / "full.zarr"), md, **kw).values

    out = tmp_path / "out.zarr"
    with pytest.raises(N2VError) as err:
        P.predict(_failing(arr, (32, 48), (3, 1)), str(out), md, **kw)
    msg = str(err.value)
    assert "\n" not in msg and "input/output error" in msg and "incomplete" in msg
    assert not is_complete(out)
    done = P.done_blocks(out)
    assert 0 < len(done) < 12
    # the markers do not confuse OME-Zarr readers of the unfinished output
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(out)))()))
    assert node.data[0].shape == arr.shape
    # lose one finished block's marker: it is recomputed
    lost = sorted(done)[0]
    (out / P.MARKER_DIR / "_".join(map(str, lost))).unlink()
    with pytest.raises(N2VError, match="other settings"):
        P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, resume=True, boundary="nearest", **kw)
    with pytest.raises(N2VError, match="other settings.*blend"):
        P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, resume=True, blend=True, **kw)
    res = P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, resume=True, **kw)
    stats = res.attrs["predict_stats"]
    assert stats["blocks_computed"] == 12 - len(done) + 1 and stats["blocks_skipped"] == len(done) - 1
    assert np.array_equal(res.values, full)
    assert is_complete(out) and not (out / P.MARKER_DIR).exists()
    again = P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, resume=True, **kw)  # nothing to do
    assert again.attrs["predict_stats"]["blocks_computed"] == 0


def test_resume_refuses_an_output_begun_with_other_weights_of_the_same_model(tmp_path):
    """Issue 28 item 3: retraining keeps the model's id; resuming must not mix old and new weights."""
    md = make_model_dir(tmp_path / "m", blend=True)  # with a validation record: the weights' step is known
    arr = noisy((150, 131))
    kw = dict(chunks=(32, 48), scheduler="sync", progress=False)
    out = tmp_path / "out.zarr"
    with pytest.raises(N2VError):
        P.predict(_failing(arr, (32, 48), (3, 1)), str(out), md, **kw)
    stored = zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]
    old = stored["weights"]["digest"]
    assert len(old) == 64 and stored["model_id"] == ckpt.load_model(md, "cpu").model_id
    trained = ckpt.load_model(md, "cpu")  # the same directory trained further: other weights, same model_id
    with torch.no_grad():
        for p_ in trained.model.parameters():
            p_.add_(0.01)
    ckpt.save_weights(md, trained.model, ckpt.WEIGHTS_BEST)
    new = ckpt.load_model(md, "cpu").contract.weights_digest
    assert new != old
    with pytest.raises(N2VError) as err:
        P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, resume=True, **kw)
    msg = str(err.value)
    assert "\n" not in msg and f"written with sha256 {old[:12]}, step 1" in msg and f"holds sha256 {new[:12]}" in msg
    assert "--overwrite" in msg and not is_complete(out)
    res = P.predict(da.from_array(arr, chunks=(32, 48)), str(out), md, overwrite=True, **kw)  # the way out
    assert zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]["weights"]["digest"] == new
    assert res.attrs["predict_stats"]["blocks_skipped"] == 0


def test_warning_signal_stops_with_status_75_and_resume_finishes_exactly(tmp_path, monkeypatch, caplog):
    """SIGUSR1 (SLURM's time-limit warning) after the 3rd block: exit 75, incomplete, 3 marked; resume equals."""
    import logging
    import signal

    from n2v_chunked.errors import PREEMPTED_EXIT, Preempted
    from n2v_chunked.prediction import run

    md = make_model_dir(tmp_path / "m")
    arr = noisy((150, 131))
    kw = dict(chunks=(32, 48), scheduler="sync", progress=False)
    full = P.predict(arr, str(tmp_path / "full.zarr"), md, **kw).values
    real, written = run.write_task, []

    def write_then_signal(block, block_info=None, **kwargs):  # map_blocks passes block_info by name
        res = real(block, block_info=block_info, **kwargs)
        written.append(1)
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return res

    monkeypatch.setattr(run, "write_task", write_then_signal)
    out = tmp_path / "out.zarr"
    caplog.set_level(logging.WARNING, logger="n2v_chunked")
    with pytest.raises(Preempted, match="stopped on SIGUSR1; .* stays marked incomplete, rerun with --resume") as info:
        P.predict(arr, str(out), md, resume=True, **kw)  # nothing there yet: --resume starts it
    assert info.value.exit_code == PREEMPTED_EXIT and "\n" not in str(info.value)
    assert [r.getMessage() for r in caplog.records if "nothing to resume" in r.getMessage()] == \
        [f"nothing to resume at {out} (no output there yet): starting it"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert not is_complete(out) and len(P.done_blocks(out)) == 3
    monkeypatch.undo()
    res = P.predict(arr, str(out), md, resume=True, **kw)
    assert res.attrs["predict_stats"]["blocks_computed"] == 12 - 3
    assert np.array_equal(res.values, full) and is_complete(out)


def test_distributed_local_cluster_writes_the_same(tmp_path, local_cluster):
    from distributed import Client

    md = make_model_dir(tmp_path / "m")
    arr = noisy((2, 77, 131))
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(arr, dims=("t", "y", "x")), chunks=(1, 64, 64), progress=False)
    kw = dict(chunks=(1, 32, 48), progress=False, batch_blocks=5)
    ref = P.predict(str(src), str(tmp_path / "sync.zarr"), md, scheduler="sync", **kw).values
    # join the running cluster by its address (the --scheduler tcp://... path)
    res = P.predict(str(src), str(tmp_path / "dist.zarr"), md, scheduler=local_cluster.scheduler_address, **kw)
    assert_close(res.values, ref, arr)
    assert is_complete(tmp_path / "dist.zarr")
    with Client(local_cluster) as client:
        # the model was loaded once per worker process, not shipped with the tasks
        loaded = client.run(lambda: sorted(k[0] for k in blocks._MODELS))
        assert all(v == [str(md.absolute())] for v in loaded.values())


def test_tasks_carry_the_model_path_not_the_model(tmp_path):
    import cloudpickle

    md = make_model_dir(tmp_path / "m", features=16)
    src = tmp_path / "in.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((77, 131)), dims=("y", "x")), progress=False)
    y = P.predict(str(src), None, md, chunks=(32, 48))
    blob = cloudpickle.dumps(dict(y.__dask_graph__()))
    weights = (md / ckpt.WEIGHTS_BEST).stat().st_size
    assert len(blob) < weights / 4 and b"torch." not in blob  # no module or tensor (the runtime's name is fine)
    assert P.get_model(md, P.model_token(md), "cpu") is P.get_model(md, P.model_token(md), "cpu")


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------


def _cli(capsys, *args):
    rc = main(["predict", *map(str, args), "--scheduler", "sync", "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture()
def cli_setup(tmp_path):
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((3, 40, 50)), dims=("t", "y", "x")), progress=False)
    return tmp_path, src, make_model_dir(tmp_path / "m")


def test_cli_predicts(cli_setup, capsys):
    tmp, src, md = cli_setup
    rc, err = _cli(capsys, src, tmp / "out.zarr", "--model-dir", md, "--chunks", "1,24,32", "--dtype", "float32")
    assert rc == 0, err
    got = zarr.open_array(str(tmp / "out.zarr" / "0"), mode="r")[:]
    # the CLI's defaults (runtime and precision auto) against the whole image with the same ones
    assert_close(got, whole_image(md, noisy((3, 40, 50)), "tyx", runtime="auto", precision="auto"), noisy((3, 40, 50)))
    assert is_complete(tmp / "out.zarr")


@pytest.mark.parametrize("case", ["channels", "dims", "small", "exists", "no-model", "no-blend"])
def test_cli_bad_input_is_one_line_before_any_output(cli_setup, capsys, case):
    tmp, src, md = cli_setup
    out = tmp / "out.zarr"
    extra = ["--blend"] if case == "no-blend" else []  # the model has no noise level recorded
    if case == "channels":
        md = make_model_dir(tmp / "m2", channels=2)
    elif case == "dims":
        md = make_model_dir(tmp / "m3", dims=3)
    elif case == "small":
        write_ome_zarr(src, xr.DataArray(noisy((3, 3, 50)), dims=("t", "y", "x")), progress=False, overwrite=True)
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no-model":
        md = tmp / "nowhere"
    rc, err = _cli(capsys, src, out, "--model-dir", md, *extra)
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("n2v-chunked: error: "), err
    expected = {"channels": "channel", "dims": "3D", "small": "smaller than 2**depth", "exists": "exists",
                "no-model": "model directory not found", "no-blend": "cannot blend: the model has no noise level"}[case]
    assert expected in err
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_cli_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "n2v_chunked.cli", "predict", "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and "example" in proc.stdout and "--resume" in proc.stdout


# ----------------------------------------------------------------------------
# Benchmark smoke run.
# ----------------------------------------------------------------------------


def _benchmark(*args):
    proc, records = run_benchmark("predict.py", "--quick", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return records


def test_benchmark_quick_efficiency():
    records = _benchmark("--skip-scale")
    ceiling = [r for r in records if r["measure"] == "ceiling"]
    pipes = [r for r in records if r["measure"] == "pipeline"]
    assert {r["config"] for r in ceiling} >= {"torch NCHW fp32", "torch channels-last bf16"}
    for r in ceiling:  # measured before and after the pipelines, averaged
        assert r["mpix_per_s"] == pytest.approx((r["mpix_per_s_before"] + r["mpix_per_s_after"]) / 2, abs=2e-4)
        assert r["mpix_per_s"] > 0 and r["cpu_s_per_mpix"] > 0
    assert [r["ceiling"] for r in pipes] == ["best", "best exact", "best torch"]
    # each pipeline is divided by the fastest ceiling row of its kind, measured in the same run
    best = {"best": ceiling, "best exact": [r for r in ceiling if r["exact"]],
            "best torch": [r for r in ceiling if r["runtime"].startswith("torch")]}
    for r in pipes:
        top = max(best[r["ceiling"]], key=lambda c: c["mpix_per_s"])
        assert (r["ceiling_config"], r["ceiling_mpix_per_s"]) == (top["config"], top["mpix_per_s"])
        assert r["mpix_per_s"] > 0 and r["ratio"] == pytest.approx(r["mpix_per_s"] / top["mpix_per_s"], abs=1e-3)
        # both printed rounded (ratio to 3 decimals, CPU s per MPix to 4): recomputed, it may differ by 5e-4
        assert r["cpu_ratio"] == pytest.approx(top["cpu_s_per_mpix"] / r["cpu_s_per_mpix"], abs=1e-3)
        assert r["warmup_seconds"] > 0 and r["blocks"] >= 1
    assert pipes[2]["used"].startswith("torch ") and pipes[1]["used"].endswith(" fp32")


@pytest.mark.slow
def test_benchmark_quick_scale():
    records = _benchmark("--skip-efficiency")
    small, large = (r for r in records if r["measure"] == "scale")
    ratio = next(r for r in records if r["measure"] == "scale_ratio")
    assert large["gb"] > small["gb"] and ratio["size_ratio"] == pytest.approx(large["gb"] / small["gb"], abs=0.01)
    assert ratio["time_per_pixel_ratio"] == pytest.approx(large["us_per_pixel"] / small["us_per_pixel"], rel=0.01)
    assert ratio["peak_rss_ratio"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"], rel=0.01)


def test_usable_cpus_honours_the_slurm_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    n = scheduling.usable_cpus()
    assert n == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert scheduling.usable_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(n + 8))  # never more than the mask allows
    assert scheduling.usable_cpus() == n


def test_gpu_layout_one_process_per_gpu_with_threads(monkeypatch):
    """A LocalCluster on a GPU machine: one worker process per GPU, the cores as its threads, one GPU each."""
    import types

    import distributed

    from n2v_chunked.engine.inference import device_lock

    monkeypatch.setattr(scheduling, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scheduling.local_layout(None) == (scheduling.LOCAL_WORKERS, 1)  # CPU: one single-threaded process per core
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert scheduling.local_layout(None) == (1, 16) and scheduling.local_layout("cuda") == (1, 16)
    assert scheduling.local_layout("cpu") == (scheduling.LOCAL_WORKERS, 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert scheduling.local_layout(None) == (2, 8) and scheduling.local_layout("cuda:1") == (1, 16)
    assert scheduling.worker_device(None) is None  # not in a dask worker
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name=3))
    assert scheduling.worker_device(None) == "cuda:1" and scheduling.worker_device("cuda:0") == "cuda:0"
    # threads sharing a GPU take turns on it; CPU threads do not wait for each other
    assert device_lock(torch.device("cuda:0")) is device_lock(torch.device("cuda:0"))
    assert device_lock(torch.device("cuda:0")) is not device_lock(torch.device("cuda:1"))
    with device_lock(torch.device("cpu")), device_lock(torch.device("cpu")):
        pass


# ----------------------------------------------------------------------------
# Input statistics vs the model's: the warning and --normalize data.
# ----------------------------------------------------------------------------


def _with_stats(src_dir, dst_dir, mean, std):
    """A copy of a model directory whose stored normalisation is ``mean``/``std``."""
    import shutil

    shutil.copytree(src_dir, dst_dir)
    meta = ckpt.read_config(dst_dir)
    meta["normalization"].update(mean=[float(v) for v in np.atleast_1d(mean)], std=[float(v) for v in np.atleast_1d(std)])
    ckpt.write_meta(dst_dir, meta)
    return dst_dir


def fluorescence(shape=(80, 96), seed=4):
    """The trained model's kind of noisy image, moved to a fluorescence-like range (about 104-375)."""
    img = noisy(shape, seed=seed)
    return (104 + (img - img.min()) * 271 / np.ptp(img)).astype(np.float32)


@pytest.fixture(scope="module")
def sem_dir(trained_dir, tmp_path_factory):
    """The trained model, as if trained on SEM data around 50,000."""
    return _with_stats(trained_dir, tmp_path_factory.mktemp("sem") / "m", 50_000.0, 4_000.0)


def test_warns_when_the_input_is_far_from_the_models_statistics(sem_dir, trained_dir, caplog):
    arr = fluorescence()
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        y = chunked(sem_dir, arr, "yx", (32, 48))
    far = [r for r in caplog.records if "far from the model's training data" in r.getMessage()]
    assert len(far) == 1 and "\n" not in far[0].getMessage()
    assert "--normalize data" in far[0].getMessage() and "model mean 5e+04 std 4000" in far[0].getMessage()
    assert abs(y.mean() - arr.mean()) > 10 * np.ptp(arr)  # what it is about: nonsense far outside the input's range
    caplog.clear()
    with caplog.at_level("WARNING", logger="n2v_chunked"):  # the model's own kind of data: no warning
        chunked(trained_dir, noisy((80, 96), seed=5), "yx", (32, 48))
    assert not [r for r in caplog.records if "far from the model" in r.getMessage()]


def test_normalize_data_is_in_the_input_range_and_chunked_equals_whole(sem_dir, tmp_path, caplog):
    from n2v_chunked.model.normalization import stats_numpy

    arr = fluorescence((77, 131))
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        y = chunked(sem_dir, arr, "yx", (32, 48), normalize="data")
    assert not [r for r in caplog.records if "far from the model" in r.getMessage()]
    margin = 0.1 * np.ptp(arr)
    assert arr.min() - margin <= y.min() and y.max() <= arr.max() + margin
    # one set of statistics for the whole image, not one per block: equal to the whole image
    # denoised by a model that stores the image's exact statistics
    ref_dir = _with_stats(sem_dir, tmp_path / "ref", *stats_numpy(arr))
    assert_close(y, whole_image(ref_dir, arr, "yx"), arr)
    assert_close(chunked(sem_dir, arr, "yx", (32, 48), normalize="data", boundary="constant"),
                 chunked(ref_dir, arr, "yx", (32, 48), boundary="constant"), arr)


def test_normalize_is_recorded_in_the_provenance_and_from_the_cli(sem_dir, tmp_path, capsys, caplog):
    src = tmp_path / "in.ome.zarr"
    arr = fluorescence((2, 40, 50))
    write_ome_zarr(src, xr.DataArray(arr, dims=("t", "y", "x")), progress=False)
    rc, err = _cli(capsys, src, tmp_path / "out.zarr", "--model-dir", sem_dir, "--normalize", "data")
    assert rc == 0, err
    meta = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["n2v_chunked"]
    rec = meta["normalization"]
    assert meta["parameters"]["normalize"] == rec["mode"] == "data"
    np.testing.assert_allclose(rec["mean"], [arr.mean()], rtol=1e-5)
    assert rec["input_mean"] == rec["mean"] and rec["model_mean"] == [50_000.0] and rec["model_std"] == [4_000.0]
    assert "far from the model" not in caplog.text
    rc, err = _cli(capsys, src, tmp_path / "out2.zarr", "--model-dir", sem_dir)
    assert rc == 0 and "far from the model's training data" in caplog.text
    rec = zarr.open_group(str(tmp_path / "out2.zarr"), mode="r").attrs["n2v_chunked"]["normalization"]
    assert rec["mode"] == "model" and rec["mean"] == [50_000.0] and rec["input_std"] is not None


@pytest.mark.parametrize("independent", [True, False])
def test_with_independent_channels_a_channel_does_not_depend_on_another(tmp_path, independent):
    """The default model (independent channels): changing channel 1 leaves channel 0's prediction as it was."""
    md = make_model_dir(tmp_path / "m", channels=2)
    if not independent:  # the joint network, for contrast: the same change reaches channel 0
        meta = ckpt.read_config(md)
        meta["model"]["independent_channels"] = False
        ckpt.write_meta(md, meta)
        torch.manual_seed(0)
        ckpt.save_weights(md, UNet(ModelConfig(dims=2, in_channels=2, features=4, independent_channels=False)),
                          ckpt.WEIGHTS_BEST)
    else:
        assert ckpt.read_config(md)["model"]["independent_channels"] is True  # the default
    arr = np.stack([noisy((40, 64), seed=1), noisy((40, 64), seed=2)])
    other = arr.copy()
    other[1] = noisy((40, 64), seed=9)[::-1] * 1.5
    a, b = (chunked(md, x, "cyx", (32, 32)) for x in (arr, other))
    assert np.abs(a[1] - b[1]).max() > 1e-2  # channel 1 itself did change
    if independent:
        np.testing.assert_array_equal(a[0], b[0])
    else:
        assert np.abs(a[0] - b[0]).max() > 1e-3
