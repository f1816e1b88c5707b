"""What every kind of cluster shares: the dashboard link, its announcement, teardown, the main guard."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import sys
import warnings
from typing import Any, Iterator, Mapping

import dask

log = logging.getLogger(__name__)


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


#: Logs the dashboard link; shown by default (see :mod:`n2v_chunked.cli.logs`).
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
