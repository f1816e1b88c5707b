"""User-facing errors.

Every problem a user can cause (bad path, bad metadata, bad config, a model
that does not fit the data) is raised as :class:`N2VError` with one line that
names the problem.  The CLI prints that line and exits 2; anything else is a
bug: the CLI prints its traceback and asks for a report (exit
:data:`INTERNAL_ERROR_EXIT`).

Where a caller may need to tell cases apart, the error is a subclass that
also derives from the matching built-in (as zarr-python's ``errors.py`` does),
so ``except FileNotFoundError`` catches a missing input through the Python
API just as it would catch ``open()``'s.
"""

from __future__ import annotations

# sysexits.h EX_SOFTWARE: "an internal software error has been detected";
# distinct from 2 (a user error) and from 1 (what a crashed Python returns).
INTERNAL_ERROR_EXIT = 70
# sysexits.h EX_TEMPFAIL: "a temporary failure ... the user is invited to retry later": a run stopped
# on its batch system's warning signal with what --resume needs saved (cluster/*.sbatch requeue on it).
PREEMPTED_EXIT = 75


class N2VError(Exception):
    """A problem with the user's input, stated in one line.

    Parameters
    ----------
    message : str
        One line naming the problem (and, where useful, the fix).
    exit_code : int, optional
        Exit status the CLI returns for this error (default 2).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __str__(self) -> str:
        # OSError-derived subclasses would otherwise format their own way
        return str(self.args[0]) if self.args else ""


class InputNotFoundError(N2VError, FileNotFoundError):
    """An input (image, model directory, config file) does not exist."""


class UnreadableDataError(N2VError, ValueError):
    """The input cannot be used as it is: truncated, corrupt, bad metadata, NaN/Inf values."""


class AxesError(N2VError, ValueError):
    """The axes of the input are unknown, invalid, or contradict its metadata."""


class CollectionError(N2VError, ValueError):
    """The input is a collection of images (plate, container, folder) where one image is needed, or its images disagree."""


class IncompatibleModelError(N2VError, ValueError):
    """The model cannot be applied to this data (dimensions, channels, size), or its files are unusable."""


class UnvalidatedModelError(IncompatibleModelError):
    """The model directory holds no validated weights (its training stopped before the first validation)."""


class OutputExistsError(N2VError, FileExistsError):
    """The output already exists and neither ``overwrite`` nor ``resume`` was asked for."""


class LockHeldError(N2VError, BlockingIOError):
    """Another live run holds the lock of this output or model directory."""


class Preempted(N2VError):
    """A run stopped cleanly on a signal (SLURM's time-limit warning, preemption); ``--resume`` continues it."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT) -> None:
        super().__init__(message, exit_code)


class ConfigError(N2VError, ValueError):
    """A configuration value (CLI option, ``--config`` file, model ``config.yaml``) is invalid."""


def environment_problem(exc: BaseException) -> bool:
    """True for failures of the machine rather than of our code: I/O, memory, a lost dask worker.

    They become one-line errors like :class:`N2VError` (the user can act on
    them: free disk space, use smaller chunks, rerun with ``--resume``);
    anything else is a bug and keeps its traceback.
    """
    names = {t.__name__ for t in type(exc).__mro__}
    return isinstance(exc, (OSError, MemoryError)) or bool(names & {"KilledWorker", "OutOfMemoryError"})


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error."""
    return (str(exc).splitlines() or [""])[0]


def rephrased(exc: N2VError, message: str) -> N2VError:
    """The same kind of error as ``exc`` with another message (e.g. a prefix naming the block)."""
    return type(exc)(message, exc.exit_code)
