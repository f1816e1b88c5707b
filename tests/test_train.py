"""Training loop, checkpoints, resume, and bad model directories."""

import dataclasses
import io
import itertools
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.model.config import MaskConfig, ModelConfig, ON_RESUME, TrainConfig
from n2v_chunked.errors import ConfigError, N2VError, UnvalidatedModelError
from n2v_chunked.engine.inference import denoise
from n2v_chunked.training import loop as train_module
from n2v_chunked.cluster.progress import Progress
from n2v_chunked.training.loop import cosine_factor, divergence_cause, train
from n2v_chunked.training.validation import stalled


class RandomCrops:
    """A tiny seeded patch source with resumable state (stands in for the sampler)."""

    def __init__(self, image: np.ndarray, patch: int, batch: int, seed: int = 0, stop_after: int = 0):
        self.image, self.patch, self.batch, self.stop_after = image, patch, batch, stop_after
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        for served in itertools.count():
            if served == self.stop_after > 0:
                raise KeyboardInterrupt  # Ctrl-C in the middle of a run
            h, w = self.image.shape[-2:]
            ys = self.rng.integers(0, h - self.patch + 1, self.batch)
            xs = self.rng.integers(0, w - self.patch + 1, self.batch)
            yield np.stack([self.image[:, y : y + self.patch, x : x + self.patch] for y, x in zip(ys, xs)])

    def state_dict(self, patches_served=None):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def _noisy_image(seed=0, size=96):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = 100 + 50 * np.sin(yy / 6.0) * np.cos(xx / 9.0)
    return clean.astype(np.float32), (clean + rng.normal(0, 20, clean.shape)).astype(np.float32)


def _fit(tmp_path, steps, resume=False, source=None, name="m", **kw):
    clean, noisy = _noisy_image()
    img = noisy[None]
    source = source or RandomCrops(img, 32, 16, seed=1)
    val = np.stack([img[:, :32, :32], img[:, 64:, 64:]])
    cfg = TrainConfig(**{**dict(patch_size=[32, 32], batch_size=16, steps=steps, val_interval=5,
                                checkpoint_interval=5, precision="fp32"), **kw})
    return train(source, val, img.mean((1, 2)), img.std((1, 2)), tmp_path / name,
                 ModelConfig(features=8), MaskConfig(), cfg, resume=resume, sampler=source,
                 progress=False, device="cpu")


def test_training_learns_and_writes_a_model_dir(tmp_path):
    res = _fit(tmp_path, steps=60, lr=2e-3)
    d = tmp_path / "m"
    for name in (ckpt.CONFIG, ckpt.WEIGHTS_BEST, ckpt.WEIGHTS_LAST, ckpt.STATE):
        assert (d / name).is_file()
    meta = yaml.safe_load((d / ckpt.CONFIG).read_text())
    assert meta["model"]["features"] == 8 and len(meta["normalization"]["mean"]) == 1
    assert res.step == 60 and res.history[-1]["val_loss"] < res.history[0]["val_loss"] * 1.5
    clean, noisy = _noisy_image()
    trained = ckpt.load_model(d, device="cpu")
    out = denoise(trained, noisy[None, None])[0, 0]
    assert out.dtype == np.float32 and out.shape == noisy.shape
    # denoised in the input's units and closer to the truth than the noisy input
    assert np.mean((out - clean) ** 2) < 0.7 * np.mean((noisy - clean) ** 2)


@pytest.mark.parametrize("schedule,ema", [("plateau", 0.999), ("cosine", 0.999), ("plateau", 0.0)])
def test_resume_continues_exactly(tmp_path, schedule, ema):
    _fit(tmp_path, steps=10, name="straight", schedule=schedule, ema=ema)
    clean, noisy = _noisy_image()
    with pytest.raises(KeyboardInterrupt):  # interrupted after step 7; the checkpoint of step 5 is kept
        _fit(tmp_path, steps=10, name="split", schedule=schedule, ema=ema,
             source=RandomCrops(noisy[None], 32, 16, 1, 7))
    # a fresh source object: its state comes back from the checkpoint
    res = _fit(tmp_path, steps=10, name="split", resume=True, source=RandomCrops(noisy[None], 32, 16, seed=99))
    assert res.step == 10
    a = torch.load(tmp_path / "straight" / ckpt.WEIGHTS_LAST, weights_only=True)
    b = torch.load(tmp_path / "split" / ckpt.WEIGHTS_LAST, weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = ckpt.load_training_state(tmp_path / "straight")
    sb = ckpt.load_training_state(tmp_path / "split")
    assert sa["step"] == sb["step"] == 10
    assert sa["scheduler"] == sb["scheduler"]
    assert [h["lr"] for h in sa["history"]][-1] == [h["lr"] for h in sb["history"]][-1]


class _SignalledCrops(RandomCrops):
    """Sends this process SIGUSR1 (SLURM's time-limit warning) while serving the batch of step ``at``."""

    def __init__(self, *args, at: int, **kw):
        super().__init__(*args, **kw)
        self.at = at

    def __iter__(self):
        for served, batch in enumerate(super().__iter__(), start=1):
            if served == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch


def test_warning_signal_saves_the_current_step_and_resume_continues_exactly(tmp_path):
    """SIGUSR1: step 8 finishes, its state is saved (the last checkpoint was step 5), Preempted (exit 75)."""
    from n2v_chunked.errors import PREEMPTED_EXIT, Preempted

    _fit(tmp_path, steps=10, name="straight")
    clean, noisy = _noisy_image()
    with pytest.raises(Preempted, match="stopped at step 8 of 10 on SIGUSR1.*--resume") as info:
        _fit(tmp_path, steps=10, name="split", source=_SignalledCrops(noisy[None], 32, 16, seed=1, at=8))
    assert info.value.exit_code == PREEMPTED_EXIT == 75
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler lives only while training runs
    state = ckpt.load_training_state(tmp_path / "split")
    assert state["step"] == 8 and [h["step"] for h in state["history"]] == [5]  # no off-grid validation
    res = _fit(tmp_path, steps=10, name="split", resume=True, source=RandomCrops(noisy[None], 32, 16, seed=99))
    assert res.step == 10
    sa, sb = ckpt.load_training_state(tmp_path / "straight"), ckpt.load_training_state(tmp_path / "split")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert [(h["step"], h["val_loss"]) for h in sa["history"]] == [(h["step"], h["val_loss"]) for h in sb["history"]]


def test_ema_average_follows_its_decay_schedule():
    """The first update copies the network; then each update moves by 1 - min(cap, (1+n)/(10+n));
    batch-norm statistics are averaged too, the batch counter is copied."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    avg = train_module.ema_model(net, cap=0.5)
    avg.update_parameters(net)  # n = 0: a copy
    before = {k: v.clone() for k, v in avg.module.state_dict().items()}
    net(torch.randn(4, 1, 8, 8))  # moves the running statistics and the counter
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update_parameters(net)  # n = 1: decay min(0.5, 2/11)
    w = 1 - 2 / 11
    now, cur = avg.module.state_dict(), net.state_dict()
    for k in ("0.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(now[k], before[k] + w * (cur[k] - before[k]), atol=1e-6), k
    assert now["1.num_batches_tracked"] == cur["1.num_batches_tracked"] == 1
    for _ in range(100):  # late updates: the cap
        avg.update_parameters(net)
    snap = {k: v.clone() for k, v in avg.module.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(2.0)
    avg.update_parameters(net)
    assert torch.allclose(avg.module[0].weight, snap["0.weight"] + 0.5 * (net[0].weight - snap["0.weight"]))


@pytest.mark.parametrize("ema", [0.0, 0.999])
def test_saved_weights_are_the_average_only_with_ema(tmp_path, ema):
    _fit(tmp_path, steps=10, lr=2e-3, ema=ema)
    saved = torch.load(tmp_path / "m" / ckpt.WEIGHTS_LAST, weights_only=True)
    state = ckpt.load_training_state(tmp_path / "m")
    same = all(torch.equal(saved[k], state["model"][k]) for k in saved)
    assert same == (ema == 0) and (state["ema"] is None) == (ema == 0)
    assert ckpt.read_config(tmp_path / "m")["train"]["ema"] == ema


def test_cosine_schedule_warms_up_then_decays_to_the_budget():
    assert cosine_factor(0.0, 0.1) == 0.0 and cosine_factor(0.05, 0.1) == pytest.approx(0.5)
    assert cosine_factor(0.1, 0.1) == 1.0 and cosine_factor(0.55, 0.1) == pytest.approx(0.5)
    assert cosine_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12) and cosine_factor(0.0, 0.0) == 1.0
    after = [cosine_factor(p, 0.1) for p in np.linspace(0.1, 1.0, 50)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_cosine_training_ends_near_zero_rate(tmp_path):
    res = _fit(tmp_path, steps=20, lr=1e-3, schedule="cosine")
    lrs = [h["lr"] for h in res.history]  # validations at steps 5, 10, 15, 20
    assert lrs[0] < 1e-3 and lrs[-1] < 1e-5 and lrs[1] > lrs[2] > lrs[3]


@pytest.mark.parametrize("steps", [5, 15])
def test_blend_weight_from_noise_level_and_validation(tmp_path, steps):
    """The blend weight stored at training is close to the weight an oracle with clean data picks."""
    clean, noisy = _noisy_image(size=192)  # Gaussian noise, sigma 20
    img = noisy[None]
    rng = np.random.default_rng(5)
    val = np.stack([img[:, y : y + 32, x : x + 32] for y, x in rng.integers(0, 160, (128, 2))])
    cfg = TrainConfig(patch_size=[32, 32], batch_size=16, steps=steps, val_interval=5, precision="fp32", lr=2e-3)
    train(RandomCrops(img, 32, 16, seed=1), val, img.mean((1, 2)), img.std((1, 2)), tmp_path / "m",
          ModelConfig(features=8), MaskConfig(), cfg, progress=False, device="cpu")
    meta = ckpt.read_config(tmp_path / "m")
    assert meta["normalization"]["noise_std"][0] == pytest.approx(20.0, rel=0.05)
    assert meta["validation"]["last"]["step"] == steps
    trained = ckpt.load_model(tmp_path / "m", device="cpu", which="last")
    plain = denoise(trained, noisy[None, None])[0, 0]
    blend = denoise(trained, noisy[None, None], blend=True)[0, 0]
    oracle = np.sum((plain - noisy) * (clean - noisy)) / np.sum((plain - noisy) ** 2)  # least squares
    assert abs(float(trained.blend_weight[0]) - oracle) < 0.16
    assert np.mean((blend - clean) ** 2) < np.mean((plain - clean) ** 2)


@pytest.mark.parametrize("n2v2", [False, True])
def test_default_replacement_is_the_median(tmp_path, n2v2):
    _, noisy = _noisy_image()
    img = noisy[None]
    cfg = TrainConfig(patch_size=[32, 32], batch_size=4, steps=1, val_interval=1, precision="fp32")
    train(RandomCrops(img, 32, 4), np.stack([img[:, :32, :32]]), img.mean((1, 2)), img.std((1, 2)),
          tmp_path / "m", ModelConfig(features=4, n2v2=n2v2), None, cfg, progress=False, device="cpu")
    meta = yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())
    assert meta["mask"]["replacement"] == "median"


def test_stalled_counts_validations_since_the_best():
    h = [{"val_loss": v} for v in (5.0, 4.0, 4.5, 4.2, 4.1)]
    assert stalled(h, 3) and not stalled(h, 4) and not stalled(h, 0)
    assert not stalled(h[:3], 3)  # too few validations to judge
    assert not stalled(h + [{"val_loss": 3.9}], 3)


def test_early_stop_ends_a_stalled_run_and_keeps_the_best(tmp_path, caplog, monkeypatch):
    _, noisy = _noisy_image()
    img = noisy[None]
    # the untrained network's score first, then best at the 2nd validation, then worse
    losses = iter([2.0, 1.0, 0.5] + [0.6 + 0.01 * i for i in range(100)])
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: (next(losses), [0.5]))
    cfg = TrainConfig(patch_size=[32, 32], batch_size=4, steps=50, val_interval=2, precision="fp32",
                      stop_patience=3, checkpoint_interval=100)
    with caplog.at_level("INFO", logger="n2v_chunked"):
        res = train(RandomCrops(img, 32, 4), np.stack([img[:, :32, :32]]), img.mean((1, 2)), img.std((1, 2)),
                    tmp_path / "m", ModelConfig(features=4), None, cfg, progress=False, device="cpu")
    assert res.step == 10 and "early stop at step 10" in caplog.text  # validations at 2, 4 (best), 6, 8, 10
    assert (tmp_path / "m" / ckpt.WEIGHTS_BEST).exists() and ckpt.load_training_state(tmp_path / "m")["step"] == res.step
    off = dataclasses.replace(cfg, stop_patience=0, steps=12)
    res = train(RandomCrops(img, 32, 4), np.stack([img[:, :32, :32]]), img.mean((1, 2)), img.std((1, 2)),
                tmp_path / "m0", ModelConfig(features=4), None, off, progress=False, device="cpu")
    assert res.step == 12  # 0: the paper's fixed schedule


def test_refuses_to_overwrite_a_model_dir(tmp_path):
    _fit(tmp_path, steps=2)
    with pytest.raises(N2VError, match="already holds a model"):
        _fit(tmp_path, steps=2)


def test_patch_not_multiple_of_depth(tmp_path):
    with pytest.raises(N2VError, match="multiple of 2\\*\\*depth"):
        train(iter([]), np.zeros((1, 1, 30, 30), np.float32), np.zeros(1), np.ones(1), tmp_path / "x",
              ModelConfig(), train_cfg=TrainConfig(patch_size=[30, 30]), progress=False)


def test_nan_batch_is_one_clear_error(tmp_path):
    bad = np.full((4, 1, 32, 32), np.nan, np.float32)
    with pytest.raises(N2VError, match="NaN or Inf"):
        train(iter([bad]), np.zeros((1, 1, 32, 32), np.float32), np.zeros(1), np.ones(1), tmp_path / "x",
              ModelConfig(features=4), train_cfg=TrainConfig(patch_size=[32, 32], steps=1), progress=False)


def test_bad_model_dirs(tmp_path):
    with pytest.raises(N2VError, match="not found"):
        ckpt.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(N2VError, match="not a model directory"):
        ckpt.load_model(tmp_path / "empty")
    _fit(tmp_path, steps=5)
    d = tmp_path / "m"
    # truncated weights
    data = (d / ckpt.WEIGHTS_BEST).read_bytes()
    (d / ckpt.WEIGHTS_BEST).write_bytes(data[: len(data) // 3])
    with pytest.raises(N2VError, match="corrupt or truncated"):
        ckpt.load_model(d)
    # unknown config keys
    meta = yaml.safe_load((d / ckpt.CONFIG).read_text())
    meta["model"]["colour"] = "blue"
    (d / ckpt.CONFIG).write_text(yaml.safe_dump(meta))
    with pytest.raises(N2VError, match="unknown config key"):
        ckpt.load_model(d)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, steps=5)
    d = tmp_path / "m"
    with open(d / ckpt.WEIGHTS_BEST, "wb") as fh:
        pickle.dump({"w": _Exploit()}, fh)
    with pytest.raises(N2VError, match="refusing to load"):
        ckpt.load_model(d)
    assert not Path("pwned").exists()
    # a YAML tag that would build a Python object is refused by the safe loader too
    (d / ckpt.CONFIG).write_text("!!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(N2VError, match="corrupt"):
        ckpt.load_model(d)
    assert not Path("pwned").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


# -- issue 28: resume keeps one rule (item 5) ----------------------------------------------------------------------


def _early_stopped(tmp_path, monkeypatch):
    """A 2-step-validated run that early-stops at step 4 (its validation loss only worsens after step 2)."""
    losses = iter([2.0, 1.0] + [1.1 + 0.01 * i for i in range(100)])
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: (next(losses), [0.5]))
    res = _fit(tmp_path, steps=20, stop_patience=1, val_interval=2)
    assert res.step == 4
    return losses


def test_resume_applies_stop_patience_ema_and_lr_and_records_them(tmp_path, monkeypatch):
    _early_stopped(tmp_path, monkeypatch)
    res = _fit(tmp_path, steps=12, resume=True, stop_patience=0, ema=0.0, lr=1e-3, val_interval=2)
    assert res.step == 12  # no early stop any more (fit used to keep only steps, minutes and compile)
    meta = yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())
    assert (meta["train"]["stop_patience"], meta["train"]["ema"], meta["train"]["lr"]) == (0, 0.0, 1e-3)
    state = ckpt.load_training_state(tmp_path / "m")
    assert state["ema"] is None and state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    # a mapping sets a field back to its default, which a TrainConfig cannot tell from "not given"
    res = _fit_changes(tmp_path, {"steps": 14, "stop_patience": 10})
    assert res.step == 14 and yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())["train"]["stop_patience"] == 10


def _fit_changes(tmp_path, changes):
    _, noisy = _noisy_image()
    img = noisy[None]
    source = RandomCrops(img, 32, 16, seed=1)
    return train(source, np.stack([img[:, :32, :32]]), img.mean((1, 2)), img.std((1, 2)), tmp_path / "m",
                 ModelConfig(features=8), MaskConfig(), changes, resume=True, sampler=source, progress=False,
                 device="cpu")


@pytest.mark.parametrize("change, option", [({"batch_size": 8}, "--batch-size"), ({"seed": 3}, "--seed"),
                                            ({"schedule": "cosine"}, "--schedule"), ({"patch_size": [16, 16]}, "--patch")])
def test_resume_refuses_what_cannot_take_effect(tmp_path, monkeypatch, change, option):
    _early_stopped(tmp_path, monkeypatch)
    before = (tmp_path / "m" / ckpt.CONFIG).read_text()
    with pytest.raises(ConfigError, match=f"^{option} cannot change on --resume") as err:
        _fit_changes(tmp_path, change)
    assert "\n" not in str(err.value)
    assert (tmp_path / "m" / ckpt.CONFIG).read_text() == before  # nothing recorded


def test_every_training_setting_has_a_resume_rule():
    assert set(ON_RESUME) == {f.name for f in dataclasses.fields(TrainConfig)}


# -- issue 28: unvalidated weights (item 4), a model that has not learned (item 10) -------------------------------


def _killed_before_validation(tmp_path):
    _, noisy = _noisy_image()
    with pytest.raises(KeyboardInterrupt):  # killed while drawing step 1's batch: only step 0's checkpoint
        _fit(tmp_path, steps=10, source=RandomCrops(noisy[None], 32, 16, 1, stop_after=1))
    d = tmp_path / "m"
    assert (d / ckpt.WEIGHTS_LAST).is_file() and not (d / ckpt.WEIGHTS_BEST).exists()
    return d


def test_unvalidated_weights_are_refused_unless_allowed(tmp_path, caplog):
    from n2v_chunked.zoo.load import init_source

    d = _killed_before_validation(tmp_path)
    for use in (ckpt.check_trained, init_source):
        with pytest.raises(UnvalidatedModelError, match=r"stopped before the first validation \(last checkpoint: "
                           r"step 0\); continue it with 'n2v-chunked train INPUT --model-dir .* --resume'.*--allow-unvalidated"):
            use(d)
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        ckpt.check_trained(d, allow_unvalidated=True)
        init_source(d, allow_unvalidated=True)
    assert "unvalidated weights" in caplog.text


def test_a_model_that_has_not_learned_says_so_in_training_and_prediction(tmp_path, caplog):
    res = _fit(tmp_path, steps=3, val_interval=100)  # far fewer steps than one validation interval
    assert res.not_learned and "fewer than one validation interval (100)" in res.not_learned
    assert "--dims 2" in res.not_learned and "--minutes" in res.not_learned
    meta = yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())
    assert meta["not_learned"] == res.not_learned and meta["validation"]["initial"]["loss"] > 0
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        ckpt.check_trained(tmp_path / "m")  # what predict calls first
    assert "has likely not learned" in caplog.text
    # resumed to a model that learned, the verdict goes away
    res = _fit(tmp_path, steps=60, resume=True, val_interval=5, lr=2e-3)
    assert res.not_learned is None and "not_learned" not in yaml.safe_load((tmp_path / "m" / ckpt.CONFIG).read_text())


# -- issue 28: --minutes (item 10) and the first read of the loss (item 7) ------------------------------------------


def test_time_budget_stops_before_a_step_that_would_overrun(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(train_module, "_clock", lambda: now[0])
    _, noisy = _noisy_image()

    class SlowCrops(RandomCrops):  # each step takes 60 s of the fake clock
        def __iter__(self):
            for batch in super().__iter__():
                now[0] += 60.0
                yield batch

    res = _fit(tmp_path, steps=50, time_budget=120.0, source=SlowCrops(noisy[None], 32, 16, seed=1))
    assert res.step == 2 and res.seconds <= 120.0  # a third step would have ended at 180 s


def test_the_eta_honours_the_time_budget():
    clock = [0.0]
    out = io.StringIO()
    bar = Progress(2000, "train", "step", stream=out, tty=False, clock=lambda: clock[0], budget=120.0)
    bar.every, bar.kind = 1.0, "s"
    clock[0] = 60.0
    bar.update(1)
    assert "ETA 1m00s" in out.getvalue()  # not the 33h that 1999 more 60 s steps would take


def test_no_loss_is_shown_before_the_first_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("N2V_PROGRESS_INTERVAL", "1%")
    _, noisy = _noisy_image()
    img = noisy[None]
    cfg = TrainConfig(patch_size=[32, 32], batch_size=4, steps=3, val_interval=3, precision="fp32")
    train(RandomCrops(img, 32, 4), np.stack([img[:, :32, :32]]), img.mean((1, 2)), img.std((1, 2)),
          tmp_path / "m", ModelConfig(features=4), None, cfg, progress=True, device="cpu")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train:")]
    assert "loss -," in lines[0] and all("nan" not in line for line in lines), lines


def test_a_divergence_names_its_cause():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(precision="fp32")
    assert "the loss itself overflowed" in divergence_cause(model, torch.zeros(2, 2), cfg)
    assert "--precision fp32" in divergence_cause(model, torch.zeros(2, 2), TrainConfig(precision="bf16"))
    assert "std is tiny" in divergence_cause(model, torch.full((2, 2), 1e6), cfg)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert "weights became non-finite (weight" in divergence_cause(model, torch.zeros(2, 2), cfg)
