"""Stopping cleanly when a batch system warns that a job is about to end.

SLURM sends a signal some time before a job's time limit when the job asks
for it (``#SBATCH --signal=B:USR1@120`` in ``cluster/*.sbatch``, which pass
it on to n2v-chunked), and SIGTERM when it preempts or cancels the job.
While :func:`handlers` is active such a signal only records the request:

* training checks :func:`requested` where it checks its other stop
  conditions, finishes the current step, saves its training state and
  raises :class:`~n2v_chunked.errors.Preempted` (exit status
  :data:`~n2v_chunked.errors.PREEMPTED_EXIT`), so that ``train --resume``
  continues exactly;
* prediction (``interrupt=True``) is interrupted at once, as by Ctrl-C, and
  leaves the output marked incomplete: its per-block markers are written
  after the block's data, so ``predict --resume`` finishes it exactly.

The batch script then requeues the job (``scontrol requeue``) and the
requeued job resumes.  SIGTERM is taken over only inside a SLURM job
(``SLURM_JOB_ID`` set), and a second SIGTERM kills the process as Python's
default does; SIGINT (Ctrl-C) is never touched.  Under ``torchrun``
:func:`requested` is agreed on by all ranks, so they stop at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)

_requested: str | None = None  # name of the signal that asked to stop
_group: Any = None  # the CPU process group that ranks agree on through (torchrun)


def requested() -> bool:
    """Whether a stop was asked for; under ``torchrun``, whether any rank was asked (a collective call)."""
    if _group is None:
        return _requested is not None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if _requested is None else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)  # on the CPU: no wait for the GPU
    return bool(flag.item())


def signal_name() -> str:
    """The signal that asked to stop (``"a signal"`` when another rank received it)."""
    return _requested or "a signal"


@contextlib.contextmanager
def handlers(interrupt: bool = False) -> Iterator[None]:
    """Record SIGUSR1 (and, inside a SLURM job, SIGTERM) as a request to stop while the block runs.

    Parameters
    ----------
    interrupt : bool
        Also raise :class:`KeyboardInterrupt` in the main thread, as Ctrl-C
        would (prediction); without it the code polls :func:`requested`
        (training).

    Notes
    -----
    Outside the main thread (where Python allows no handlers) nothing is
    installed.  The previous handlers come back when the block ends.
    """
    global _requested, _group
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGUSR1] + ([signal.SIGTERM] if os.environ.get("SLURM_JOB_ID") else [])

    def on_signal(signum: int, frame: Any) -> None:
        global _requested
        name = signal.Signals(signum).name
        if _requested is not None and signum == signal.SIGTERM:  # asked twice: die as Python would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _requested is None:
            _requested = name
            log.warning("received %s: stopping cleanly so that --resume can continue", name)
            if interrupt:
                raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in wanted}
    try:
        _group = _cpu_group()  # collective: every rank enters here, before training
        yield
    finally:
        _group = None
        for s, h in old.items():
            signal.signal(s, h)


def _cpu_group() -> Any:
    """Under ``torchrun``, a gloo group of all ranks (the flag is reduced on the CPU, also next to NCCL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None
