"""User-facing errors.

Every problem a user can cause (bad path, bad metadata, bad config, a model
that does not fit the data) is raised as :class:`N2VError` with one line that
names the problem.  The CLI prints that line and exits non-zero; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


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


def check(condition: bool, message: str) -> None:
    """Raise :class:`N2VError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise N2VError(message)
