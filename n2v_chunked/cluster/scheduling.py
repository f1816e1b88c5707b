"""Scheduling: which dask scheduler runs the work, how cores are shared out, and how batches are fed to it.

:func:`scheduler_context` turns the user's ``scheduler`` into a local scheduler
name or a ``distributed.Client`` (through :func:`~n2v_chunked.cluster.client.cluster_client`);
:func:`run_local` and :func:`run_distributed` execute a stream of task batches
on it.  Torch gets the cores that dask's threads leave it (:func:`thread_layout`),
and on a multi-GPU machine each worker process drives its own GPU
(:func:`local_layout`, :func:`worker_device`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import dask
import numpy as np

from .client import cluster_client

# Local layouts (benchmarks/predict.py --compare-schedulers, 2 idle cores, 2048^2
# frames): one block per core with one torch thread each beat one block at a
# time with torch on both cores, in-process (0.49-0.51 vs 0.43-0.44 MPix/s) and
# as a LocalCluster (0.42-0.45 vs 0.40), at the cost of one block's activations
# (about 1.2 GB by default) per core.  None = one per core.
LOCAL_DASK_THREADS: int | None = None  # scheduler="threads": torch gets cores // threads each
LOCAL_WORKERS: int | None = None  # scheduler="local": LocalCluster processes of 1 thread each


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by SLURM's allocation.

    SLURM without a task/affinity or cgroup plugin leaves the mask at the whole
    node; ``SLURM_CPUS_PER_TASK`` then says what the job was given.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(ValueError):
        cpus = min(cpus, int(os.environ.get("SLURM_CPUS_PER_TASK", "")))
    return max(1, cpus)


def resolve_threads(threads: Any) -> int | None:
    """Torch threads for this process: an int, or ``{host: dask threads on host}`` from the client."""
    if not isinstance(threads, dict):
        return threads
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    cpus = usable_cpus()
    total = threads.get(get_address_host(worker.address), worker.state.nthreads)
    return max(1, cpus // max(1, total))


def thread_layout(sched: Any, read_ahead: int = 1) -> tuple[int, Any]:
    """``(dask threads of a local scheduler, torch threads per task)`` for scheduler ``sched``.

    Torch threads are an int on a local scheduler, or ``{host: dask threads on
    host}`` for a client, which each worker turns into its share (:func:`resolve_threads`).
    ``read_ahead`` multiplies a local threads scheduler's threads, not torch's:
    for a remote input, the extra tasks wait for their chunks while the others
    compute (a block's read is then hidden behind another block's network pass).
    """
    cpus = usable_cpus()
    compute = 1 if sched == "sync" else (LOCAL_DASK_THREADS or cpus)
    threads: Any = max(1, cpus // compute) if isinstance(sched, str) else host_threads(sched)
    return (compute if sched == "sync" else compute * read_ahead), threads


def run_local(batches: Iterator[list[Any]], done: Callable[[int], None], scheduler: str, threads: int,
              prefix: str = "n2v-write-") -> None:
    """Compute each batch of delayed tasks on a local scheduler.

    ``done(sum of the result)`` is called after each task whose key starts with ``prefix``.  The
    callback is given to this computation only, not made global (``with Callback()``): several
    threads may run images of a collection at once, each counting its own tasks.
    """

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith(prefix):
            done(int(np.sum(result)))

    for tasks in batches:
        dask.compute(*tasks, scheduler=scheduler, num_workers=threads, callbacks=[(None, None, None, posttask, None)])


def run_distributed(client: Any, batches: Iterator[list[Any]], done: Callable[[int], None], window: int) -> None:
    """Keep about two batches' futures in flight so workers never wait for the next graph.

    ``done(sum of the result)`` is called as each future completes.
    """
    from distributed import as_completed

    ac = as_completed(with_results=False)
    pending = 0
    live: set[Any] = set()
    exhausted = False

    def feed() -> None:
        nonlocal pending, exhausted
        while not exhausted and pending < window:
            tasks = next(batches, None)
            if tasks is None:
                exhausted = True
                return
            futures = client.compute(tasks)
            ac.update(futures)
            live.update(futures)
            pending += len(futures)

    feed()
    try:
        for fut in ac:
            pending -= 1
            live.discard(fut)
            # result() raises the task's error, and waits for a future that was lost with a dead
            # worker and is being recomputed (as_completed may yield it before it finishes again)
            done(int(np.sum(fut.result())))
            feed()
    finally:
        if live:
            client.cancel(list(live))


def default_client() -> Any:
    """The active ``distributed.Client``, or None (no client, or distributed not installed)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def host_threads(client: Any) -> dict[str, int]:
    """Dask threads per worker host, so each process gives torch its share of the cores."""
    out: dict[str, int] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        host = w.get("host", "")
        out[host] = out.get(host, 0) + int(w.get("nthreads", 1))
    return out


def local_layout(device: str | None = None) -> tuple[int | None, int]:
    """LocalCluster ``(worker processes, threads per worker)`` for predicting on ``device``.

    On CPU: one single-threaded process per core (:data:`LOCAL_WORKERS`).  On
    CUDA: one process per GPU, with the cores shared out as threads that read,
    pad and write blocks while the GPU computes.  One process per core would
    give every core its own CUDA context on the same GPU (about 0.5 GB each)
    and have them all size their batches from the same free memory.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 or (device is not None and not str(device).startswith("cuda")):
        return LOCAL_WORKERS, 1
    if device is not None and str(device).startswith("cuda:"):
        gpus = 1  # one named GPU
    return gpus, max(1, usable_cpus() // gpus)


def worker_device(device: str | None) -> str | None:
    """The torch device of this dask worker: a named one, else GPU ``worker name mod GPU count``.

    LocalCluster names its workers 0, 1, ...; with one process per GPU
    (:func:`local_layout`) each then drives its own GPU.
    """
    import torch

    if device is not None or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


@contextlib.contextmanager
def scheduler_context(
    scheduler: Any = None, *, jobqueue_config: str | None = None, jobs: int | None = None,
    device: str | None = None,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` or a local dask scheduler name.

    ``None`` uses the active distributed client if there is one, else local
    threads; ``"sync"``/``"threads"`` force a local scheduler; a ``Client`` is
    used as is; ``"local"``, ``"tcp://..."`` and ``"slurm"`` go through
    :func:`~n2v_chunked.cluster.client.cluster_client` (which prints the dashboard link).
    """
    if scheduler is None:
        client = default_client()
        yield client if client is not None else "threads"
        return
    if not isinstance(scheduler, str):
        yield scheduler
        return
    if scheduler in ("sync", "synchronous", "single-threaded"):
        yield "sync"
        return
    if scheduler == "threads":
        yield "threads"
        return
    kw: dict[str, Any] = {"jobqueue_config": jobqueue_config}
    if jobs is not None:
        kw["jobs"] = jobs
    if scheduler in ("local", ""):
        workers, threads = local_layout(device)
        kw.update(n_workers=workers, threads_per_worker=threads)
    cm = cluster_client(scheduler, **kw)
    with cm as client:
        yield client
