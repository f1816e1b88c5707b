"""Cluster fixtures shared by the test modules.

``local_cluster``
    One :class:`distributed.LocalCluster` for the whole session: 2 worker
    processes x 1 thread.  Connect with ``Client(local_cluster)`` or pass
    ``local_cluster.scheduler_address`` to ``cluster_client``; do not close it.
``slurm``
    The single-node SLURM cluster of ``cluster/slurm_local.sh`` (installed with
    apt-get when missing and possible), with ``SLURM_CONF`` exported for the
    session so that ``sbatch``/``squeue``/``SLURMCluster`` find it.  Skips only
    when SLURM cannot be installed or started here (set ``N2V_REQUIRE_SLURM=1``
    to turn a failed start into an error).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        others = [p for p in holders.iterdir() if p.name.isdigit() and _pid_alive(int(p.name))]
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
