"""Cluster fixtures shared by the test modules.

``local_cluster``
    One :class:`distributed.LocalCluster` for the whole session: 2 worker
    processes x 1 thread.  Connect with ``Client(local_cluster)`` or pass
    ``local_cluster.scheduler_address`` to ``cluster_client``; do not close it.
``jobqueue_yaml``
    The packaged ``cluster/jobqueue.yaml`` shrunk to this node (1 core per
    worker job, workers on this venv's python) with a unique job name; its
    jobs are cancelled at teardown.
``slurm``
    The single-node SLURM cluster of ``cluster/slurm_local.sh`` (installed with
    apt-get when missing and possible), with ``SLURM_CONF`` exported for the
    session so that ``sbatch``/``squeue``/``SLURMCluster`` find it.  Skips only
    when SLURM cannot be installed or started here (set ``N2V_REQUIRE_SLURM=1``
    to turn a failed start into an error).
``s3``
    A real S3 server (moto's standalone server, IAM authentication on) on
    127.0.0.1 for the session, with users ``admin`` and ``reader`` (see
    ``tests/s3server.py``); skips when ``moto[server]`` is not installed.
``s3_env``
    ``s3`` with the admin's AWS environment (endpoint, keys, no ~/.aws files)
    exported for the test.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from n2v_chunked.io.lock import pid_running

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "cluster" / "slurm_local.sh"


@pytest.fixture(scope="session")
def local_cluster() -> Iterator["distributed.LocalCluster"]:  # noqa: F821
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        yield cluster
    finally:
        cluster.close()


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the running single-node cluster."""

    conf: Path  # its slurm.conf (exported as SLURM_CONF)
    state_dir: Path
    partition: str
    node: str
    script: Path  # cluster/slurm_local.sh


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    state = Path(os.environ.get("SLURM_STATE_DIR", "/tmp/n2v-slurm"))
    partition = os.environ.get("SLURM_PARTITION", "debug")
    env = dict(os.environ, SLURM_STATE_DIR=str(state), SLURM_PARTITION=partition)
    conf = state / "slurm.conf"
    # Several test sessions may share the cluster: each holds it with a pid file;
    # the last holder stops it, and only if a test session (not a person) started it.
    holders = state / "holders"
    started_marker = holders / ".started-by-tests"
    holders.mkdir(parents=True, exist_ok=True)
    me = holders / str(os.getpid())
    me.touch()  # before start: a session that ends meanwhile must not stop the cluster under us

    def release() -> None:
        me.unlink(missing_ok=True)
        others = [p for p in holders.iterdir() if p.name.isdigit() and pid_running(int(p.name))]
        if not others and started_marker.exists():
            started_marker.unlink(missing_ok=True)
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, text=True, env=env, timeout=120)

    try:
        res = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        release()
        pytest.skip("single-node SLURM: cluster/slurm_local.sh start did not finish within 900 s")
    tail = " | ".join((res.stderr + res.stdout).strip().splitlines()[-12:])
    if res.returncode != 0:
        release()
    if res.returncode == 3:
        pytest.skip(f"single-node SLURM unavailable here: {tail}")
    if res.returncode == 4:
        if os.environ.get("N2V_REQUIRE_SLURM") == "1":
            pytest.fail(f"single-node SLURM did not start: {tail}")
        pytest.skip(f"single-node SLURM daemons did not start on this machine: {tail}")
    if res.returncode != 0:
        pytest.fail(f"cluster/slurm_local.sh start failed (exit {res.returncode}): {tail}")
    if "already running" not in res.stderr:
        started_marker.touch()

    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    try:
        yield SlurmCluster(conf=conf, state_dir=state, partition=partition, node=node, script=SLURM_LOCAL)
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        release()


@pytest.fixture
def jobqueue_yaml(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Path]:
    import sys
    import uuid

    import yaml

    from n2v_chunked.cluster import DEFAULT_JOBQUEUE_CONFIG

    name = f"n2v-test-{uuid.uuid4().hex[:10]}"  # unique: other sessions may share the cluster
    data = yaml.safe_load(DEFAULT_JOBQUEUE_CONFIG.read_text())
    data["jobqueue"]["slurm"].update(
        {
            "name": name,
            "python": sys.executable,
            "cores": 1,
            "memory": "2GB",
            "processes": 1,
            "walltime": "00:10:00",
            "queue": slurm.partition,
            "log-directory": str(tmp_path / "worker-logs"),
            "local-directory": str(tmp_path / "worker-scratch"),
            "death-timeout": 30,
        }
    )
    path = tmp_path / "jobqueue.yaml"
    path.write_text(yaml.safe_dump(data))
    yield path
    subprocess.run(["scancel", "-n", name], capture_output=True, timeout=10)  # after a failure


@pytest.fixture(scope="session")
def s3() -> Iterator["s3server.Moto"]:  # noqa: F821
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    pytest.importorskip("obstore", reason="obstore is the s3 extra")
    from s3server import start_moto

    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch) -> "s3server.Moto":  # noqa: F821
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3
