"""An advisory lock that keeps two runs from writing one output at once.

The lock is a small JSON file next to the output (``<output>.lock``) naming its
holder: host, pid, SLURM job, start time and a heartbeat that the holder
refreshes every :data:`HEARTBEAT_S` seconds.  A second run refuses to start
while the lock is live.  A lock is stale, and is taken over with a warning,
when its holder is provably gone:

* same host and its pid no longer runs (a run killed with SIGKILL);
* same SLURM job but another restart count (a pre-empted job requeued on
  another node keeps its job id);
* no heartbeat for :data:`STALE_AFTER_S` seconds (a holder on a dead node).

Local files are created with ``O_EXCL`` and taken over by an atomic rename, so
two runs racing for one lock cannot both win.  On S3-compatible stores the lock
is created with a conditional write (``PUT`` with ``If-None-Match: *``; AWS S3,
MinIO and moto honour it), so two runs racing to create it cannot both win
either.  What is not guaranteed there: taking over a *stale* lock (read,
compare, delete, create) has a window in which two runs that both judged it
stale may both delete it; the conditional create that follows still lets only
one of them hold it.  A store that rejects conditional writes (501) falls back
to check-then-write, with a warning: best effort only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from .errors import N2VError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


def lock_path(output: str) -> str:
    """Where the lock of ``output`` lives (a sibling, so ``--overwrite`` cannot delete it)."""
    return output.rstrip("/") + LOCK_SUFFIX


def _holder(what: str, token: str) -> dict[str, Any]:
    now = time.time()
    return {
        "what": what, "token": token, "host": socket.gethostname(), "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started": now, "heartbeat": now,
    }


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lock ``holder`` is dead, or None while it may still be running."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0.0))
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not pid_running(holder["pid"]):
            return f"process {holder['pid']} on this host has ended"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job and holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return f"SLURM job {job} was requeued"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}{job}, started {started})"


class _Local:
    """Lock file operations on a local path: exclusive create, atomic replace and rename."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def take(self, expected: bytes) -> bool:
        """Move the stale lock aside, but only if it is still the one judged stale."""
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            got = f.read()
        if got != expected:  # another run took it over meanwhile: give theirs back
            with contextlib.suppress(OSError):
                os.rename(aside, self.path)
            return False
        os.unlink(aside)
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Remote(_Local):
    """The same operations through fsspec: conditional create where the store has it."""

    def __init__(self, path: str) -> None:
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(path)

    def create(self, data: bytes) -> bool:
        if self.fs.exists(self.path):
            return False
        try:
            self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *, atomic on the server
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, OSError) as exc:
            if isinstance(exc, OSError) and "NotImplemented" not in str(exc) and "501" not in str(exc):
                raise
            log.warning("%s: the store has no conditional writes; the lock is best effort", self.path)
            self.fs.pipe_file(self.path, data)
        return True

    def read(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def take(self, expected: bytes) -> bool:
        if self.read() != expected:
            return False
        self.fs.rm_file(self.path)
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


def _files(path: str) -> _Local:
    from .sources import is_url

    if is_url(path) and not path.startswith("file://"):
        return _Remote(path)
    return _Local(path[len("file://"):] if path.startswith("file://") else path)


@contextlib.contextmanager
def output_lock(output: str, what: str = "a prediction") -> Iterator[str]:
    """Hold the lock of ``output`` for the duration of the block.

    Parameters
    ----------
    output : str
        The output location (a local path or an fsspec URL).
    what : str
        Who holds it, for the message another run prints.

    Yields
    ------
    str
        The lock file's location.

    Raises
    ------
    N2VError
        When another live run holds the lock, or the lock cannot be written.
    """
    path = lock_path(output)
    files = _files(path)
    token = uuid.uuid4().hex
    holder = _holder(what, token)
    for _ in range(5):  # a takeover race is retried, a live holder is not
        try:
            if files.create(json.dumps(holder).encode()):
                break
        except OSError as exc:
            raise N2VError(f"cannot create the lock {path} for {output}: {exc.strerror or exc}") from None
        raw = files.read()
        if raw is None:
            continue  # released meanwhile
        try:
            other = json.loads(raw)
        except ValueError:
            other = {}  # a lock cut short by a kill while it was written
        reason = stale_reason(other) if other else "it is unreadable"
        if reason is None:
            raise N2VError(
                f"{output} is being written by {_describe(other)}; wait for it to finish, or if it is dead "
                f"delete {path}"
            )
        if files.take(raw):
            log.warning("taking over the lock %s: %s", path, reason)
    else:
        raise N2VError(f"cannot take the lock {path} for {output}: other runs keep taking it")

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            raw = files.read()
            if raw is None or json.loads(raw).get("token") != token:
                log.error("the lock %s was taken over by another run", path)
                return
            holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                files.replace(json.dumps(holder).encode())

    beat = threading.Thread(target=heartbeat, name="n2v-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        raw = files.read()
        with contextlib.suppress(ValueError):
            if raw is not None and json.loads(raw).get("token") == token:
                files.remove()
