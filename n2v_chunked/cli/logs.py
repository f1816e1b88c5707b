"""What the command line logs: the user's lines by default, dask's chatter only when asked.

By default a run shows the dashboard link, progress and the result line.
dask, distributed, tornado and bokeh log at WARNING (their INFO lines about
schedulers, nannies and worker registration bury the link), and so do the
worker and nanny processes a local cluster starts: they are separate
processes that read their logging settings from dask's configuration at
import, which they inherit through ``DASK_LOGGING__*`` environment variables.
``-v`` shows everyone's INFO lines, ``--debug`` DEBUG lines and tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys

#: Third-party loggers kept at WARNING unless -v/--debug (and their default level otherwise).
NOISY = ("distributed", "dask", "tornado", "bokeh", "asyncio", "fsspec", "urllib3", "numcodecs", "zarr")

#: The loggers whose INFO lines the user needs by default (the dashboard link).
ANNOUNCE = "n2v_chunked.announce"

#: distributed's warnings that report its own recovery, not a problem of the run: a worker whose
#: connection dropped (a Ctrl-C, a lost network packet) re-registers at its next heartbeat.
BENIGN = ("Received heartbeat from unregistered worker",)


def _not_benign(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("distributed") and record.getMessage().startswith(BENIGN))


def quiet_shutdown() -> None:
    """Silence dask, distributed, tornado and asyncio from here on: the run is ending.

    After Ctrl-C the workers get the signal too; the scheduler logs their
    departure (lost and unregistered workers) and the event loop the callbacks
    the interrupt cut short, while our one line says what became of the
    output.  ``-v`` and ``--debug`` keep everything.
    """
    if logging.getLogger("n2v_chunked").getEffectiveLevel() > logging.INFO:
        for name in ("distributed", "dask", "tornado", "tornado.application", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


class _Formatter(logging.Formatter):
    """``n2v-chunked: <message>`` for INFO, ``n2v-chunked: warning: <message>`` above."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"n2v-chunked: {record.levelname.lower()}: {msg}"
        return f"n2v-chunked: {msg}"


def setup_logging(verbose: bool = False, debug: bool = False) -> None:
    """Configure logging for one command-line run.

    Parameters
    ----------
    verbose : bool
        INFO lines of every library (``-v``).
    debug : bool
        DEBUG lines and timestamps (``--debug``).
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if verbose or debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_Formatter())
        handler.addFilter(_not_benign)
    handler._n2v_chunked = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        # replace our own and plain console handlers; keep others (a log file, pytest's capture)
        if getattr(h, "_n2v_chunked", False) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("n2v_chunked").setLevel(level)
    logging.getLogger(ANNOUNCE).setLevel(min(level, logging.INFO))
    third = "debug" if debug else "info" if verbose else "warning"
    for name in NOISY:
        # distributed adds its own handler at import; our root handler is enough
        lg = logging.getLogger(name)
        lg.setLevel(level if (verbose or debug) else logging.WARNING)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    # Worker and nanny processes: a failed task's ~40-line "Compute Failed" report is logged
    # there at ERROR, while the client gets the same exception and says it in one line.
    workers = {"distributed": third, "distributed.worker": third if (verbose or debug) else "critical"}
    if not (verbose or debug):
        # distributed applies these at its import (in this process too, which may come after this
        # call): tornado's "Exception in callback" tracebacks are its loop's, never the user's news
        workers.update({"tornado": "critical", "tornado.application": "critical"})
    os.environ["DASK_LOGGING"] = repr(workers)
    if "dask" in sys.modules:  # imported already (a test, a notebook): its config has been read
        import dask

        # one flat mapping of logger names, some dotted: merged whole, not set key by dotted key
        # (a site's dictConfig-style "logging", with a "version", is left as it is)
        current = dask.config.get("logging", default=None) or {}
        if "version" not in current:
            dask.config.set({"logging": {**current, **workers}})
    if not (verbose or debug):
        # tornado logs a traceback for every connection closed during shutdown (CommClosedError)
        logging.getLogger("tornado").setLevel(logging.CRITICAL)
        logging.getLogger("tornado.application").setLevel(logging.CRITICAL)  # distributed sets it to ERROR
        logging.getLogger("distributed.comm").setLevel(logging.ERROR)
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)  # "still alive after 4 s, killing" at close
