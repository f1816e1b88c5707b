"""The GPU hand-off, tested on the CPU: copies outside the device lock, sync-free augmentation, a late loss, pinning.

Every path here is device-generic (or guarded by ``torch.cuda.is_available()``),
so it runs where CI runs: on a CPU.
"""

import threading

import numpy as np
import pytest
import torch
import yaml
from helpers import make_model_dir

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.engine import inference
from n2v_chunked.training import loop as train
from n2v_chunked.training.augment import _by_index, _by_mask, augment_batch
from n2v_chunked.cli import main
from n2v_chunked.errors import N2VError
from n2v_chunked.sampling.dataset import ZarrPatchDataset, batches
from n2v_chunked.engine.transfer import LateScalar, host_empty, pinned, to_host


def test_copies_to_the_device_run_outside_the_device_lock(tmp_path, monkeypatch):
    """While one block holds the GPU, the next block's input is already being copied (a fake slow network)."""
    trained = ckpt.load_model(make_model_dir(tmp_path / "m"), device="cpu")
    lock = threading.Lock()  # what a CUDA device gets; a CPU has none
    monkeypatch.setattr(inference, "device_lock", lambda device: lock)
    staged = threading.Event()
    computing = threading.Event()
    real_to_device = inference.to_device

    def to_device(x, device):
        if computing.is_set():  # the second block, while the first computes
            staged.set()
        return real_to_device(x, device)

    seen = []

    def slow_network(x):  # the first block holds the lock until the second block's copy has started
        if not computing.is_set():
            computing.set()
            seen.append(staged.wait(10))
        return x

    monkeypatch.setattr(inference, "to_device", to_device)
    monkeypatch.setattr(inference, "get_runner", lambda *a: slow_network)
    blocks = [np.full((1, 1, 16, 16), v, np.float32) for v in (1.0, 2.0)]
    out = [None, None]

    def predict(i):
        out[i] = inference.run_network(trained, blocks[i])

    first = threading.Thread(target=predict, args=(0,))
    first.start()
    assert computing.wait(10)
    predict(1)
    first.join(20)
    assert seen == [True], "the second block's copy waited for the first block's compute"
    for got, want in zip(out, blocks):  # each caller gets its own block back, whatever the order
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape, keep_axes", [((16, 2, 8, 8), False), ((16, 1, 8, 12), False),
                                               ((16, 1, 8, 8), True), ((16, 1, 4, 8, 8), False)])
def test_sync_free_augmentation_equals_the_indexed_one(shape, keep_axes, monkeypatch):
    """The GPU's way (every symmetry, kept where chosen) moves each patch exactly as the CPU's way."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    syms = range(0, 8, 1 if shape[-1] == shape[-2] and not keep_axes else 2)
    g = torch.Generator().manual_seed(2)
    k = torch.tensor(list(syms))[torch.randint(len(syms), (shape[0],), generator=g)]
    flip = torch.rand(shape[0], generator=g) < 0.5 if len(shape) == 5 else None
    want = _by_index(x, k, syms, flip)
    # and augment_batch on the CPU still draws and applies exactly that
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(2), keep_axes=keep_axes), want)

    def host_wait(*a, **kw):
        raise AssertionError("a host wait for the device")

    for name in ("nonzero", "item", "tolist", "__bool__", "__len__"):  # what makes a GPU's host wait
        monkeypatch.setattr(torch.Tensor, name, host_wait)
    assert torch.equal(_by_mask(x, k, syms, flip), want)


def test_late_scalar_returns_each_value_one_push_later():
    late = LateScalar()
    assert late.flush() is None
    assert late.push(1, torch.tensor(0.5)) is None
    assert late.push(2, torch.tensor(0.25)) == (1, 0.5)
    assert late.flush() == (2, 0.25)
    assert late.flush() is None


def test_divergence_names_its_step_although_the_loss_is_read_late(tmp_path, monkeypatch):
    from test_train import _fit

    real = train.masked_mse
    calls = []

    def diverging(pred, batch):
        calls.append(1)
        loss = real(pred, batch)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(train, "masked_mse", diverging)
    with pytest.raises(N2VError, match=r"training diverged at step 2 \(loss nan\)"):
        _fit(tmp_path, 4)
    assert ckpt.load_training_state(tmp_path / "m")["step"] == 0  # nothing diverged was saved


def test_pinning_is_guarded_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = host_empty((2, 3), pin=True)  # would raise without an accelerator if not guarded
    assert t.shape == (2, 3) and t.dtype == torch.float32 and not t.is_pinned()
    assert pinned(t, True) is t
    assert to_host(t, None) is not None


def test_sampler_batches_with_pin_are_the_same_batches():
    data = np.arange(2 * 64 * 64, dtype=np.float32).reshape(2, 64, 64)
    kw = dict(dims=("t", "y", "x"), chunks=(1, 32, 32), val_fraction=0.0, io_threads=0)
    plain = next(batches(ZarrPatchDataset(data, (16, 16), ("y", "x"), **kw), 8))
    pin = next(batches(ZarrPatchDataset(data, (16, 16), ("y", "x"), **kw), 8, pin=True))
    assert torch.equal(plain, pin) and pin.dtype == torch.float32


def test_compile_is_opt_in_from_the_command_line_to_the_loop(tmp_path, monkeypatch):
    from test_train_cli import FAST, _zarr_stack

    from n2v_chunked.cli.commands import build_parser

    src = _zarr_stack(tmp_path / "in.zarr")
    args = ["train", str(src), "--axes", "tyx", "--model-dir", str(tmp_path / "m"), "--patch", "32,32", *FAST,
            "--steps", "1"]
    assert build_parser().parse_args(args).compile is False  # off unless asked
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    assert main([*args, "--compile"]) == 0 and len(compiled) == 1
    assert yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())["train"]["compile"] is True


def test_torch_compile_is_an_opt_in_runtime_from_the_command_line(tmp_path, monkeypatch):
    import tifffile
    import zarr
    from helpers import noisy

    from n2v_chunked.engine import runtimes as R

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(kw) or net)
    monkeypatch.setattr(R, "_RUNNERS", {})
    assert R.resolve("torch-compile", "fp32", "cuda") == ("torch-compile", "fp32")  # a GPU runtime, as torch
    assert "compile" not in R.resolve("auto", "auto", "cpu")[0] + R.resolve("auto", "auto", "cuda")[0]
    md = make_model_dir(tmp_path / "m")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, noisy((40, 56)))
    base = ["predict", str(src), "--model", str(md), "--axes", "yx", "--scheduler", "sync", "--precision", "fp32",
            "--no-progress"]
    assert main([*base, str(tmp_path / "eager.ome.zarr"), "--runtime", "torch"]) == 0 and not compiled
    assert main([*base, str(tmp_path / "compiled.ome.zarr"), "--runtime", "torch-compile"]) == 0
    assert compiled == [{"dynamic": False}]
    out = zarr.open_group(str(tmp_path / "compiled.ome.zarr"), mode="r")
    assert out.attrs["n2v_chunked"]["parameters"]["runtime"] == "torch-compile"
    np.testing.assert_array_equal(out["0"][:], zarr.open_group(str(tmp_path / "eager.ome.zarr"), mode="r")["0"][:])
