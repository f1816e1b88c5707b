"""Preloaded into the worker processes of a local cluster (``distributed`` ``preload``).

A terminal's Ctrl-C goes to the whole process group: the workers would each
print a traceback while the main process, which owns them, already stops them
and says what happened in one line.  So the workers ignore SIGINT.
"""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by distributed when the worker starts."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread of the process (an in-process worker): leave it
        pass
