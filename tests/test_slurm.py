"""Against a real single-node SLURM (cluster/slurm_local.sh, via the ``slurm`` fixture).

sbatch of a plain script, the two job templates, and ``cluster_client('slurm')``
whose dask workers are SLURM jobs.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import yaml

from n2v_chunked.cluster import cluster_client
from n2v_chunked.errors import N2VError

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


def _squeue_ids(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _wait_for_job(job_id: str, timeout: float = 60) -> tuple[str, str]:
    """Poll ``scontrol show job`` until the job ends; return (JobState, ExitCode)."""
    deadline = time.monotonic() + timeout
    state = exit_code = "?"
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        state, exit_code = fields.get("JobState", "?"), fields.get("ExitCode", "?")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            return state, exit_code
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
def test_sbatch_runs_a_script(slurm, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "hello.out"
    script = tmp_path / "hello.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=n2v-hello\n"
        f"#SBATCH --output={out}\n"
        "#SBATCH --cpus-per-task=1\n"
        "#SBATCH --mem=100M\n"
        "#SBATCH --time=00:01:00\n"
        'echo "hello from job $SLURM_JOB_ID on $(hostname -s)"\n'
    )
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert _wait_for_job(job_id) == ("COMPLETED", "0:0")
    assert out.read_text().strip() == f"hello from job {job_id} on {slurm.node}"


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
@pytest.mark.parametrize("template", ["predict.sbatch", "train.sbatch"])
def test_sbatch_accepts_job_templates(slurm, template: str) -> None:  # noqa: ANN001
    path = REPO / "cluster" / template
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    res = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr + res.stdout


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
def test_cluster_client_slurm_workers_are_jobs(slurm, jobqueue_yaml: Path) -> None:  # noqa: ANN001
    name = yaml.safe_load(jobqueue_yaml.read_text())["jobqueue"]["slurm"]["name"]
    x = np.random.default_rng(0).random((600, 400))
    d = da.from_array(x, chunks=(100, 100))
    expr = (d @ d.T).mean(axis=0) + d.std()
    expected = expr.compute(scheduler="sync")
    t0 = time.monotonic()
    with cluster_client("slurm", jobqueue_config=str(jobqueue_yaml), jobs=2, worker_timeout=60) as client:
        started = time.monotonic() - t0
        client.wait_for_workers(2, timeout=60)
        job_ids = sorted(str(j.job_id) for j in client.cluster.workers.values())
        assert sorted(_squeue_ids(name)) == job_ids
        got = client.compute(expr).result()
        # The work ran on both SLURM workers.
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert started < 60
    for _ in range(40):  # scancel is asynchronous
        if not _squeue_ids(name):
            break
        time.sleep(0.25)
    assert _squeue_ids(name) == [], "worker jobs left after the context closed"


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
def test_slurm_rejects_bad_partition_in_one_line(slurm, jobqueue_yaml: Path) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    with pytest.raises(N2VError, match="invalid partition") as info:
        with cluster_client(
            "slurm", jobqueue_config=jobqueue_yaml, jobqueue_overrides={"queue": "no-such-partition"}
        ):
            pass  # pragma: no cover
    assert "\n" not in str(info.value) and time.monotonic() - t0 < 20


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
def test_worker_job_that_dies_is_reported(slurm, jobqueue_yaml: Path) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    with pytest.raises(N2VError, match="ended before a worker joined.*no/such/python") as info:
        with cluster_client(
            "slurm", jobqueue_config=jobqueue_yaml, jobqueue_overrides={"python": "/no/such/python"}, worker_timeout=45
        ):
            pass  # pragma: no cover
    assert "\n" not in str(info.value) and time.monotonic() - t0 < 30


@pytest.mark.timeout(300)  # includes the session fixture (apt-get install on first use)
def test_worker_jobs_cancelled_on_interrupt(slurm, jobqueue_yaml: Path) -> None:  # noqa: ANN001
    name = yaml.safe_load(jobqueue_yaml.read_text())["jobqueue"]["slurm"]["name"]
    with pytest.raises(KeyboardInterrupt):
        with cluster_client("slurm", jobqueue_config=jobqueue_yaml, jobs=1, worker_timeout=45) as client:
            assert client.submit(lambda: 41 + 1).result() == 42
            assert len(_squeue_ids(name)) == 1
            raise KeyboardInterrupt
    for _ in range(40):
        if not _squeue_ids(name):
            break
        time.sleep(0.25)
    assert _squeue_ids(name) == [], "worker job left after Ctrl-C"
