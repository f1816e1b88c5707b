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

Local files are created atomically: the holder's JSON is written to a
temporary file that is then hard-linked to the lock's name, which fails when a
lock exists, so a lock is never seen half written and two runs racing for one
lock cannot both win.  A lock that cannot be read (left by another tool, or cut
short by a node loss) is stale only once its file is older than
:data:`UNREADABLE_GRACE_S`.  The holder refreshes its heartbeat by touching the
file (its mtime), gives the lock back only while it still holds its token, and
:meth:`HeldLock.check` stops a run whose lock was taken over.
On S3-compatible stores the lock
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
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from ..errors import LockHeldError, N2VError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats
UNREADABLE_GRACE_S = 60.0  # an unreadable lock younger than this may still be written


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


def stale_reason(holder: dict[str, Any], now: float | None = None, mtime: float | None = None) -> str | None:
    """Why the lock ``holder`` is dead, or None while it may still be running.

    ``mtime`` is the lock file's modification time where known: local holders
    beat by touching the file.
    """
    now = time.time() if now is None else now
    age = now - max(float(holder.get("heartbeat", 0.0)), mtime or 0.0)
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
    """Lock file operations on a local path: exclusive create by hard link, touch, take-aside."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _link(self, src: str) -> bool:
        try:
            os.link(src, self.path)  # fails if the lock exists: the atomic, complete create
        except FileExistsError:
            return False
        self._sync_dir()
        return True

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self._tmp(data)
        try:
            return self._link(tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_exclusive(data)  # no hard links here (some FUSE/SMB mounts)
        finally:
            os.unlink(tmp)

    def _create_exclusive(self, data: bytes) -> bool:
        """O_EXCL create, then write: a reader may see it empty for a moment (hence the grace period)."""
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

    def mtime(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def beat(self, data: bytes) -> None:
        # touching cannot replace a lock another run took over meanwhile (rewriting could)
        os.utime(self.path)

    def take(self, expected: bytes) -> bool:
        """Move the lock aside, but only if it is still ``expected``; else put it back without overwriting."""
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            got = f.read()
        if got != expected:  # another run's lock: give it back, unless a third run holds the name now
            try:
                self._link(aside)  # whose holder, if any, sees on its next check that it lost the lock
                os.unlink(aside)
            except OSError:  # no hard links here: the old way
                with contextlib.suppress(OSError):
                    os.rename(aside, self.path)
            return False
        os.unlink(aside)
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Remote(_Local):
    """The same operations on a URL: on an object store the create is a conditional write (``If-None-Match: *``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> bool:
        from . import objects

        try:
            return objects.write(self.path, data, create=True)
        except OSError as exc:
            if "NotSupported" not in repr(exc.__cause__) and "501" not in str(exc):
                raise
        log.warning("%s: the store has no conditional writes; the lock is best effort", self.path)
        if self.read() is not None:
            return False
        return objects.write(self.path, data)

    def read(self) -> bytes | None:
        from . import objects

        return objects.read(self.path)

    def mtime(self) -> float | None:
        return None  # object stores' times are not comparable with this host's clock

    def beat(self, data: bytes) -> None:
        from . import objects

        objects.write(self.path, data)

    def take(self, expected: bytes) -> bool:
        if self.read() != expected:
            return False
        self.remove()
        return True

    def remove(self) -> None:
        from . import objects

        objects.remove(self.path)


def _files(path: str) -> _Local:
    from .stores import is_url

    if is_url(path) and not path.startswith("file://"):
        return _Remote(path)
    return _Local(path[len("file://"):] if path.startswith("file://") else path)


class HeldLock:
    """The lock a run holds: where it lives, and :meth:`check` that it still is this run's."""

    def __init__(self, path: str, output: str, files: _Local, token: str) -> None:
        self.path, self.output, self.files, self.token = path, output, files, token

    def holder(self) -> dict[str, Any] | None:
        """The current holder's JSON, or None when the lock is gone or unreadable."""
        raw = self.files.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def check(self) -> None:
        """Raise :class:`N2VError` when another run has taken this lock over (or it was deleted).

        A run calls it before each group of writes and before marking its
        output complete, so that two runs never both finish one output.
        """
        other = self.holder()
        if other is None or other.get("token") != self.token:
            who = _describe(other) if other else "nobody (it was deleted)"
            raise LockHeldError(f"stopping: the lock {self.path} of {self.output} is now held by {who}; "
                           f"this run no longer owns {self.output}")


def _acquire(path: str, output: str, files: _Local, holder: dict[str, Any]) -> None:
    for _ in range(5):  # a takeover race is retried, a live holder is not
        try:
            if files.create(json.dumps(holder).encode()):
                return
        except OSError as exc:
            raise N2VError(f"cannot create the lock {path} for {output}: {exc.strerror or exc}") from None
        raw = files.read()
        if raw is None:
            continue  # released meanwhile
        mtime = files.mtime()
        try:
            other = json.loads(raw)
        except ValueError:
            other = None
        if isinstance(other, dict):
            reason = stale_reason(other, mtime=mtime)
        else:  # not written by this module, or cut short by a node loss: give a writer time
            age = time.time() - (mtime if mtime is not None else 0.0)
            reason = f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
            other = {}
        if reason is None:
            if not other:
                raise LockHeldError(f"{output} has an unreadable lock {path} younger than {UNREADABLE_GRACE_S:.0f} s; "
                               f"wait, or if no other run writes {output} delete {path}")
            raise LockHeldError(
                f"{output} is being written by {_describe(other)}; wait for it to finish, or if it is dead "
                f"delete {path}"
            )
        if files.take(raw):
            log.warning("taking over the lock %s: %s", path, reason)
    raise LockHeldError(f"cannot take the lock {path} for {output}: other runs keep taking it")


@contextlib.contextmanager
def output_lock(output: str, what: str = "a prediction") -> Iterator[HeldLock]:
    """Hold the lock of ``output`` for the duration of the block.

    Parameters
    ----------
    output : str
        The output location (a local path or an fsspec URL).
    what : str
        Who holds it, for the message another run prints.

    Yields
    ------
    HeldLock
        The lock: its ``path``, and ``check()`` to call before writes that only
        the holder may make.

    Raises
    ------
    N2VError
        When another live run holds the lock, or the lock cannot be written.
    """
    path = lock_path(output)
    files = _files(path)
    token = uuid.uuid4().hex
    holder = _holder(what, token)
    _acquire(path, output, files, holder)
    held = HeldLock(path, output, files, token)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            if (held.holder() or {}).get("token") != token:
                log.error("the lock %s was taken over by another run", path)
                return
            holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                files.beat(json.dumps(holder).encode())

    beat = threading.Thread(target=heartbeat, name="n2v-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield held
    finally:
        stop.set()
        beat.join()
        raw = files.read()
        if raw is not None and (held.holder() or {}).get("token") == token:
            files.take(raw)  # removes it only if it still is ours at the moment it is moved aside
