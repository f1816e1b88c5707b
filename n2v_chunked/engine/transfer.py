"""Moving data between the host and a GPU without stalling it.

What a CUDA device needs and a CPU does not; on a CPU every function here is
a no-op (or the plain operation), so CPU results are unchanged and CPU-only
machines never touch CUDA:

- page-locked (pinned) host buffers, so that copies run asynchronously
  (:func:`host_empty`, guarded by ``torch.cuda.is_available()``);
- copies on a side stream of the calling thread (:func:`to_device`,
  :func:`to_host`): the compute stream waits for an event, not the whole
  device, so one block's copies overlap another block's compute;
- a loss read one step late (:class:`LateScalar`): reading each step's loss
  at once would make the host wait for that step, and the GPU would idle
  while the next step is queued.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

_LOCAL = threading.local()  # each thread's side stream per device


def host_empty(shape: Sequence[int], pin: bool) -> torch.Tensor:
    """An uninitialised float32 host tensor, page-locked when ``pin`` and CUDA is present."""
    return torch.empty(tuple(shape), dtype=torch.float32, pin_memory=pin and torch.cuda.is_available())


def pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t`` in page-locked memory when ``pin`` and CUDA is present, else ``t`` itself."""
    return t.pin_memory() if pin and torch.cuda.is_available() and not t.is_pinned() else t


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    streams = getattr(_LOCAL, "streams", None)
    if streams is None:
        streams = _LOCAL.streams = {}
    key = str(device)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device)
    return streams[key]


def to_device(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``x`` to ``device`` on this thread's side stream.

    Returns the device tensor and the event that marks the copy's end (None
    when nothing was copied: a CPU device, or ``x`` already there).  Pass
    both to :func:`ready` on the stream that uses the tensor.
    """
    if device.type != "cuda" or x.device == device:
        return x.to(device), None
    host = pinned(x, True)
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        y = host.to(device, non_blocking=True)
    return y, stream.record_event()


def ready(x: torch.Tensor, event: torch.cuda.Event | None) -> torch.Tensor:
    """``x`` from :func:`to_device`, usable on the current stream once its copy has landed (no host wait)."""
    if event is not None:
        stream = torch.cuda.current_stream(x.device)
        stream.wait_event(event)
        x.record_stream(stream)  # allocated on the side stream: not reused before this stream is done with it
    return x


def compute_done(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on ``device``'s current stream (None on CPU)."""
    return torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None


def to_host(y: torch.Tensor, done: torch.cuda.Event | None) -> np.ndarray:
    """``y`` as a numpy array, copied on this thread's side stream once ``done`` (:func:`compute_done`) has passed."""
    if y.device.type != "cuda":
        return y.numpy()
    stream = _side_stream(y.device)
    if done is not None:
        stream.wait_event(done)
    out = host_empty(y.shape, pin=True)
    with torch.cuda.stream(stream):
        out.copy_(y, non_blocking=True)
    y.record_stream(stream)
    stream.synchronize()  # this thread only: other threads' compute goes on
    return out.numpy()


class LateScalar:
    """A scalar of each step, read one step later so that the host never waits for the step it just queued.

    :meth:`push` queues this step's value (an asynchronous copy into pinned
    memory on CUDA) and returns the previous step's, whose copy has long
    landed while this step was being queued; :meth:`flush` returns the
    pending one now (before a checkpoint, a validation or the end).
    """

    def __init__(self) -> None:
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, step: int, value: torch.Tensor) -> tuple[int, float] | None:
        """Queue ``value`` of ``step``; return ``(step, value)`` of the previous push, or None."""
        previous = self.flush()
        value = value.detach()
        if value.device.type == "cuda":
            host = host_empty(value.shape, pin=True)
            host.copy_(value, non_blocking=True)
            self._pending = (step, host, torch.cuda.current_stream(value.device).record_event())
        else:
            self._pending = (step, value, None)
        return previous

    def flush(self) -> tuple[int, float] | None:
        """``(step, value)`` of the pending push, waiting for it if needed; None when nothing is pending."""
        if self._pending is None:
            return None
        step, value, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return step, float(value)
