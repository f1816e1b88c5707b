"""Where the dask computation runs: a local cluster, an existing scheduler, or SLURM.

Every scheduler concern lives here:

- :mod:`~n2v_chunked.cluster.client`: :func:`cluster_client`, a local cluster or an existing scheduler;
- :mod:`~n2v_chunked.cluster.slurm`: the ``jobqueue: slurm:`` YAML file and SLURM clusters;
- :mod:`~n2v_chunked.cluster.common`: the dashboard link, teardown, the ``__main__`` guard;
- :mod:`~n2v_chunked.cluster.scheduling`: which scheduler a run uses (:func:`scheduler_context`),
  cores and GPUs per worker, feeding batches of tasks to it;
- :mod:`~n2v_chunked.cluster.preemption`: a batch system's time-limit warning or preemption
  (SIGUSR1/SIGTERM) turned into a clean, resumable stop.
- :mod:`~n2v_chunked.cluster.worker_setup`: preloaded into local workers (they ignore Ctrl-C);
- :mod:`~n2v_chunked.cluster.progress`: progress of long runs, a bar on a terminal and lines in a
  batch job's log (used by io's writers, training and prediction, so it lives down here).

:func:`cluster_client` is the one entry point.  It is a context manager that
yields a :class:`distributed.Client` and owns the life of whatever cluster it
started: the cluster is closed when the ``with`` block ends, also on an
exception or Ctrl-C (for SLURM that cancels the worker jobs).

``scheduler`` selects the cluster:

``None`` or ``"local"``
    A :class:`distributed.LocalCluster` of worker processes on this machine.
``"tcp://host:8786"`` (any ``scheme://`` address, or plain ``host:port``)
    An existing scheduler (``dask scheduler``, another cluster); it is left
    running at the end.  A path to a ``scheduler.json`` (``dask scheduler
    --scheduler-file``) works too.
``"slurm"``
    A :class:`dask_jobqueue.SLURMCluster`: every worker is a SLURM job.  Its
    settings come from a ``jobqueue: slurm:`` YAML file (``jobqueue_config``;
    default: the packaged copy of ``cluster/jobqueue.yaml``).

The dashboard link is logged at INFO level on the ``n2v_chunked.announce`` logger
(shown by the command line by default) as soon as the client connects; under
JupyterHub it goes through the hub's proxy (:func:`~n2v_chunked.cluster.common.dashboard_link_template`).
"""

from .client import cluster_client
from .common import check_not_spawn_reimport, dashboard_link_template
from .scheduling import default_client, local_layout, scheduler_context, usable_cpus, worker_device
from .slurm import DEFAULT_JOBQUEUE_CONFIG, read_jobqueue_config

__all__ = [
    "DEFAULT_JOBQUEUE_CONFIG", "check_not_spawn_reimport", "cluster_client", "dashboard_link_template",
    "default_client", "local_layout", "read_jobqueue_config", "scheduler_context", "usable_cpus", "worker_device",
]
