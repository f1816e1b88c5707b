"""Progress of long runs, on a terminal and in batch-job logs.

On a terminal (or in Jupyter) a tqdm bar shows progress.  Without one, the
SLURM case where stderr goes to ``slurm-<id>.out``, a bar's carriage returns
either show nothing (tqdm disables itself) or fill the file with thousands of
overwritten lines; so there a plain line is printed at a fixed interval::

    predicting: 120/400 blocks (30%), 2.31 blocks/s, ETA 2m01s; 1.23 MPix/s

The interval is :data:`DEFAULT_INTERVAL` seconds, or what
:func:`set_interval` (the CLI's ``--progress-interval``) or the environment
variable ``N2V_PROGRESS_INTERVAL`` says: seconds (``30``) or a share of the
total (``10%``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

from ..errors import ConfigError

#: Seconds between two progress lines without a terminal.
DEFAULT_INTERVAL = 30.0

_interval: str | None = None


def parse_interval(text: str | float | None) -> tuple[str, float]:
    """``"30"`` -> ``("s", 30.0)``; ``"10%"`` -> ``("%", 10.0)``; None -> the default.

    Raises
    ------
    ConfigError
        Not a positive number of seconds or a percentage in (0, 100].
    """
    if text is None or text == "":
        return "s", DEFAULT_INTERVAL
    s = str(text).strip()
    kind = "%" if s.endswith("%") else "s"
    try:
        value = float(s.rstrip("%").rstrip("s"))
    except ValueError:
        value = -1.0
    if not value > 0 or (kind == "%" and value > 100):
        raise ConfigError(f"--progress-interval must be seconds (e.g. 30) or a percentage (e.g. 10%), got {text!r}")
    return kind, value


def set_interval(text: str | float | None) -> None:
    """Set the interval of progress lines without a terminal (checked at once)."""
    global _interval
    parse_interval(text)
    _interval = None if text is None else str(text)


def interval() -> tuple[str, float]:
    """The interval in force: :func:`set_interval`, else ``$N2V_PROGRESS_INTERVAL``, else the default."""
    return parse_interval(_interval if _interval is not None else os.environ.get("N2V_PROGRESS_INTERVAL"))


def _in_kernel() -> bool:
    """Running inside a Jupyter kernel, not merely in a process that imported ipykernel."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive(stream: TextIO | None = None) -> bool:
    """True on a terminal or in a Jupyter kernel (where tqdm draws a widget)."""
    stream = stream or sys.stderr
    if _in_kernel():
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``121`` -> ``"2m01s"``, ``7`` -> ``"7s"``."""
    if not seconds < float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_line(desc: str, done: int, total: int | None, unit: str, seconds: float, extra: str = "",
                budget: float | None = None) -> str:
    """One progress line: done/total, percentage, rate, ETA and ``extra``.

    ``budget``: seconds after which the run stops whatever is left (``--minutes``); the ETA is then the
    sooner of the work's end and the budget's.

    Examples
    --------
    >>> format_line("train", 3, 2000, "step", 90.0, budget=120.0)
    'train: 3/2000 steps (0%), 0.0333 steps/s, ETA 30s'
    """
    rate = (done / seconds) if seconds > 0 else 0.0
    parts = [f"{desc}: {done}/{total} {unit}s ({100.0 * done / total:.0f}%)" if total else f"{desc}: {done} {unit}s"]
    parts.append(f"{rate:.3g} {unit}s/s")
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        if budget:
            eta = min(eta, max(budget - seconds, 0.0))
        parts.append("ETA " + format_duration(eta))
    line = ", ".join(parts)
    return f"{line}; {extra}" if extra else line


class Progress:
    """A progress bar on a terminal, a line every interval in a log.

    Parameters
    ----------
    total : int, optional
        Units of work (blocks, steps).
    desc, unit : str
        What is done (``"predicting"``) and of what (``"block"``).
    enabled : bool
        False shows nothing.
    initial : int
        Units already done (a resumed run); the rate counts only new ones.
    stream : file, optional
        Where to write (default ``sys.stderr``).
    tty : bool, optional
        Force the terminal (True) or log (False) style; default: detect.
    clock : callable
        Seconds, monotonic (tests pass a fake one).
    budget : float, optional
        Seconds after which the run stops whatever is left (``train --minutes``):
        the ETA honours it.
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, budget: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.initial, self.n = enabled, initial, initial
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = self.last = clock()
        self.extra = ""
        self.budget = budget
        self.kind, self.every = interval()
        self.last_n = initial
        self.bar: Any = None
        self.lines = 0
        self.lock = threading.Lock()
        if enabled and (interactive(self.stream) if tty is None else tty):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, extra: str | dict[str, Any] | None = None) -> None:
        """Count ``n`` more units; ``extra`` (text or a dict) follows the numbers.  Thread-safe."""
        with self.lock:  # dask's threads report blocks concurrently
            self._update(n, extra)

    def _update(self, n: int, extra: str | dict[str, Any] | None) -> None:
        self.n += n
        if extra is not None:
            self.extra = extra if isinstance(extra, str) else ", ".join(f"{k} {v}" for k, v in extra.items())
        if not self.enabled:
            return
        if self.bar is not None:
            if extra is not None:
                self.bar.set_postfix_str(self.extra, refresh=False)
            if self.budget and self.total:  # tqdm's ETA from the work the budget leaves time for
                seconds, done = self.clock() - self.t0, self.n - self.initial
                if seconds > 0 and done > 0:
                    reach = self.n + int((self.budget - seconds) * done / seconds)
                    self.bar.total = max(self.n, min(self.total, reach))
            self.bar.update(n)
            return
        now = self.clock()
        if self.kind == "s":
            due = now - self.last >= self.every
        else:
            work = (self.total or 0) - self.initial  # a share of this run's work, not of the resumed total
            due = work > 0 and (self.n - self.last_n) * 100.0 >= self.every * work
        if due:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last, self.last_n = now, self.n
        self.lines += 1
        line = format_line(self.desc, self.n - self.initial, (self.total - self.initial) if self.total else None,
                           self.unit, now - self.t0, self.extra, self.budget)
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar; in a log, a last line when work was done since the previous line.

        No last line for work shorter than one interval (no line yet: the
        caller's result line says it), nor from a ``finally`` while an error
        propagates (the error's one line is what the user must see last).
        """
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines and self.n > self.last_n and sys.exc_info()[0] is None:
            self._line(self.clock())
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
