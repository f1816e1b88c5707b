"""Where the dask computation runs: a local cluster, an existing scheduler, or SLURM.

:func:`cluster_client` is the one entry point.  It is a context manager that
yields a :class:`distributed.Client` and owns the life of whatever cluster it
started: the cluster is closed when the ``with`` block ends, also on an
exception or Ctrl-C (for SLURM that cancels the worker jobs).

``scheduler`` selects the cluster:

``None`` or ``"local"``
    A :class:`distributed.LocalCluster` of worker processes on this machine.
``"tcp://host:8786"`` (any ``scheme://`` address, or plain ``host:port``)
    An existing scheduler (``dask scheduler``, another cluster); it is left
    running at the end.  A path to a ``scheduler.json`` (``dask scheduler
    --scheduler-file``) works too.
``"slurm"``
    A :class:`dask_jobqueue.SLURMCluster`: every worker is a SLURM job.  Its
    settings come from a ``jobqueue: slurm:`` YAML file (``jobqueue_config``;
    default: the packaged copy of ``cluster/jobqueue.yaml``).

The dashboard link is logged at INFO level on the ``n2v_chunked.announce`` logger
(shown by the command line by default) as soon as the client connects; under
JupyterHub it goes through the hub's proxy (:func:`dashboard_link_template`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import N2VError

log = logging.getLogger(__name__)

#: The packaged default of ``cluster/jobqueue.yaml`` (the two files are identical).
DEFAULT_JOBQUEUE_CONFIG = Path(__file__).resolve().parent / "data" / "jobqueue.yaml"

_LIST_KEYS = ("job-extra-directives", "job-script-prologue", "worker-extra-args", "job-directives-skip")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-]+:\d+$|^\[[0-9A-Fa-f:.]+\]:\d+$")


# ----------------------------------------------------------------------------
# jobqueue.yaml
# ----------------------------------------------------------------------------


def _slurm_defaults() -> dict[str, Any]:
    """dask-jobqueue's own ``jobqueue.slurm`` defaults (the keys it knows)."""
    import dask
    import dask_jobqueue  # noqa: F401  (registers the jobqueue defaults)

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
    N2VError
        Missing or unreadable file, invalid YAML, a section other than
        ``jobqueue: slurm:``, unknown keys or values of the wrong kind.
    """
    import yaml

    src = Path(path) if path is not None else DEFAULT_JOBQUEUE_CONFIG
    where = f"jobqueue config {src}"
    try:
        text = src.read_text()
    except FileNotFoundError:
        raise N2VError(f"{where}: no such file") from None
    except OSError as exc:
        raise N2VError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise N2VError(f"{where}: invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobqueue"), dict):
        raise N2VError(f"{where}: expected a 'jobqueue:' mapping with a 'slurm:' section")
    extra_top = sorted(str(k) for k in data if k != "jobqueue")
    if extra_top:
        raise N2VError(f"{where}: only the 'jobqueue: slurm:' section is read; remove {', '.join(extra_top)}")
    jq = data["jobqueue"]
    other = sorted(str(k) for k in jq if k != "slurm")
    if other:
        raise N2VError(f"{where}: only 'jobqueue: slurm:' is supported, found jobqueue: {', '.join(other)}")
    section = jq.get("slurm")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise N2VError(f"{where}: 'jobqueue: slurm:' must be a mapping, got {type(section).__name__}")
    merged = {str(k).replace("_", "-"): v for k, v in section.items()}
    merged.update({str(k).replace("_", "-"): v for k, v in (overrides or {}).items()})
    return _check_slurm_section(merged, where)


def _check_slurm_section(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    from dask.utils import parse_bytes

    known = set(_slurm_defaults())
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise N2VError(
            f"{where}: unknown key(s) in 'jobqueue: slurm:': {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )

    def positive_int(key: str) -> None:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise N2VError(f"{where}: '{key}' must be a positive integer, got {v!r}")

    positive_int("cores")
    positive_int("processes")
    if cfg.get("cores") is not None and cfg.get("processes") is not None and cfg["processes"] > cfg["cores"]:
        raise N2VError(f"{where}: 'processes' ({cfg['processes']}) must not exceed 'cores' ({cfg['cores']})")
    for key in ("memory", "job-mem"):
        v = cfg.get(key)
        if v is not None:
            try:
                ok = parse_bytes(v) > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise N2VError(f"{where}: '{key}' must be a size like '16GB', got {v!r}")
    for key in ("walltime", "queue", "account", "name", "python", "interface", "local-directory", "log-directory"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise N2VError(f"{where}: '{key}' must be a string (quote it in YAML), got {v!r}")
    if isinstance(cfg.get("walltime"), str) and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", cfg["walltime"]):
        raise N2VError(f"{where}: 'walltime' must look like '04:00:00' or '1-00:00:00', got {cfg['walltime']!r}")
    for key in _LIST_KEYS:
        if key in cfg:
            v = cfg[key]
            if v is None:
                cfg[key] = []
            elif isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
                cfg[key] = [str(x) for x in v]
            else:
                raise N2VError(f"{where}: '{key}' must be a list of strings, got {v!r}")
    if cfg.get("scheduler-options") is not None and not isinstance(cfg["scheduler-options"], dict):
        raise N2VError(f"{where}: 'scheduler-options' must be a mapping, got {cfg['scheduler-options']!r}")
    return cfg


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _dashboard_address(preferred: int = 8787) -> str:
    """``':8787'`` when that port is free here, else ``':0'`` (any free port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", preferred))
        except OSError:
            return ":0"
    return f":{preferred}"


@contextlib.contextmanager
def _quiet_port_fallback() -> Iterator[None]:
    """Hide distributed's warning that 8787 was taken (another cluster won the
    race since the check): the dashboard link logged afterwards has the real port."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        yield


#: Logs the dashboard link; shown by default (see :mod:`n2v_chunked.logs`).
announce = logging.getLogger("n2v_chunked.announce")

#: ``distributed.dashboard.link`` under JupyterHub: through the hub's proxy (jupyter-server-proxy).
JUPYTERHUB_LINK = "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"


def dashboard_link_template(environ: Mapping[str, str] | None = None) -> str | None:
    """The dashboard link template to use here, or None for dask's own.

    In JupyterHub (``JUPYTERHUB_SERVICE_PREFIX`` set), ``http://127.0.0.1:8787``
    is the compute node's address, which the user's browser cannot open; the
    hub's proxy (``pip install n2v-chunked[jupyter]``, i.e. jupyter-server-proxy)
    forwards ``<prefix>proxy/<port>/status`` to it.
    """
    env = os.environ if environ is None else environ
    return JUPYTERHUB_LINK if env.get("JUPYTERHUB_SERVICE_PREFIX") else None


@contextlib.contextmanager
def _hub_link() -> Iterator[None]:
    """Use the JupyterHub proxy link template while a client exists (unless the user set one)."""
    import dask

    template = dashboard_link_template()
    if template is None or dask.config.get("distributed.dashboard.link", None) not in (
        None, "{scheme}://{host}:{port}/status"
    ):
        yield
        return
    with dask.config.set({"distributed.dashboard.link": template}):
        yield


def _main_guard_message() -> str:
    mains = (sys.modules.get(name) for name in ("__main__", "__mp_main__"))  # the latter in a spawned worker
    script = next((m.__file__ for m in mains if getattr(m, "__file__", None)), "your script")
    return (f"the local dask cluster's worker processes import {script} again, which calls predict() again: "
            "put the script's work under `if __name__ == \"__main__\":` (see the README, Python)")


def check_not_spawn_reimport() -> None:
    """Stop a worker process that is re-importing the user's script from starting a cluster of its own.

    Worker processes start with the ``spawn`` method, which imports the
    parent's ``__main__`` script again; a script without the
    ``if __name__ == "__main__":`` guard then runs ``predict`` in every worker.
    The worker says why in one line and exits; the parent, whose workers did
    not start, says it too (:func:`_start_local`).
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False) or (
        multiprocessing.parent_process() is not None
        and getattr(sys.modules.get("__main__"), "__name__", "") == "__mp_main__"
    ):
        print(f"n2v-chunked: error: {_main_guard_message()}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def _announce(client: Any, what: str) -> None:
    link = getattr(client, "dashboard_link", None)
    msg = f"{what}; dask dashboard: {link or '(not available: install bokeh)'}"
    if logging.getLogger().handlers or announce.handlers:
        announce.info("%s", msg)
    else:  # a script or notebook that set up no logging would never see an INFO line
        print(f"n2v-chunked: {msg}", file=sys.stderr, flush=True)


def _safe_close(obj: Any, what: str, **kwargs: Any) -> None:
    """Close ``obj`` and log (never raise) what goes wrong: teardown must not mask the real error."""
    try:
        obj.close(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - includes a second Ctrl-C during teardown
        log.warning("closing the %s failed: %s: %s", what, type(exc).__name__, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise


def _classify(scheduler: str | None) -> tuple[str, str]:
    """Return (kind, target): kind is 'local', 'slurm', 'address' or 'file'."""
    if scheduler is None or scheduler.strip().lower() in ("", "local"):
        return "local", ""
    s = scheduler.strip()
    if s.lower() == "slurm":
        return "slurm", ""
    if "://" in s:
        return "address", s
    if _ADDRESS_RE.match(s):
        return "address", f"tcp://{s}"
    if s.endswith(".json"):
        return "file", s
    raise N2VError(
        f"unknown scheduler {scheduler!r}: use 'local', 'slurm', an address like tcp://host:8786 "
        "or a scheduler.json file"
    )


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
    import time

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
        raise N2VError(f"SLURM rejects the dask worker job from {where}: {err}")
    log.info("worker job script accepted by sbatch --test-only:\n%s", script)


# ----------------------------------------------------------------------------
# the context manager
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = "auto",
    jobqueue_config: str | os.PathLike[str] | None = None,
    jobqueue_overrides: Mapping[str, Any] | None = None,
    jobs: int = 1,
    adapt: tuple[int, int] | None = None,
    connect_timeout: float = 10.0,
    worker_timeout: float = 600.0,
    dashboard_address: str | None = None,
) -> Iterator[Any]:
    """Start or connect to a dask cluster and yield a ``distributed.Client``.

    Parameters
    ----------
    scheduler : str, optional
        ``None``/``"local"``, ``"slurm"``, a scheduler address (``tcp://host:8786``
        or ``host:8786``) or a ``scheduler.json`` file (see the module docstring).
    n_workers, threads_per_worker : int, optional
        Local cluster only: worker processes and threads in each.  ``None``
        lets dask choose from this machine's (affinity/cgroup-limited) cores.
    memory_limit : str or float, optional
        Local cluster only: memory per worker (``"auto"`` splits the machine's).
    jobqueue_config : path-like, optional
        SLURM only: a YAML file with a ``jobqueue: slurm:`` section (see
        ``cluster/jobqueue.yaml``); default: the packaged copy of that file.
    jobqueue_overrides : mapping, optional
        SLURM only: keys of the slurm section that replace the file's values,
        e.g. ``{"python": sys.executable, "cores": 1}``.
    jobs : int
        SLURM only: number of worker jobs to submit (``cluster.scale(jobs=...)``).
    adapt : (int, int), optional
        SLURM only: ``(minimum_jobs, maximum_jobs)`` for adaptive scaling instead of ``jobs``.
    connect_timeout : float
        Seconds to reach an existing scheduler before giving up.
    worker_timeout : float
        SLURM only: seconds to wait for the first worker (queue wait included);
        not waited for when ``adapt`` has minimum 0.
    dashboard_address : str, optional
        Dashboard address of a started scheduler; default ``":8787"`` when free, else any free port.

    Yields
    ------
    distributed.Client

    Raises
    ------
    N2VError
        Unknown scheduler, unreachable address, invalid jobqueue config, no
        ``sbatch`` on PATH, a worker job SLURM rejects, no worker within ``worker_timeout``.
    """
    check_not_spawn_reimport()
    kind, target = _classify(scheduler)
    if kind != "local" and (n_workers is not None or threads_per_worker is not None):
        log.warning("n_workers/threads_per_worker apply to a local cluster only; ignored for %r", scheduler)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_hub_link())  # the link printed and the client's widget both go through the hub
        if kind == "local":
            client = _start_local(stack, n_workers, threads_per_worker, memory_limit, dashboard_address)
        elif kind in ("address", "file"):
            client = _connect(stack, kind, target, connect_timeout)
        else:
            client = _start_slurm(
                stack, jobqueue_config, jobqueue_overrides, jobs, adapt, worker_timeout, dashboard_address
            )
        yield client


def _start_local(
    stack: contextlib.ExitStack,
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | float | None,
    dashboard_address: str | None,
) -> Any:
    from distributed import Client, LocalCluster

    for name, v in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise N2VError(f"{name} must be a positive integer, got {v!r}")
    try:
        with _quiet_port_fallback():
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address or _dashboard_address(),
                preload=["n2v_chunked.worker_setup"],  # workers ignore Ctrl-C; this process stops them
            )
    except RuntimeError as exc:
        main = sys.modules.get("__main__")
        if "Nanny failed to start" in str(exc) and getattr(main, "__file__", None) and not getattr(
            main, "__package__", None
        ):  # a script run as `python script.py`, whose workers failed at the re-import
            raise N2VError(_main_guard_message()) from None
        raise
    stack.callback(_safe_close, cluster, "local dask cluster")
    client = Client(cluster)
    stack.callback(_safe_close, client, "dask client")
    n = len(cluster.scheduler_info.get("workers", {}))
    _announce(client, f"local dask cluster with {n} worker process(es)")
    return client


#: Seconds a TCP connection to a scheduler may take before it counts as unreachable.
PROBE_TIMEOUT = 5.0


def _probe(address: str, timeout: float, via: str = "") -> None:
    """Fail at once, in one line, when nothing answers at a ``tcp://``/``tls://`` address.

    ``distributed.Client`` retries a refused connection until its timeout, so a
    typo in the port or a stopped scheduler would look like a hang; a plain TCP
    connect tells "refused" or "unknown host" immediately.  Other schemes pass.
    """
    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        host, port = parse_host_port(loc)
    except (ValueError, TypeError):
        return  # let distributed report what it makes of the address
    if scheme not in ("tcp", "tls"):
        return
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            greeting = _greeting(sock, timeout) if scheme == "tcp" else b"-"
    except socket.timeout:
        raise N2VError(f"cannot reach the dask scheduler at {address}{via}: no answer within {timeout:g} s") from None
    except OSError as exc:  # refused, unknown host, no route
        raise N2VError(f"cannot reach the dask scheduler at {address}{via}: {exc.strerror or exc}") from None
    if not greeting:
        raise N2VError(
            f"{address}{via} is not a dask scheduler: it accepts connections but does not greet like one within "
            f"{timeout:g} s (an HTTP server such as the dashboard port? the scheduler's port is usually 8786)"
        )


def _greeting(sock: socket.socket, timeout: float) -> bytes:
    """The first bytes a server sends unasked, or b"" when it sends none in ``timeout`` s.

    A dask scheduler writes its comm handshake as soon as a connection opens
    (``distributed.comm.core``); an HTTP server (the dashboard port: an easy
    mistake) waits for a request, and ``Client`` would wait with it for minutes.
    """
    sock.settimeout(timeout)
    try:
        data = sock.recv(8)
    except socket.timeout:
        return b""
    return b"" if data.startswith((b"HTTP", b"SSH-")) else data


def _scheduler_file_address(path: str) -> str | None:
    """The ``address`` recorded in a ``scheduler.json``, if it can be read."""
    import json

    try:
        address = json.loads(Path(path).read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        return None
    return address if isinstance(address, str) else None


def _connect(stack: contextlib.ExitStack, kind: str, target: str, timeout: float) -> Any:
    from distributed import Client

    try:
        if kind == "file":
            if not Path(target).is_file():
                raise N2VError(f"scheduler file {target}: no such file")
            address = _scheduler_file_address(target)
            if address:  # a stale file from a scheduler that has stopped is the usual case
                _probe(address, min(timeout, PROBE_TIMEOUT), f" (from scheduler file {target})")
            client = Client(scheduler_file=target, timeout=timeout)
        else:
            _probe(target, min(timeout, PROBE_TIMEOUT))
            client = Client(target, timeout=timeout)
    except N2VError:
        raise
    except (OSError, TimeoutError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise N2VError(f"cannot reach the dask scheduler at {target} within {timeout:g} s: {first}") from None
    stack.callback(_safe_close, client, "dask client")
    _announce(client, f"connected to the dask scheduler at {client.scheduler.address}")
    if not client.scheduler_info(n_workers=1).get("workers"):
        log.warning("the scheduler at %s has no workers yet; computations wait until some join", target)
    return client


def _start_slurm(
    stack: contextlib.ExitStack,
    jobqueue_config: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    jobs: int,
    adapt: tuple[int, int] | None,
    worker_timeout: float,
    dashboard_address: str | None,
) -> Any:
    import dask

    where = str(jobqueue_config or DEFAULT_JOBQUEUE_CONFIG)
    if adapt is not None:
        if (
            not isinstance(adapt, (tuple, list)) or len(adapt) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in adapt)
            or adapt[0] < 0 or adapt[1] < max(1, adapt[0])
        ):
            raise N2VError(
                f"adapt must be (minimum_jobs, maximum_jobs) with 0 <= minimum <= maximum, maximum >= 1; got {adapt!r}"
            )
    elif isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise N2VError(f"jobs must be a positive integer, got {jobs!r}")
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
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise N2VError(f"jobqueue config {where}: {first}") from None
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

