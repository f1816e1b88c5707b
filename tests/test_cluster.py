"""cluster_client: local cluster, existing scheduler, teardown, jobqueue config checks.

The SLURM path against a real (single-node) SLURM is in test_slurm.py.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import yaml

from n2v_chunked.cluster import DEFAULT_JOBQUEUE_CONFIG, cluster_client, read_jobqueue_config, slurm as cluster_mod
from n2v_chunked.errors import N2VError

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _array() -> tuple[da.Array, np.ndarray]:
    x = np.arange(64 * 48, dtype="float64").reshape(64, 48)
    return da.from_array(x, chunks=(16, 16)), x


# ----------------------------------------------------------------------------
# local cluster and existing schedulers
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_local_cluster_computes_and_logs_dashboard(caplog: pytest.LogCaptureFixture) -> None:
    d, x = _array()
    with caplog.at_level(logging.INFO, logger="n2v_chunked.announce"):
        with cluster_client("local", n_workers=2, threads_per_worker=1) as client:
            cluster = client.cluster
            assert len(client.scheduler_info()["workers"]) == 2
            got = client.compute((d * 2 + 1).sum(axis=0)).result()
    np.testing.assert_allclose(got, (x * 2 + 1).sum(axis=0))
    assert cluster.status.name == "closed"
    assert any("dask dashboard: http" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["tcp://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_unreachable_address_fails_fast(form: str) -> None:
    address = form.format(port=_free_port())
    t0 = time.monotonic()
    with pytest.raises(N2VError) as info:
        with cluster_client(address, connect_timeout=2):
            pass  # pragma: no cover
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert address.split("://")[-1] in msg and "\n" not in msg
    assert elapsed < 15, elapsed


def test_unknown_scheduler_name() -> None:
    with pytest.raises(N2VError, match="unknown scheduler 'pbs'"):
        with cluster_client("pbs"):
            pass  # pragma: no cover


@pytest.mark.timeout(60)
def test_existing_scheduler_is_used_and_left_running(local_cluster) -> None:  # noqa: ANN001
    d, x = _array()
    with cluster_client(local_cluster.scheduler_address) as client:
        assert client.scheduler.address == local_cluster.scheduler_address
        np.testing.assert_allclose(client.compute(d.sum()).result(), x.sum())
    assert local_cluster.status.name == "running"
    assert len(local_cluster.scheduler_info["workers"]) == 2


@pytest.mark.timeout(60)
def test_scheduler_file(local_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    f = tmp_path / "scheduler.json"
    f.write_text(json.dumps({"address": local_cluster.scheduler_address}))
    with cluster_client(str(f)) as client:
        assert client.submit(sum, [1, 2, 3]).result() == 6
    with pytest.raises(N2VError, match="no such file"):
        with cluster_client(str(tmp_path / "missing.json")):
            pass  # pragma: no cover


# ----------------------------------------------------------------------------
# teardown
# ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_cluster_closed_on_error_and_interrupt(exc_type: type[BaseException]) -> None:
    seen = {}
    with pytest.raises(exc_type):
        with cluster_client("local", n_workers=1, threads_per_worker=1) as client:
            seen["cluster"] = client.cluster
            seen["client"] = client
            assert client.submit(lambda: 1).result() == 1
            raise exc_type("boom")
    assert seen["cluster"].status.name == "closed"
    assert seen["client"].status == "closed"


def test_bad_local_worker_counts() -> None:
    with pytest.raises(N2VError, match="n_workers"):
        with cluster_client("local", n_workers=0):
            pass  # pragma: no cover


# ----------------------------------------------------------------------------
# jobqueue.yaml
# ----------------------------------------------------------------------------


def test_cluster_jobqueue_yaml_is_the_packaged_file() -> None:
    """One jobqueue.yaml: cluster/ holds a link to the packaged default, not a second copy."""
    documented = REPO / "cluster" / "jobqueue.yaml"
    assert documented.is_symlink() and documented.resolve() == DEFAULT_JOBQUEUE_CONFIG.resolve()


def test_default_jobqueue_config_is_valid() -> None:
    cfg = read_jobqueue_config()
    assert cfg["cores"] >= 1 and cfg["processes"] >= 1
    assert isinstance(cfg["walltime"], str) and cfg["interface"] is None
    assert cfg["job-extra-directives"] == [] and cfg["worker-extra-args"] == []
    # Every key is one SLURMCluster knows.
    assert set(cfg) <= set(cluster_mod._slurm_defaults())


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "jq.yaml"
    p.write_text(text)
    return p


def test_jobqueue_config_underscores_and_overrides(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "jobqueue:\n  slurm:\n    cores: 2\n    memory: 4GB\n    job_extra_directives: ['--gres=gpu:1']\n"
    )
    cfg = read_jobqueue_config(p, {"memory": "8GB", "worker_extra_args": ["--lifetime", "1h"]})
    assert cfg == {
        "cores": 2,
        "memory": "8GB",
        "job-extra-directives": ["--gres=gpu:1"],
        "worker-extra-args": ["--lifetime", "1h"],
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("jobqueue:\n  slurm:\n    cors: 2\n", r"unknown key\(s\) in 'jobqueue: slurm:': cors"),
        ("jobqueue:\n  slurm:\n    cores: [1\n", "invalid YAML at line"),
        ("slurm:\n  cores: 2\n", "expected a 'jobqueue:' mapping"),
        ("jobqueue:\n  pbs:\n    cores: 2\n", "only 'jobqueue: slurm:' is supported"),
        ("jobqueue:\n  slurm: {}\ndistributed: {}\n", "remove distributed"),
        ("jobqueue:\n  slurm:\n    walltime: 4:00:00\n", "'walltime' must be a string"),
        ("jobqueue:\n  slurm:\n    walltime: 'four hours'\n", "'walltime' must look like"),
        ("jobqueue:\n  slurm:\n    cores: 0\n", "'cores' must be a positive integer"),
        ("jobqueue:\n  slurm:\n    cores: 1\n    processes: 2\n", "must not exceed 'cores'"),
        ("jobqueue:\n  slurm:\n    memory: lots\n", "'memory' must be a size"),
        ("jobqueue:\n  slurm:\n    job-extra-directives: '--gres=gpu:1'\n", "must be a list of strings"),
    ],
)
def test_bad_jobqueue_config(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(N2VError, match=match) as info:
        read_jobqueue_config(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_jobqueue_config(tmp_path: Path) -> None:
    with pytest.raises(N2VError, match="no such file"):
        read_jobqueue_config(tmp_path / "nope.yaml")


def test_slurm_config_checked_before_anything_starts(tmp_path: Path) -> None:
    p = _write(tmp_path, "jobqueue:\n  slurm:\n    cors: 2\n")
    with pytest.raises(N2VError, match="unknown key"):
        with cluster_client("slurm", jobqueue_config=p):
            pass  # pragma: no cover


def test_slurm_without_sbatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod.shutil, "which", lambda name: None)
    with pytest.raises(N2VError, match="needs the SLURM command sbatch"):
        with cluster_client("slurm"):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"jobs": 0}, "jobs must be a positive integer"),
        ({"adapt": (2, 1)}, "adapt must be"),
        ({"adapt": (0, 0)}, "adapt must be"),
    ],
)
def test_slurm_bad_scaling(kwargs: dict, match: str) -> None:
    with pytest.raises(N2VError, match=match):
        with cluster_client("slurm", **kwargs):
            pass  # pragma: no cover


def test_documented_yaml_parses_as_dask_config() -> None:
    data = yaml.safe_load((REPO / "cluster" / "jobqueue.yaml").read_text())
    assert set(data) == {"jobqueue"} and set(data["jobqueue"]) == {"slurm"}
