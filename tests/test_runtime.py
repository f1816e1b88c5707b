"""Runtimes and precisions: chunked == whole image in each, auto choices, provenance, fallbacks."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked import prediction as P
from n2v_chunked.engine import runtimes as R
from n2v_chunked.errors import N2VError
from n2v_chunked.engine.inference import denoise
from tests.helpers import make_model_dir, noisy
from tests.test_predict import TOL, chunked, whole_image

REPO = Path(__file__).resolve().parents[1]

COMBOS = [(rt, pr) for rt in ("torch", "openvino", "onnxruntime") for pr in R.SUPPORTED[rt] if pr != "fp16"]
# Tolerance: the float32 one of the other chunked == whole tests (1e-4 of the range), in every precision.
# A bf16 network could in principle differ between a block and the whole image (other tile shapes inside
# oneDNN/OpenVINO, other summation order, a bf16 rounding flipped); measured on these models and on the
# 32-feature one: 0 in bf16 (each output pixel's sums do not depend on the tiling), 5e-8 in fp32.


def _skip_missing(runtime):
    if not R.installed(runtime):
        pytest.skip(f"{runtime} not installed")


# (dims, model options, array shape, seed, working chunks): odd sizes; 2D at the paper's width (the
# runtimes' real kernels), 3D N2V2 with every axis shorter than twice the halo
CASES = {
    "2d": ("tyx", dict(features=32), (2, 77, 131), 0, (1, 32, 48)),
    "3d": ("zyx", dict(dims=3, depth=2, n2v2=True, features=2), (13, 45, 37), 1, (16, 24, 24)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("runtime, precision", COMBOS)
def test_chunked_equals_whole_in_every_runtime_and_precision(tmp_path, runtime, precision, case):
    _skip_missing(runtime)
    dims, model, shape, seed, chunks = CASES[case]
    md = make_model_dir(tmp_path / "m", **model)
    arr = noisy(shape, seed=seed)
    kw = dict(runtime=runtime, precision=precision)
    if not R.can_run(runtime, precision):  # e.g. OpenVINO bf16 on a CPU without it: refused, never run as fp32
        with pytest.raises(N2VError, match=f"cannot run precision {precision} on this CPU"):
            chunked(md, arr, dims, chunks, **kw)
        return
    got = chunked(md, arr, dims, chunks, **kw)
    err = np.abs(got - whole_image(md, arr, dims, **kw)).max() / np.ptp(arr)
    print(f"chunked vs whole {case} {runtime} {precision}: {err:.2e} of the range")
    assert err <= TOL
    if precision == "bf16":  # the option reached the network
        assert np.abs(got - whole_image(md, arr, dims, precision="fp32")).max() / np.ptp(arr) > 1e-6


@pytest.mark.parametrize("tta", [False, True])
def test_openvino_bf16_runs_at_its_fast_width_and_stays_exact(tmp_path, monkeypatch, tta):
    """OpenVINO bf16 gets the last axis padded to a multiple of 32 (both YX axes with TTA, whose
    rotations swap them); the padding at the end changes no kept pixel: chunked == whole image."""
    _skip_missing("openvino")
    import n2v_chunked.engine.inference as I

    # the padding is what is tested: on a CPU without bf16 OpenVINO runs it in f32, which pads alike
    monkeypatch.setattr(R, "openvino_precisions", lambda: ("fp32", "bf16", "fp16"))

    shapes = []

    def recording(*args):
        runner = R.get_runner(*args)

        def run(x):
            shapes.append(tuple(x.shape[2:]))
            return runner(x)

        run.width_multiple = runner.width_multiple
        return run

    monkeypatch.setattr(I, "get_runner", recording)
    md = make_model_dir(tmp_path / "m", features=8)
    trained = ckpt.load_model(md, "cpu")
    arr = noisy((1, 41, 45), seed=2)
    kw = dict(runtime="openvino", precision="bf16", tta=tta)
    whole = whole_image(md, arr, "tyx", **kw)
    h = trained.contract.halo[0]
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    assert set(shapes) == {(up(41 + 2 * h, 32 if tta else 4), up(45 + 2 * h, 32))}
    assert np.abs(chunked(md, arr, "tyx", (1, 16, 20), **kw) - whole).max() / np.ptp(arr) <= TOL


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_fp32_runtimes_match_torch_and_tta_blend_work(tmp_path, runtime):
    """The exported network computes what torch computes; TTA and blending wrap any runtime."""
    _skip_missing(runtime)
    md = make_model_dir(tmp_path / "m", features=8, blend=True)
    trained = ckpt.load_model(md, "cpu")
    x = noisy((1, 1, 45, 61))
    for kw in ({}, {"tta": True}, {"blend": True}):
        ref = denoise(trained, x, precision="fp32", runtime="torch", **kw)
        got = denoise(trained, x, precision="fp32", runtime=runtime, **kw)
        assert np.abs(got - ref).max() / np.ptp(x) <= TOL, kw
    tta = denoise(trained, x, precision="fp32", runtime=runtime, tta=True)
    assert np.abs(tta - denoise(trained, x, precision="fp32", runtime=runtime)).max() > 1e-3  # TTA did something


def test_bf16_is_close_to_fp32(tmp_path):
    md = make_model_dir(tmp_path / "m", features=8)
    trained = ckpt.load_model(md, "cpu")
    x = noisy((1, 1, 64, 64))
    ref = denoise(trained, x, precision="fp32", runtime="torch")
    for runtime in [rt for rt in ("torch", "openvino") if R.installed(rt) and R.can_run(rt, "bf16")]:
        got = denoise(trained, x, precision="bf16", runtime=runtime)
        assert 0 < np.abs(got - ref).max() / np.ptp(x) < 0.05, runtime


def test_resolve_auto(monkeypatch):
    monkeypatch.setattr(R, "installed", lambda rt: rt in ("torch", "openvino", "onnxruntime"))
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(R, "openvino_precisions", lambda: ("fp32", "bf16", "fp16"))
    assert R.resolve("auto", "auto", "cpu") == ("openvino", "bf16")
    assert R.resolve("auto", "fp32", "cpu") == ("openvino", "fp32")
    assert R.resolve("torch", "auto", "cpu") == ("torch", "bf16")
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: False)
    assert R.resolve("auto", "auto", "cpu") == ("openvino", "fp32")
    monkeypatch.setattr(R, "installed", lambda rt: rt in ("torch", "onnxruntime"))
    assert R.resolve("auto", "auto", "cpu") == ("onnxruntime", "fp32")
    assert R.resolve("auto", "bf16", "cpu") == ("torch", "bf16")  # ONNX Runtime has no bf16
    monkeypatch.setattr(R, "installed", lambda rt: rt == "torch")
    assert R.resolve("auto", "auto", "cpu") == ("torch", "fp32")


def test_openvino_without_native_bf16_is_never_asked_for_it(monkeypatch):
    """OpenVINO's CPU plugin runs a bf16 hint as f32 where the CPU lacks bf16: auto avoids it, a named one is refused."""
    monkeypatch.setattr(R, "installed", lambda rt: rt in ("torch", "openvino"))
    monkeypatch.setattr(R, "openvino_precisions", lambda: ("fp32",))
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: False)
    assert R.resolve("auto", "auto", "cpu") == ("openvino", "fp32")
    assert R.resolve("auto", "bf16", "cpu") == ("torch", "bf16")  # torch emulates it: the option takes effect
    with pytest.raises(N2VError, match=r"^runtime openvino cannot run precision bf16 on this CPU .*--runtime torch"):
        R.resolve("openvino", "bf16", "cpu")


def test_named_runtime_not_installed_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(R, "installed", lambda rt: rt == "torch")
    monkeypatch.setattr(R, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="n2v_chunked.engine.runtimes"):
        assert R.resolve("openvino", "fp32", "cpu") == ("torch", "fp32")
        assert R.resolve("openvino", "fp32", "cpu") == ("torch", "fp32")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "openvino" in caplog.text


def test_impossible_combinations_are_one_line(monkeypatch):
    with pytest.raises(N2VError, match="cannot run precision bf16"):
        R.resolve("onnxruntime", "bf16", "cpu")
    with pytest.raises(N2VError, match="unknown runtime"):
        R.resolve("tensorrt", "fp32", "cpu")
    with pytest.raises(N2VError, match="CPU only"):
        R.resolve("openvino", "fp32", "cuda")


def test_a_runtime_that_cannot_load_the_network_is_one_line(monkeypatch):
    def broken(model, contract=None):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(R, "export_onnx", broken)
    monkeypatch.setattr(R, "_RUNNERS", {})
    net = torch.nn.Conv2d(1, 1, 3)
    with pytest.raises(N2VError, match=r"runtime onnxruntime could not load the network \(exporter exploded\)"):
        R.get_runner(net, torch.device("cpu"), "onnxruntime", "fp32")


def test_runner_threads_follow_the_worker_share(monkeypatch):
    """One compiled model per thread count: dask threads x runtime threads never exceed the cores."""
    _skip_missing("onnxruntime")
    seen = []
    monkeypatch.setattr(R, "_onnxruntime_runner", lambda onnx, threads: seen.append(threads) or (lambda x: x))
    monkeypatch.setattr(R, "_RUNNERS", {})
    net = torch.nn.Conv2d(1, 1, 3)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            R.get_runner(net, torch.device("cpu"), "onnxruntime", "fp32")
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 1]


PINNING_PROBE = """
import os, sys, threading, time, torch
torch.set_num_threads(1)  # a single-threaded dask worker process
from n2v_chunked.model.config import ModelConfig
from n2v_chunked.model.unet import UNet
from n2v_chunked.engine.runtimes import get_runner
run = get_runner(UNet(ModelConfig(dims=2, depth=1, features=4)).eval(), torch.device("cpu"), "openvino", "fp32")
allowed, seen, done = os.sched_getaffinity(0), set(), threading.Event()
def infer():
    while not done.is_set():
        run(torch.randn(1, 1, 256, 256))
worker = threading.Thread(target=infer)
worker.start()
end = time.monotonic() + 2
while time.monotonic() < end:  # the affinity of every thread while inference runs
    for tid in os.listdir("/proc/self/task"):
        try:
            seen.add(len(os.sched_getaffinity(int(tid))))
        except OSError:
            pass  # a thread that ended
done.set()
worker.join()
print(len(allowed), min(seen))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to pin away from")
def test_openvino_threads_are_not_pinned_to_one_core():
    """Single-threaded worker processes would all be pinned to the same first core (they ran at half speed)."""
    _skip_missing("openvino")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", PINNING_PROBE], capture_output=True, text=True, env=env, timeout=300)
    allowed, narrowest = map(int, out.stdout.split())
    assert narrowest == allowed, "an OpenVINO thread was pinned to fewer cores than the process may use"


def test_provenance_and_summary_record_the_runtime(tmp_path, monkeypatch):
    md = make_model_dir(tmp_path / "m")
    arr = noisy((40, 56))
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, arr)
    out = tmp_path / "out.ome.zarr"
    monkeypatch.setattr(R, "cpu_has_bf16", lambda: False)
    res = P.predict(str(src), str(out), md, scheduler="sync", progress=False, runtime="auto", precision="auto",
                    axes="yx")
    want_rt, want_pr = R.resolve("auto", "auto", "cpu")
    meta = zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]
    assert meta["parameters"]["runtime"] == want_rt and meta["parameters"]["precision"] == want_pr == "fp32"
    assert meta["engine"].startswith(want_rt)
    assert res.attrs["predict_stats"]["runtime"] == f"{want_rt} {want_pr}"


def test_an_output_started_before_runtimes_resumes_with_torch(tmp_path):
    md = make_model_dir(tmp_path / "m")
    arr = noisy((40, 56))
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, arr)
    out = tmp_path / "out.ome.zarr"
    kw = dict(scheduler="sync", progress=False, axes="yx", precision="fp32", chunks=(24, 32))
    P.predict(str(src), str(out), md, runtime="torch", **kw)
    group = zarr.open_group(str(out), mode="r+")
    meta = dict(group.attrs["n2v_chunked"])
    del meta["parameters"]["runtime"]  # as written by the version before runtime.py
    group.attrs["n2v_chunked"] = {**meta, "complete": False}
    with pytest.raises(N2VError, match="runtime: 'torch' -> 'onnxruntime'"):
        P.predict(str(src), str(out), md, runtime="onnxruntime", resume=True, **kw)
    P.predict(str(src), str(out), md, runtime="torch", resume=True, **kw)
    assert zarr.open_group(str(out), mode="r").attrs["n2v_chunked"]["complete"] is True


# A fresh process whose first OpenVINO inferences start in several threads at once (as dask's do).
_FIRST_USE_IN_THREADS = """
import threading, torch
from n2v_chunked.engine import runtimes
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 3, padding=1)).eval()
run = runtimes.get_runner(net, torch.device("cpu"), "openvino", "fp32")
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    run(torch.zeros(1, 1, 16, 16))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ok")
"""


@pytest.mark.skipif(not R.installed("openvino"), reason="OpenVINO not installed")
def test_openvino_first_inferences_in_many_threads_do_not_deadlock():
    """OpenVINO's bindings deadlocked when threads made their first numpy view of a tensor at once (seen as a
    prediction that hung with no CPU use; before the fix 4 of 8 fresh processes hung): two fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE_IN_THREADS], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("a process whose threads started OpenVINO inferences at once hung")
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
