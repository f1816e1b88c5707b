"""Training killed with SIGKILL at random points resumes from an intact checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from n2v_chunked.model import checkpoint as ckpt


def _stack(path: Path) -> Path:
    rng = np.random.default_rng(0)
    z = zarr.create_array(str(path), shape=(6, 64, 64), chunks=(1, 32, 32), dtype="float32")
    z[:] = rng.normal(100, 10, (6, 64, 64)).astype(np.float32)
    return path


def _train_cmd(src: Path, model: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "n2v_chunked.cli", "train", str(src), "--axes", "tyx", "--model-dir", str(model),
           "--steps", str(steps), "--batch-size", "4", "--features", "4", "--patch", "32,32",
           "--val-interval", "1", "--checkpoint-interval", "1", "--no-progress", "--precision", "fp32",
           "--stop-patience", "0"]  # every step a validation: early stopping would end the run before ``steps``
    return cmd + (["--resume"] if resume else [])


def kill_and_resume(tmp_path: Path, seed: int, steps: int = 40) -> dict:
    """Start training, SIGKILL it at a random moment after the first checkpoint, resume to the end."""
    rnd = random.Random(seed)
    src = _stack(tmp_path / "in.zarr")
    model = tmp_path / f"model{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(src, model, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (model / ckpt.WEIGHTS_BEST).exists():  # the step-0 checkpoint is older: wait for step 1
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    time.sleep(rnd.uniform(0.0, 1.5))  # checkpoints are written every step: kills land mid-save too
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # whatever moment the kill hit, the latest checkpoint loads
    state = ckpt.load_training_state(model)
    killed_at = int(state["step"])
    weights = torch.load(model / ckpt.WEIGHTS_LAST, weights_only=True)
    assert set(weights) == set(state["model"])
    # the optimiser and scheduler state belong to the same step (none yet at the step-0 checkpoint)
    adam_steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert adam_steps == ({killed_at} if killed_at else set())
    res = subprocess.run(_train_cmd(src, model, steps, resume=True), env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    final = ckpt.load_training_state(model)
    assert final["step"] == steps
    assert {int(v["step"]) for v in final["optimizer"]["state"].values()} == {steps}
    assert not [p.name for p in model.iterdir() if p.name.endswith(".tmp")]  # cleaned on resume
    return {"killed_at": killed_at, "final_step": int(final["step"])}


@pytest.mark.parametrize("seed", [0, 1])
def test_training_survives_sigkill(tmp_path, seed):
    kill_and_resume(tmp_path, seed)


def test_second_training_on_the_same_model_dir_refuses(tmp_path):
    from n2v_chunked.io.lock import lock_path

    src = _stack(tmp_path / "in.zarr")
    model = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_train_cmd(src, model, 10_000), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (model / ckpt.STATE).exists():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        res = subprocess.run(_train_cmd(src, model, 20, resume=True), env=env, capture_output=True, text=True,
                             timeout=120)
        err = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(err) == 1, res.stderr
        assert f"{model} is being written by a training run (pid {first.pid} " in err[0]
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait()
    assert Path(lock_path(str(model))).exists()  # the killed run's lock ...
    res = subprocess.run(_train_cmd(src, model, 2, resume=True), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]  # ... is stale and taken over
    assert not Path(lock_path(str(model))).exists()


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the code under test catches it."""


def test_training_killed_before_its_first_checkpoint_restarts_or_resumes(tmp_path, monkeypatch):
    """A kill before any checkpoint leaves config.yaml alone; both ``train`` and ``train --resume`` then work."""
    import shutil

    from n2v_chunked.cli import commands as cli

    src = _stack(tmp_path / "in.zarr")
    model = tmp_path / "model"

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(ckpt, "save_weights", killed)  # the first checkpoint never lands
    with pytest.raises(_Killed):
        cli.main(_train_cmd(src, model, 6)[3:])
    monkeypatch.undo()
    assert (model / ckpt.CONFIG).exists() and ckpt.never_checkpointed(model)
    shutil.copytree(model, tmp_path / "again")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for where, resume, said in ((model, True, "starting at step 0 with its stored settings"),
                                (tmp_path / "again", False, "starting afresh")):
        res = subprocess.run(_train_cmd(src, where, 6, resume=resume), env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert said in res.stderr and "holds" in res.stderr
        assert ckpt.load_training_state(where)["step"] == 6 and (where / ckpt.WEIGHTS_BEST).exists()


@pytest.mark.parametrize("left", ["nothing", "an empty directory"])
def test_resume_with_nothing_to_resume_starts_a_new_model_in_one_line(tmp_path, capsys, left):
    """A job killed before its model directory (or anything in it) existed restarts with the same command."""
    from n2v_chunked import cli

    src, model = _stack(tmp_path / "in.zarr"), tmp_path / "model"
    if left == "an empty directory":
        model.mkdir()
    assert cli.main(_train_cmd(src, model, 2, resume=True)[3:]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "resume" in line]
    assert said == [f"n2v-chunked: warning: nothing to resume in {model} (no model there yet): starting a new model"]
    assert ckpt.load_training_state(model)["step"] == 2


def test_a_checkpoint_exists_from_step_0(tmp_path, monkeypatch):
    """Training writes its state before the first step, so a kill at any step leaves something to resume."""
    from n2v_chunked.training.fit import fit

    src = _stack(tmp_path / "in.zarr")
    saved = []
    real = ckpt.save_training_state
    monkeypatch.setattr(ckpt, "save_training_state", lambda d, state: saved.append(state["step"]) or real(d, state))
    from n2v_chunked.model.config import ModelConfig, TrainConfig

    fit(str(src), tmp_path / "m", axes="tyx", progress=False, model_cfg=ModelConfig(features=4),
        train_cfg=TrainConfig(steps=3, batch_size=4, patch_size=[32, 32], checkpoint_interval=200, val_interval=1))
    assert saved[0] == 0 and saved[-1] == 3


def test_a_training_run_whose_lock_is_taken_over_stops_at_its_next_checkpoint(tmp_path, monkeypatch):
    """Another run took the model directory's lock: this one stops instead of overwriting its checkpoints."""
    import json

    from n2v_chunked.model.config import ModelConfig, TrainConfig
    from n2v_chunked.errors import LockHeldError
    from n2v_chunked.training.fit import fit
    from n2v_chunked.io.lock import lock_path

    src = _stack(tmp_path / "in.zarr")
    model = tmp_path / "m"
    saved = []
    real = ckpt.save_training_state

    def save_then_lose_the_lock(d, state):
        saved.append(state["step"])
        real(d, state)
        if state["step"] == 2:  # as a second run taking over a lock it judged stale would leave it
            other = {"token": "another-run", "pid": 1, "host": "elsewhere", "what": "a training run"}
            Path(lock_path(str(model))).write_text(json.dumps(other))

    monkeypatch.setattr(ckpt, "save_training_state", save_then_lose_the_lock)
    with pytest.raises(LockHeldError, match="no longer owns"):
        fit(str(src), model, axes="tyx", progress=False, model_cfg=ModelConfig(features=4),
            train_cfg=TrainConfig(steps=8, batch_size=4, patch_size=[32, 32], checkpoint_interval=2, val_interval=1,
                                  stop_patience=0))
    assert saved == [0, 2]  # no checkpoint after the takeover
    assert json.loads(Path(lock_path(str(model))).read_text())["token"] == "another-run"  # its lock left alone
