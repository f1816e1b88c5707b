"""The stop signals of a batch system (n2v_chunked.cluster.preemption): only what they must change changes."""

import os
import signal
import subprocess
import sys

import pytest

from n2v_chunked.cluster import preemption


def test_outside_slurm_only_sigusr1_is_taken_over(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with preemption.handlers():
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]  # a plain kill still kills
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # Ctrl-C as ever
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() and preemption.signal_name() == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in before} == before


def test_inside_slurm_a_first_sigterm_asks_to_stop_and_a_second_kills():
    code = (
        "import os, signal, time\n"
        "from n2v_chunked.cluster import preemption\n"
        "with preemption.handlers():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('asked', preemption.requested(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('survived')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SLURM_JOB_ID": "1"})
    assert res.stdout.split() == ["asked", "True"] and res.returncode == -signal.SIGTERM, res.stderr


@pytest.mark.parametrize("interrupt", [False, True])
def test_prediction_is_interrupted_at_once_training_polls(interrupt):
    raised = False
    try:
        with preemption.handlers(interrupt=interrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            signal.sigtimedwait([], 0)  # let the handler run
    except KeyboardInterrupt:
        raised = True
    assert raised == interrupt and preemption.requested()
