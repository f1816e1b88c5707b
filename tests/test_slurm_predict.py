"""The job templates for real, on the single-node SLURM of ``cluster/slurm_local.sh``.

* ``sbatch cluster/predict.sbatch``: a scheduler job that submits its own dask
  worker job; its output must equal a local (``--scheduler sync``) prediction
  with the same model and chunks, be marked complete, and leave no worker job.
* ``predict(..., scheduler="slurm")`` from Python: the same.
* ``sbatch cluster/predict.sbatch`` with a bad model directory: the job fails
  with the status and the one-line error of ``n2v-chunked predict``.
* ``sbatch cluster/train.sbatch`` with ``NPROC=2`` (torchrun, DDP over gloo on
  the CPU): a model directory whose training state is at the requested step.

The node has 2 CPUs, so every job asks for 1 CPU (scheduler job + worker job
fill the node).  The jobs get a ``PATH`` without this virtual environment and
must activate it through ``N2V_PYTHON_ENV``.  Values with commas (``--chunks
1,48,48``, ``--patch 32,32``) go as arguments after the script name, because
``sbatch --export=`` splits on commas.  Skipped, with the reason, only where
the ``slurm`` fixture cannot install or start SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PREDICT_SBATCH = REPO / "cluster" / "predict.sbatch"
TRAIN_SBATCH = REPO / "cluster" / "train.sbatch"
VENV = Path(sys.prefix)  # the environment the jobs activate (N2V_PYTHON_ENV)

SHAPE, STORE_CHUNKS = (4, 96, 96), (1, 48, 48)
CHUNKS = "1,48,48"  # working/output chunks: 2x2 blocks per frame, so halos cross block borders
# Tiny, fast training; --patch has a comma, so it goes after the script name, not in EXTRA_ARGS.
TRAIN_ARGS = ["--axes", "tyx", "--steps", "2", "--batch-size", "4", "--features", "4", "--no-progress",
              "--device", "cpu", "--seed", "1"]
TRAIN_PATCH = ["--patch", "32,32"]
JOB_TIMEOUT = 240.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"(no log {path}: {exc.strerror})"


def _job_env() -> dict[str, str]:
    """The submitting environment without this venv on PATH: the job must activate it itself."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(VENV.resolve())]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    return env


def _submit(
    script: Path, cwd: Path, export: dict[str, str], sbatch_opts: list[str], args: list[str]
) -> tuple[str, Path]:
    """``sbatch`` a template as a user would; return (job id, its output file)."""
    log = cwd / f"{script.stem}-%j.out"
    export_opt = "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items())
    assert not any("," in v for v in export.values()), "sbatch --export splits values at commas"
    cmd = ["sbatch", "--parsable", f"--output={log}", "--time=00:05:00", *sbatch_opts, export_opt, str(script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd, env=_job_env())
    assert res.returncode == 0, f"sbatch {script.name} failed: {res.stderr.strip()}"
    job_id = res.stdout.strip().split(";")[0]
    return job_id, Path(str(log).replace("%j", job_id))


def _wait(
    job_id: str, log: Path, timeout: float = JOB_TIMEOUT, requeued: Callable[[str], None] | None = None
) -> tuple[str, str]:
    """Poll ``scontrol show job`` (no accounting here) until the job ends; return (JobState, ExitCode).

    ``requeued(job_id)`` is called each time the job is back in the queue after a requeue.
    """
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    restarts = 0
    while time.monotonic() < deadline:
        fields = _job_fields(job_id)
        if requeued is not None and fields.get("JobState") == "PENDING" and int(fields.get("Restarts", 0)) > restarts:
            restarts = int(fields["Restarts"])
            requeued(job_id)
        if fields.get("JobState") in FINAL_STATES:
            return fields["JobState"], fields.get("ExitCode", "?")
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=10)
    raise AssertionError(
        f"job {job_id} still {fields.get('JobState', '?')} ({fields.get('Reason', '?')}) after {timeout:g} s; "
        f"cancelled it. Log tail:\n{_tail(log)}"
    )


def _update(job_id: str, *settings: str) -> None:
    res = subprocess.run(["scontrol", "update", f"JobId={job_id}", *settings], capture_output=True, text=True,
                         timeout=10)
    assert res.returncode == 0, res.stderr


def _squeue_names(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _assert_no_jobs(name: str, timeout: float = 15.0) -> None:
    """Worker jobs named ``name`` are gone (scancel is asynchronous: poll a little)."""
    deadline = time.monotonic() + timeout
    while _squeue_names(name) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = _squeue_names(name)
    if left:
        subprocess.run(["scancel", "-n", name], capture_output=True, timeout=10)
    assert left == [], f"worker jobs left behind: {left}"


def _assert_same_output(got: Path, ref: Path) -> None:
    import zarr

    from n2v_chunked.io.ome import is_complete

    assert is_complete(got), f"{got} is not marked complete"
    a, b = zarr.open_group(str(got), mode="r"), zarr.open_group(str(ref), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys()), "other pyramid levels than the local run"
    for key in sorted(b.array_keys()):
        x, y = np.asarray(a[key][:]), np.asarray(b[key][:])
        assert x.shape == y.shape and x.dtype == y.dtype
        assert a[key].chunks == b[key].chunks
        # Same model, same blocks, same arithmetic: equal up to float rounding of
        # the worker's torch thread count (here it is in fact bit-identical).
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * float(np.ptp(y)), err_msg=f"level {key}")


# ----------------------------------------------------------------------------
# fixtures: one input, one model, one local reference for the module
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(slurm, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    return tmp_path_factory.mktemp("slurm_predict")


@pytest.fixture(scope="module")
def noisy(workdir: Path) -> Path:
    """A small noisy movie (t, y, x) as a plain Zarr array (axes given with --axes)."""
    import zarr

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    clean = 100 + 40 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    data = (clean[None] + rng.normal(0, 10, SHAPE)).astype(np.float32)
    path = workdir / "noisy.zarr"
    z = zarr.open_array(str(path), mode="w", shape=SHAPE, chunks=STORE_CHUNKS, dtype="float32")
    z[:] = data
    return path


@pytest.fixture(scope="module")
def model_dir(noisy: Path, workdir: Path) -> Path:
    """A tiny model trained in this process (one torch thread: the 2 cores are shared)."""
    import torch

    from n2v_chunked.cli import main

    d = workdir / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(noisy), "--model-dir", str(d), *TRAIN_ARGS, *TRAIN_PATCH]) == 0
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.fixture(scope="module")
def reference(noisy: Path, model_dir: Path, workdir: Path) -> Path:
    """The local prediction the SLURM runs must reproduce."""
    from n2v_chunked.cli import main
    from n2v_chunked.io.ome import is_complete

    out = workdir / "local.ome.zarr"
    rc = main(["predict", str(noisy), str(out), "--model-dir", str(model_dir), "--axes", "tyx",
               "--chunks", CHUNKS, "--scheduler", "sync", "--no-progress"])
    assert rc == 0 and is_complete(out)
    return out


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


@pytest.mark.timeout(400)  # includes the module fixtures (training, local reference)
def test_predict_sbatch_equals_local_run(
    slurm, noisy: Path, model_dir: Path, reference: Path, jobqueue_yaml: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    jq, name = jobqueue_yaml, yaml.safe_load(jobqueue_yaml.read_text())["jobqueue"]["slurm"]["name"]
    out = tmp_path / "slurm-job.ome.zarr"
    job_id, log = _submit(
        PREDICT_SBATCH, tmp_path,
        {"INPUT": str(noisy), "OUTPUT": str(out), "MODEL_DIR": str(model_dir), "JOBQUEUE_CONFIG": str(jq),
         "N2V_PYTHON_ENV": str(VENV), "EXTRA_ARGS": "--axes tyx --jobs 1 --no-progress"},
        ["--cpus-per-task=1", "--mem=1G"],  # the scheduler job: 1 of the node's 2 CPUs, the worker job the other
        ["--chunks", CHUNKS],
    )
    try:
        state, exit_code = _wait(job_id, log)
    finally:
        _assert_no_jobs(name)
    text = log.read_text(errors="replace")
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"predict.sbatch job {job_id}: {state} {exit_code}\n{_tail(log)}"
    assert "n2v-chunked predict exited with status 0" in text
    assert f"(worker jobs: {jq})" in text
    # The blocks were computed by a worker that ran as its own SLURM job.
    worker_logs = list((tmp_path / "worker-logs").glob(f"{name}-*.err"))
    assert len(worker_logs) == 1, f"expected one worker job log, found {worker_logs}"
    assert worker_logs[0].stem.rsplit("-", 1)[1] != job_id
    _assert_same_output(out, reference)


@pytest.mark.timeout(400)
def test_predict_api_slurm_equals_local_run(
    slurm, noisy: Path, model_dir: Path, reference: Path, jobqueue_yaml: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    from n2v_chunked.prediction import predict

    jq, name = jobqueue_yaml, yaml.safe_load(jobqueue_yaml.read_text())["jobqueue"]["slurm"]["name"]
    out = tmp_path / "slurm-api.ome.zarr"
    try:
        res = predict(str(noisy), str(out), str(model_dir), axes="tyx", chunks=(1, 48, 48), scheduler="slurm",
                      jobqueue_config=str(jq), jobs=1, progress=False, precision="auto", runtime="auto")  # the CLI's
    finally:
        _assert_no_jobs(name)
    assert res.attrs["predict_stats"]["blocks_computed"] == 4 * 2 * 2
    assert len(list((tmp_path / "worker-logs").glob(f"{name}-*.err"))) == 1
    _assert_same_output(out, reference)


@pytest.mark.timeout(400)
def test_predict_sbatch_failure_is_the_job_status(slurm, noisy: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """A user error fails the job with n2v-chunked's exit status and message; no worker job is queued."""
    out = tmp_path / "never.ome.zarr"
    job_id, log = _submit(
        PREDICT_SBATCH, tmp_path,
        {"INPUT": str(noisy), "OUTPUT": str(out), "MODEL_DIR": str(tmp_path / "no-such-model"),
         "N2V_PYTHON_ENV": str(VENV), "EXTRA_ARGS": "--axes tyx --no-progress"},
        ["--cpus-per-task=1", "--mem=1G"],
        [],
    )
    state, exit_code = _wait(job_id, log)
    text = log.read_text(errors="replace")
    assert (state, exit_code) == ("FAILED", "2:0"), f"{state} {exit_code}\n{_tail(log)}"
    assert "n2v-chunked: error:" in text and "no-such-model" in text, _tail(log)
    assert "n2v-chunked predict exited with status 2" in text
    assert not out.exists()


@pytest.mark.timeout(400)
def test_train_sbatch_two_processes(slurm, noisy: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """torchrun with 2 CPU processes (DDP over gloo) inside one SLURM job."""
    import torch

    from n2v_chunked.model import checkpoint as ckpt

    mdir = tmp_path / "model"
    job_id, log = _submit(
        TRAIN_SBATCH, tmp_path,
        {"INPUT": str(noisy), "MODEL_DIR": str(mdir), "NPROC": "2", "N2V_PYTHON_ENV": str(VENV),
         "EXTRA_ARGS": " ".join(TRAIN_ARGS)},
        # 1 CPU: the two processes share it (no cgroups on this node), so the job
        # starts even when another session's job holds the other CPU.
        ["--cpus-per-task=1", "--mem=3G"],
        TRAIN_PATCH,
    )
    state, exit_code = _wait(job_id, log)
    text = log.read_text(errors="replace")
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"train.sbatch job {job_id}: {state} {exit_code}\n{_tail(log)}"
    assert "2 process(es)" in text and "training exited with status 0" in text
    assert (mdir / ckpt.CONFIG).is_file()
    cfg = yaml.safe_load((mdir / ckpt.CONFIG).read_text())
    assert cfg["train"]["steps"] == 2 and cfg["train"]["patch_size"] == [32, 32]
    state_dict = ckpt.load_training_state(mdir)
    assert int(state_dict["step"]) == 2
    # The weights load and run.
    trained = ckpt.load_model(mdir, device="cpu")
    with torch.no_grad():
        y = trained.model(torch.zeros(1, 1, 32, 32))
    assert y.shape == (1, 1, 32, 32) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------
# restart: the warning signal before the time limit, requeue, resume
# ----------------------------------------------------------------------------


_PROBE = """
import json, sys
from n2v_chunked.model.config import ModelConfig, TrainConfig
from n2v_chunked.training.fit import fit
res = fit(sys.argv[1], sys.argv[2], axes="tyx", model_cfg=ModelConfig(features=4), device="cpu", progress=False,
          train_cfg=TrainConfig(steps=60, batch_size=4, patch_size=[32, 32], seed=1, stop_patience=0,
                                val_interval=20, val_patches=16))
print(json.dumps({h["step"]: h["seconds"] for h in res.history}))
"""


def _steps_per_second(noisy: Path, workdir: Path) -> float:
    """Steady training speed in the time-limit job's conditions: a fresh process with one thread (as the job).

    Measured between the validations at steps 20 and 60, so start-up and the
    first steps do not count; in a fresh process because inside pytest (other
    fixtures' threads, a warm heap) the same training ran 3x slower than in the
    job, so the job finished before the time limit's warning.
    """

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(noisy), str(workdir / "probe")], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    seconds = {int(k): v for k, v in __import__("json").loads(out.strip().splitlines()[-1]).items()}
    return 40 / (seconds[60] - seconds[20])


@pytest.mark.timeout(400)
def test_train_sbatch_time_limit_requeues_and_finishes_all_steps(slurm, noisy: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """A 1-minute time limit with the warning 15 s before it, and about 80 s of training.

    slurmctld looks at time limits every 30 s and sends the warning at the first
    look that is less than warning + 30 s before the limit: here 15-45 s into
    the job, mid-training.  The step in progress finishes, the training state
    is saved (exit 75), the job requeues itself, and the requeued job resumes
    to the last step with the validations of an uninterrupted run.  Once the
    training has stopped on the warning, the requeued job is given 5 minutes,
    so the test ends after that restart.
    """
    from n2v_chunked.model import checkpoint as ckpt

    every = max(5, int(_steps_per_second(noisy, tmp_path) * 80 / 4))
    steps = 4 * every  # validations at every, 2*every, ...: the grid an uninterrupted run validates on
    mdir = tmp_path / "model"
    args = ["--axes", "tyx", "--steps", str(steps), "--val-interval", str(every), "--stop-patience", "0",
            "--batch-size", "4", "--features", "4", "--no-progress", "--device", "cpu", "--seed", "1"]
    job_id, log = _submit(
        TRAIN_SBATCH, tmp_path,
        {"INPUT": str(noisy), "MODEL_DIR": str(mdir), "N2V_PYTHON_ENV": str(VENV), "EXTRA_ARGS": " ".join(args)},
        ["--cpus-per-task=1", "--mem=2G", "--time=1", "--signal=B:USR1@15"],
        TRAIN_PATCH,
    )
    fields = _job_fields(job_id)
    assert fields["TimeLimit"] == "00:01:00" and fields["Requeue"] == "1", fields

    def requeued(job: str) -> None:
        # a warning that came while Python was still starting killed it (nothing saved yet): another minute
        saved = "training exited with status 75" in log.read_text(errors="replace")
        if saved:
            _update(job, "TimeLimit=5")

    state, exit_code = _wait(job_id, log, requeued=requeued)
    text = log.read_text(errors="replace")  # --open-mode=append: every run
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"{state} {exit_code}\n{_tail(log, 30)}"
    assert int(_job_fields(job_id)["Restarts"]) >= 1, _tail(log, 30)
    stopped = [line for line in text.splitlines() if f" of {steps} on SIGUSR1;" in line]
    assert len(stopped) == 1 and "n2v-chunked: stopped at step" in stopped[0], _tail(log, 30)
    assert 0 < int(stopped[0].split("step ")[1].split()[0]) < steps
    assert "training exited with status 75" in text and f"requeueing job {job_id}" in text
    assert "nothing to resume" in text and "training exited with status 0" in text
    final = ckpt.load_training_state(mdir)
    assert final["step"] == steps
    assert [h["step"] for h in final["history"]] == [every, 2 * every, 3 * every, steps]  # nothing off the grid


@pytest.mark.timeout(400)  # includes the module fixtures (training)
def test_predict_sbatch_stopped_by_the_warning_signal_requeues_and_equals_local_run(
    slurm, noisy: Path, model_dir: Path, jobqueue_yaml: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    """The time-limit warning (sent here with ``scancel --signal=USR1 --batch``, as slurmctld sends it) after
    the first blocks: the job stops, cancels its worker job, requeues itself, and the requeued job finishes the
    output, equal to a local run."""
    from n2v_chunked.cli import main
    from n2v_chunked.prediction.writer import MARKER_DIR

    chunks = "1,32,32"  # 36 blocks (at least the halo, 24), one graph each (--batch-blocks 1): still running at the signal
    ref = tmp_path / "local.ome.zarr"
    assert main(["predict", str(noisy), str(ref), "--model-dir", str(model_dir), "--axes", "tyx", "--chunks", chunks,
                 "--scheduler", "sync", "--no-progress"]) == 0
    jq, name = jobqueue_yaml, yaml.safe_load(jobqueue_yaml.read_text())["jobqueue"]["slurm"]["name"]
    out = tmp_path / "slurm-job.ome.zarr"
    job_id, log = _submit(
        PREDICT_SBATCH, tmp_path,
        {"INPUT": str(noisy), "OUTPUT": str(out), "MODEL_DIR": str(model_dir), "JOBQUEUE_CONFIG": str(jq),
         "N2V_PYTHON_ENV": str(VENV), "EXTRA_ARGS": "--axes tyx --jobs 1 --no-progress --batch-blocks 1"},
        ["--cpus-per-task=1", "--mem=1G"],
        ["--chunks", chunks],
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (out / MARKER_DIR).is_dir() or len(list((out / MARKER_DIR).iterdir())) < 3:
            assert time.monotonic() < deadline and _job_fields(job_id).get("JobState") in ("PENDING", "RUNNING"), \
                _tail(log)
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=10)
        state, exit_code = _wait(job_id, log)  # requeued, it starts again after 10 s (slurm_local.sh)
    finally:
        _assert_no_jobs(name)
    text = log.read_text(errors="replace")
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"{state} {exit_code}\n{_tail(log, 30)}"
    assert _job_fields(job_id)["Restarts"] == "1", _tail(log, 30)
    assert f"n2v-chunked: stopped on SIGUSR1; {out} stays marked incomplete" in text, _tail(log, 30)
    assert "exited with status 75" in text and f"requeueing job {job_id}" in text
    done = [line for line in text.splitlines() if "block(s) computed" in line]
    assert len(done) == 1 and int(done[0].split(" skipped")[0].rsplit(" ", 1)[1]) >= 3, _tail(log, 30)
    _assert_same_output(out, ref)
