"""The one entry point, :func:`cluster_client`: a local cluster, an existing scheduler, or SLURM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import ConfigError, InputNotFoundError, N2VError, first_line
from .common import (
    _announce, _dashboard_address, _hub_link, _main_guard_message, _quiet_port_fallback, _safe_close,
    check_not_spawn_reimport,
)
from .slurm import _start_slurm

log = logging.getLogger(__name__)

_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-]+:\d+$|^\[[0-9A-Fa-f:.]+\]:\d+$")


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
    raise ConfigError(
        f"unknown scheduler {scheduler!r}: use 'local', 'slurm', an address like tcp://host:8786 "
        "or a scheduler.json file"
    )


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
    ConfigError
        Unknown scheduler, invalid jobqueue config, a worker job SLURM rejects.
    N2VError
        Unreachable address, no ``sbatch`` on PATH, no worker within ``worker_timeout``.
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
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    try:
        with _quiet_port_fallback():
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address or _dashboard_address(),
                preload=["n2v_chunked.cluster.worker_setup"],  # workers ignore Ctrl-C; this process stops them
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
                raise InputNotFoundError(f"scheduler file {target}: no such file")
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
        first = first_line(exc) or type(exc).__name__
        raise N2VError(f"cannot reach the dask scheduler at {target} within {timeout:g} s: {first}") from None
    stack.callback(_safe_close, client, "dask client")
    _announce(client, f"connected to the dask scheduler at {client.scheduler.address}")
    if not client.scheduler_info(n_workers=1).get("workers"):
        log.warning("the scheduler at %s has no workers yet; computations wait until some join", target)
    return client
