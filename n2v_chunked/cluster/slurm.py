"""SLURM: the ``jobqueue: slurm:`` YAML file, and a :class:`dask_jobqueue.SLURMCluster` started from it."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import dask
import yaml
from dask.utils import parse_bytes

from ..errors import ConfigError, InputNotFoundError, N2VError, first_line
from .common import _announce, _dashboard_address, _quiet_port_fallback, _safe_close

log = logging.getLogger(__name__)

#: The packaged default of ``cluster/jobqueue.yaml`` (the two files are identical).
DEFAULT_JOBQUEUE_CONFIG = Path(__file__).resolve().parent.parent / "data" / "jobqueue.yaml"

_LIST_KEYS = ("job-extra-directives", "job-script-prologue", "worker-extra-args", "job-directives-skip")


def _slurm_defaults() -> dict[str, Any]:
    """dask-jobqueue's own ``jobqueue.slurm`` defaults (the keys it knows)."""
    import dask_jobqueue  # noqa: F401  (an optional extra; importing it registers the jobqueue defaults)

    return dict(dask.config.get("jobqueue.slurm"))


def read_jobqueue_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read and check the ``jobqueue: slurm:`` section of a YAML file.

    Parameters
    ----------
    path : path-like, optional
        The YAML file; ``None`` reads :data:`DEFAULT_JOBQUEUE_CONFIG`.
    overrides : mapping, optional
        Keys of the slurm section that replace the file's values (``_`` or ``-``).

    Returns
    -------
    dict
        The slurm section with canonical (``-``) key names; only the keys that
        the file or ``overrides`` set.

    Raises
    ------
    InputNotFoundError
        The file does not exist.
    ConfigError
        Invalid YAML, a section other than ``jobqueue: slurm:``, unknown keys
        or values of the wrong kind.
    N2VError
        The file cannot be read (permissions, I/O).
    """
    src = Path(path) if path is not None else DEFAULT_JOBQUEUE_CONFIG
    where = f"jobqueue config {src}"
    try:
        text = src.read_text()
    except FileNotFoundError:
        raise InputNotFoundError(f"{where}: no such file") from None
    except OSError as exc:
        raise N2VError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobqueue"), dict):
        raise ConfigError(f"{where}: expected a 'jobqueue:' mapping with a 'slurm:' section")
    extra_top = sorted(str(k) for k in data if k != "jobqueue")
    if extra_top:
        raise ConfigError(f"{where}: only the 'jobqueue: slurm:' section is read; remove {', '.join(extra_top)}")
    jq = data["jobqueue"]
    other = sorted(str(k) for k in jq if k != "slurm")
    if other:
        raise ConfigError(f"{where}: only 'jobqueue: slurm:' is supported, found jobqueue: {', '.join(other)}")
    section = jq.get("slurm")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: 'jobqueue: slurm:' must be a mapping, got {type(section).__name__}")
    merged = {str(k).replace("_", "-"): v for k, v in section.items()}
    merged.update({str(k).replace("_", "-"): v for k, v in (overrides or {}).items()})
    return _check_slurm_section(merged, where)


def _check_slurm_section(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    known = set(_slurm_defaults())
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) in 'jobqueue: slurm:': {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )

    def positive_int(key: str) -> None:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}: '{key}' must be a positive integer, got {v!r}")

    positive_int("cores")
    positive_int("processes")
    if cfg.get("cores") is not None and cfg.get("processes") is not None and cfg["processes"] > cfg["cores"]:
        raise ConfigError(f"{where}: 'processes' ({cfg['processes']}) must not exceed 'cores' ({cfg['cores']})")
    for key in ("memory", "job-mem"):
        v = cfg.get(key)
        if v is not None:
            try:
                ok = parse_bytes(v) > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise ConfigError(f"{where}: '{key}' must be a size like '16GB', got {v!r}")
    for key in ("walltime", "queue", "account", "name", "python", "interface", "local-directory", "log-directory"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}: '{key}' must be a string (quote it in YAML), got {v!r}")
    if isinstance(cfg.get("walltime"), str) and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", cfg["walltime"]):
        raise ConfigError(f"{where}: 'walltime' must look like '04:00:00' or '1-00:00:00', got {cfg['walltime']!r}")
    for key in _LIST_KEYS:
        if key in cfg:
            v = cfg[key]
            if v is None:
                cfg[key] = []
            elif isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
                cfg[key] = [str(x) for x in v]
            else:
                raise ConfigError(f"{where}: '{key}' must be a list of strings, got {v!r}")
    if cfg.get("scheduler-options") is not None and not isinstance(cfg["scheduler-options"], dict):
        raise ConfigError(f"{where}: 'scheduler-options' must be a mapping, got {cfg['scheduler-options']!r}")
    return cfg


def _squeue(job_ids: list[str]) -> list[str] | None:
    """``squeue`` lines ``"<id> <state> <reason>"`` of these jobs; ``None`` if squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %R", "-j", ",".join(job_ids)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]


def _job_log_tail(cfg: Mapping[str, Any], job_id: str) -> str:
    """Last line of a worker job's stderr (where dask-jobqueue puts it), or ''."""
    log_dir = cfg.get("log-directory")
    name = cfg.get("name") or "worker"
    candidates = [Path(log_dir) / f"{name}-{job_id}.err"] if log_dir else [Path(f"slurm-{job_id}.out")]
    for f in candidates:
        try:
            lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
        if lines:
            return f"{f}: {lines[-1]}"
    return ""


def _wait_for_first_worker(client: Any, cluster: Any, cfg: Mapping[str, Any], timeout: float) -> None:
    """Wait until one worker joins; fail early when every worker job has already ended."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 3.0
    logs = cfg.get("log-directory") or "slurm-<jobid>.out in the working directory"
    while True:
        if client.scheduler_info(n_workers=1).get("workers"):
            log.info("first SLURM worker joined")
            return
        ids = [str(j.job_id) for j in list(cluster.workers.values()) if getattr(j, "job_id", None)]
        now = time.monotonic()
        if now >= next_check and ids:
            next_check = now + 3.0
            lines = _squeue(ids)
            if lines == [] and not client.scheduler_info(n_workers=1).get("workers"):
                tail = _job_log_tail(cfg, ids[0])
                raise N2VError(
                    f"the dask worker job(s) {', '.join(ids)} ended before a worker joined"
                    + (f"; {tail}" if tail else f"; see the worker logs ({logs})")
                )
        if now >= deadline:
            lines = _squeue(ids) if ids else None
            states = "; ".join(lines) if lines else ("no job was submitted" if not ids else "state unknown")
            raise N2VError(
                f"no dask worker joined within {timeout:g} s (worker jobs: {states}); "
                f"raise worker_timeout if the queue is busy, else see the worker logs ({logs})"
            )
        time.sleep(0.5)


def _preflight(cluster: Any, where: str) -> None:
    """Let SLURM check the worker job script (``sbatch --test-only``): partition,
    account, memory and GRES mistakes fail here in one line rather than as
    workers that never come."""
    script = cluster.job_script()
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="n2v-worker-", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        res = subprocess.run(["sbatch", "--test-only", path], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise N2VError(
            "sbatch --test-only of the dask worker job did not answer within 60 s (is slurmctld up?)"
        ) from None
    finally:
        os.unlink(path)
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else f"exit {res.returncode}")
        raise ConfigError(f"SLURM rejects the dask worker job from {where}: {err}")
    log.info("worker job script accepted by sbatch --test-only:\n%s", script)


def _start_slurm(
    stack: contextlib.ExitStack,
    jobqueue_config: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    jobs: int,
    adapt: tuple[int, int] | None,
    worker_timeout: float,
    dashboard_address: str | None,
) -> Any:
    where = str(jobqueue_config or DEFAULT_JOBQUEUE_CONFIG)
    if adapt is not None:
        if (
            not isinstance(adapt, (tuple, list)) or len(adapt) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in adapt)
            or adapt[0] < 0 or adapt[1] < max(1, adapt[0])
        ):
            raise ConfigError(
                f"adapt must be (minimum_jobs, maximum_jobs) with 0 <= minimum <= maximum, maximum >= 1; got {adapt!r}"
            )
    elif isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a positive integer, got {jobs!r}")
    cfg = read_jobqueue_config(jobqueue_config, overrides)
    if shutil.which("sbatch") is None:
        raise N2VError(
            "scheduler 'slurm' needs the SLURM command sbatch on PATH "
            "(run on a login node of the cluster, or use --scheduler local)"
        )

    # The settings stay in dask's config for the life of the cluster: dask-jobqueue
    # reads them again each time it creates a worker job (scale-up, adapt).
    stack.enter_context(dask.config.set({f"jobqueue.slurm.{k}": v for k, v in cfg.items()}))
    scheduler_options = dict(cfg.get("scheduler-options") or {})
    scheduler_options.setdefault("dashboard_address", dashboard_address or _dashboard_address())

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    try:
        with _quiet_port_fallback():
            cluster = SLURMCluster(scheduler_options=scheduler_options)
    except (ValueError, TypeError, KeyError) as exc:
        first = first_line(exc) or type(exc).__name__
        raise ConfigError(f"jobqueue config {where}: {first}") from None
    stack.callback(_safe_close, cluster, "SLURM dask cluster")
    _preflight(cluster, where)
    client = Client(cluster)
    stack.callback(_safe_close, client, "dask client")

    if adapt is not None:
        cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
        wait = adapt[0] >= 1
        how = f"adaptive, {adapt[0]}..{adapt[1]} worker job(s)"
    else:
        cluster.scale(jobs=jobs)
        wait = True
        how = f"{jobs} worker job(s)"
    _announce(client, f"SLURM dask cluster ({how}, scheduler {cluster.scheduler_address})")
    if wait:
        _wait_for_first_worker(client, cluster, cfg, worker_timeout)
    return client
