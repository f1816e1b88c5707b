"""Prediction under kills, worker loss, a second run on the same output, and write errors.

``kill_and_resume`` is also what ``benchmarks/kill_resume.py`` repeats 20 times.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from n2v_chunked.io import lock as L
from n2v_chunked import prediction as P
from n2v_chunked.errors import N2VError
from n2v_chunked.io.ngff import read_multiscales
from n2v_chunked.io.ome import is_complete, write_ome_zarr
from n2v_chunked.io.sources import open_image
from n2v_chunked.prediction import blocks, run, writer

from helpers import make_model_dir, noisy

SUMMARY = re.compile(r"(\d+) block\(s\) computed, (\d+) skipped of (\d+)")


def _source(tmp: Path, shape=(4, 192, 192)) -> Path:
    src = tmp / "in.ome.zarr"
    if not src.exists():
        write_ome_zarr(src, xr.DataArray(noisy(shape), dims=("t", "y", "x")), chunks=(1, 64, 64), progress=False)
    return src


def _cli(src: Path, out: Path, model: Path, *extra: str, chunks: str = "1,32,32") -> list[str]:
    # the Python API's fp32 torch (the CLI's auto picks bf16 on AMX CPUs): outputs compare with P.predict's,
    # and chunk sizes and run times stay those the kill and write-error tests are sized for
    return [sys.executable, "-m", "n2v_chunked.cli", "predict", str(src), str(out), "--model-dir", str(model),
            "--chunks", chunks, "--scheduler", "sync", "--no-progress", "--precision", "fp32", "--runtime", "torch",
            *extra]


def _level0(out: Path) -> np.ndarray:
    return zarr.open_array(store=str(out / "0"), mode="r")[...]


def _chunk_files(out: Path, blocks: set[tuple[int, ...]]) -> dict[tuple[int, ...], int]:
    """mtime (ns) of the stored chunk of each block (blocks and output chunks coincide)."""
    meta = zarr.open_array(store=str(out / "0"), mode="r").metadata
    return {b: (out / "0" / meta.encode_chunk_key(b)).stat().st_mtime_ns for b in blocks}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_and_resume(tmp: Path, seed: int) -> dict:
    """SIGKILL ``n2v-chunked predict`` at a random block, rerun with ``--resume``, check everything.

    Returns the figures of the repetition: blocks at the kill, computed and
    skipped by the resumed run.
    """
    rnd = random.Random(seed)
    model = tmp / "model"
    if not model.exists():
        make_model_dir(model, features=8)
    src = _source(tmp)
    ref = tmp / "ref.zarr"
    if not ref.exists():
        subprocess.run(_cli(src, ref, model), env=_env(), check=True, capture_output=True, timeout=300)
    total = P.plan(P.get_model(model), open_image(str(src)), (1, 32, 32)).nblocks

    out = tmp / f"out{seed}.zarr"
    target = rnd.randint(1, total - 1)
    proc = subprocess.Popen(_cli(src, out, model), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(P.done_blocks(out)) < target:
        assert proc.poll() is None, f"finished before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no progress within 300 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    assert Path(L.lock_path(str(out))).exists()  # a kill leaves its lock behind ...
    done = P.done_blocks(out)
    assert target <= len(done) < total
    before = _chunk_files(out, done)

    # ... which the rerun on this host takes over, since its process is gone
    res = subprocess.run(_cli(src, out, model, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    computed, skipped, total_run = map(int, SUMMARY.search(res.stdout).groups())
    assert (skipped, computed, total_run) == (len(done), total - len(done), total)
    assert _chunk_files(out, done) == before  # no block written before the kill was written again
    assert is_complete(out) and not Path(L.lock_path(str(out))).exists()
    assert np.array_equal(_level0(out), _level0(ref))  # bit-identical to the uninterrupted run
    for level in ("1", "2"):
        if (ref / level).exists():
            assert np.array_equal(zarr.open_array(store=str(out / level))[...], zarr.open_array(store=str(ref / level))[...])
    return {"seed": seed, "blocks_total": total, "blocks_at_kill": len(done), "blocks_computed": computed,
            "blocks_skipped": skipped}


@pytest.fixture(scope="module")
def kill_dir(tmp_path_factory) -> Path:
    """One model, input and reference output for all repetitions."""
    return tmp_path_factory.mktemp("predict_kill")


@pytest.mark.parametrize("seed", [0, 1])
def test_prediction_survives_sigkill(kill_dir, seed):
    kill_and_resume(kill_dir, seed)


# ----------------------------------------------------------------------------
# A worker process dies mid-run.
# ----------------------------------------------------------------------------


def test_killed_worker_is_replaced_and_the_output_is_identical(tmp_path):
    from distributed import Client, LocalCluster

    model = make_model_dir(tmp_path / "m", features=8)
    src = _source(tmp_path)
    kw = dict(chunks=(1, 32, 32), progress=False, batch_blocks=16)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        ref = P.predict(str(src), str(tmp_path / "ref.zarr"), model, scheduler=client, **kw).values
        pids = client.run(os.getpid)
        out = tmp_path / "out.zarr"
        result: list = []
        errors: list = []

        def run() -> None:
            try:
                result.append(P.predict(str(src), str(out), model, scheduler=client, **kw))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 120
        while len(P.done_blocks(out)) < 3 and t.is_alive():
            assert time.time() < deadline
            time.sleep(0.005)
        at_kill = len(P.done_blocks(out))
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        t.join(300)
        assert not errors, errors
        total = result[0].attrs["predict_stats"]["blocks_total"]
        assert at_kill < total, "the run finished before the worker was killed"
        # the nanny replaced the dead worker
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()
    assert is_complete(out)
    assert np.array_equal(result[0].values, ref)


# ----------------------------------------------------------------------------
# Two runs on one output.
# ----------------------------------------------------------------------------


def test_second_prediction_on_the_same_output_refuses(tmp_path):
    model = make_model_dir(tmp_path / "m", features=8)
    src = _source(tmp_path, shape=(6, 192, 192))
    out = tmp_path / "out.zarr"
    first = subprocess.Popen(_cli(src, out, model), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not P.done_blocks(out):
        assert first.poll() is None, first.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    # a second run refuses while the first is alive: on the command line ...
    res = subprocess.run(_cli(src, out, model), env=_env(), capture_output=True, text=True, timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(err) == 1, res.stderr
    assert f"{out} is being written by a prediction (pid {first.pid} on {socket.gethostname()}" in err[0]
    # ... and whatever its flags
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(N2VError, match=f"being written by a prediction \\(pid {first.pid} "):
            P.predict(str(src), str(out), model, chunks=(1, 32, 32), scheduler="sync", progress=False, **flags)
    assert first.wait(300) == 0, first.stderr.read()[-2000:]
    assert is_complete(out) and not Path(L.lock_path(str(out))).exists()
    ref = P.predict(str(src), str(tmp_path / "ref.zarr"), model, chunks=(1, 32, 32), scheduler="sync", progress=False,
                    runtime="torch", precision="fp32")  # the engine _cli names
    assert np.array_equal(_level0(out), ref.values)  # the refused runs did not touch it


def test_stale_locks_are_taken_over(tmp_path, monkeypatch, caplog):
    model = make_model_dir(tmp_path / "m")
    src = _source(tmp_path, shape=(1, 64, 64))
    kw = dict(chunks=(1, 32, 32), scheduler="sync", progress=False)
    lock = Path(L.lock_path(str(tmp_path / "out.zarr")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    holders = {
        "dead process": {"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": now, "started": now},
        "silent host": {"host": "node-gone", "pid": 1, "heartbeat": now - L.STALE_AFTER_S - 1, "started": now - 9e3},
    }
    for name, holder in holders.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}.zarr"
        Path(L.lock_path(str(out))).write_text(json.dumps(holder))
        beat = holder["heartbeat"]
        os.utime(L.lock_path(str(out)), (beat, beat))  # a holder beats by touching its lock: a dead one does not
        with caplog.at_level("WARNING", logger="n2v_chunked.io.lock"):
            P.predict(str(src), str(out), model, **kw)
        assert is_complete(out) and not Path(L.lock_path(str(out))).exists()
        assert "taking over the lock" in caplog.text
    # a live holder elsewhere (recent heartbeat) is respected
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "heartbeat": time.time(), "started": time.time(),
                                "what": "a prediction", "slurm_job": "123"}))
    with pytest.raises(N2VError, match=r"being written by a prediction \(pid 1 on node-7, SLURM job 123"):
        P.predict(str(src), str(tmp_path / "out.zarr"), model, **kw)
    assert lock.exists() and not (tmp_path / "out.zarr").exists()
    # ... unless this is the same SLURM job, requeued
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    P.predict(str(src), str(tmp_path / "out.zarr"), model, **kw)
    assert not lock.exists()


def test_lock_heartbeat_keeps_it_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    out = str(tmp_path / "x.zarr")
    with L.output_lock(out) as held:
        path = held.path
        os.utime(path, (1.0, 1.0))
        time.sleep(0.3)
        assert os.stat(path).st_mtime > time.time() - 5  # touched again
        assert L.stale_reason(json.loads(Path(path).read_text()), time.time() + L.STALE_AFTER_S - 1,
                              os.stat(path).st_mtime) is None
        with pytest.raises(N2VError, match="being written"):
            with L.output_lock(out):
                pass
    assert not Path(path).exists()


def test_an_unreadable_lock_is_stale_only_after_a_grace_period(tmp_path, caplog):
    out = str(tmp_path / "x.zarr")
    lock = Path(L.lock_path(out))
    lock.write_bytes(b"")  # what a reader saw between the old O_EXCL create and its JSON write
    with pytest.raises(N2VError, match="unreadable lock .* younger than"):
        with L.output_lock(out):
            pass
    assert lock.read_bytes() == b""
    old = time.time() - L.UNREADABLE_GRACE_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="n2v_chunked.io.lock"):
        with L.output_lock(out) as held:
            assert json.loads(lock.read_text())["token"] == held.token
    assert "taking over the lock" in caplog.text and "unreadable" in caplog.text and not lock.exists()


def _contender(out: str, start, end, results) -> None:
    start.wait(30)
    try:
        with L.output_lock(out):
            results.put("won")
            end.wait(30)  # hold the lock until every contender has tried
    except N2VError:
        results.put("refused")
        end.wait(30)


def test_concurrent_acquire_has_exactly_one_winner(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    n = 4
    for round_ in range(25):
        out = str(tmp_path / f"o{round_}.zarr")
        start, end, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(out, start, end, results)) for _ in range(n)]
        for proc in procs:
            proc.start()
        got = sorted(results.get(timeout=60) for _ in range(n))
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        assert got == ["refused"] * (n - 1) + ["won"], (round_, got)
        assert not Path(L.lock_path(out)).exists()
        assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.stale"))


def test_release_leaves_another_runs_lock_alone(tmp_path):
    out = str(tmp_path / "x.zarr")
    other = json.dumps({"token": "theirs", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})
    with L.output_lock(out) as held:
        Path(held.path).write_text(other)  # taken over meanwhile
    assert Path(held.path).read_text() == other


def test_a_run_whose_lock_is_taken_over_stops_and_leaves_the_output_incomplete(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "m")
    src = _source(tmp_path, shape=(2, 128, 128))
    out = tmp_path / "out.zarr"
    lock = Path(L.lock_path(str(out)))
    thief = {"what": "a prediction", "token": "thief", "host": "node-9", "pid": 4242, "heartbeat": time.time(),
             "started": time.time()}
    real_block = P.predict_block

    def steal(*args, **kwargs):  # another run takes the lock over after this run's first block
        lock.write_text(json.dumps(thief))
        return real_block(*args, **kwargs)

    monkeypatch.setattr(blocks, "predict_block", steal)
    with pytest.raises(N2VError) as err:
        P.predict(str(src), str(out), model, chunks=(1, 32, 32), scheduler="sync", progress=False, batch_blocks=4)
    msg = str(err.value)
    assert "\n" not in msg and "now held by a prediction (pid 4242 on node-9" in msg and "no longer owns" in msg
    assert not is_complete(out) and len(P.done_blocks(out)) == 4  # stopped at the next group of blocks
    assert json.loads(lock.read_text())["token"] == "thief"  # and left the new holder's lock alone


def test_each_block_is_fsynced_before_its_marker(tmp_path, monkeypatch):
    """Survives a node loss: a marker is durable only after its chunk file and the folders naming both are;
    the pyramid before the complete flag, and the flag itself."""
    model = make_model_dir(tmp_path / "m")
    src = _source(tmp_path, shape=(1, 320, 320))
    out = tmp_path / "out.zarr"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    real_marker = writer.write_marker
    monkeypatch.setattr(writer, "write_marker",
                        lambda path: synced.append(f"marker {path}") or real_marker(path))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(run, "remove_markers", lambda path: None)  # keep them, to compare
    P.predict(str(src), str(out), model, chunks=(1, 64, 64), scheduler="sync", progress=False)
    meta = zarr.open_array(store=str(out / "0"), mode="r").metadata
    markers = sorted(P.done_blocks(out))
    assert len(markers) == 25
    first_marker = min(synced.index(f"marker {out / P.MARKER_DIR / writer._marker_name(b)}") for b in markers)
    assert {str(out / "zarr.json"), str(out / "0" / "zarr.json")} <= set(synced[:first_marker])
    for block in markers:
        chunk = out / "0" / meta.encode_chunk_key(block)
        marker = out / P.MARKER_DIR / writer._marker_name(block)
        assert chunk.exists()
        at = synced.index(f"marker {marker}")
        assert str(chunk) in synced[:at] and str(chunk.parent) in synced[:at]  # data durable before its marker
    pyramid = [str(f) for f in (out / "1").rglob("*") if f.is_file()]
    assert len(pyramid) > 1 and set(pyramid) <= set(synced)
    flag = len(synced) - 1 - synced[::-1].index(str(out / "zarr.json"))  # the group metadata, synced last
    assert max(synced.index(f) for f in pyramid) < flag and is_complete(out)


# ----------------------------------------------------------------------------
# The disk fills up, or a write fails.
# ----------------------------------------------------------------------------


def test_disk_full_names_the_output_stays_incomplete_and_resumes(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    model = make_model_dir(tmp_path / "m")
    src = _source(tmp_path, shape=(2, 128, 128))
    kw = dict(chunks=(1, 32, 32), scheduler="sync", progress=False)
    ref = P.predict(str(src), str(tmp_path / "ref.zarr"), model, **kw).values
    out = tmp_path / "out.zarr"
    real_set = LocalStore.set
    writes = []

    async def full_disk(self, key, value):
        if str(self.root).startswith(str(out)) and key.split("/")[-4:-3] == ["c"]:  # level 0's chunks
            writes.append(key)
            if len(writes) > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.root) / key))
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    with pytest.raises(N2VError) as err:
        P.predict(str(src), str(out), model, **kw)
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and str(out) in msg and "incomplete" in msg
    assert not is_complete(out) and len(P.done_blocks(out)) == 5
    assert not Path(L.lock_path(str(out))).exists()

    monkeypatch.setattr(LocalStore, "set", real_set)  # space freed
    res = P.predict(str(src), str(out), model, resume=True, **kw)
    assert res.attrs["predict_stats"]["blocks_skipped"] == 5
    assert is_complete(out) and np.array_equal(res.values, ref)


def test_a_real_write_error_is_one_line_and_leaves_the_output_incomplete(tmp_path):
    """The OS refuses the first chunk (RLIMIT_FSIZE below a chunk's size): one line, exit != 0."""
    import resource

    model = make_model_dir(tmp_path / "m")
    src = _source(tmp_path, shape=(1, 256, 256))
    out = tmp_path / "out.zarr"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))  # metadata fits, a 128^2 chunk does not

    res = subprocess.run(_cli(src, out, model, chunks="1,128,128"), env=_env(), capture_output=True, text=True,
                         preexec_fn=limit, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith("n2v-chunked: error: prediction stopped") and str(out) in err[0]
    assert "File too large" in err[0] and "incomplete" in err[0]
    assert out.exists() and not is_complete(out)


# ----------------------------------------------------------------------------
# A kill at every phase after level 0: creation, pyramid, its metadata, the complete flag.
# ----------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the code under test catches it."""


def _kill_at(monkeypatch, phase: str) -> None:
    """Make the first call of ``phase`` die, as a kill at that point would."""
    import zarr.core.group as zg

    from n2v_chunked.io import pyramid

    def once(obj, name, when=lambda *a, **k: True):
        real = getattr(obj, name)

        def dying(*args, **kwargs):
            if when(*args, **kwargs):
                monkeypatch.setattr(obj, name, real)
                raise _Killed(phase)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, dying)

    if phase == "level 0 created":  # the group exists, its level 0 not yet
        once(zg.Group, "create_array", lambda self, name, **k: name == "0")
    elif phase.startswith("pyramid level"):  # that level's array exists and is partly written
        def half_written(data, arr, progress=True, desc=""):
            if desc == phase:
                arr[(slice(0, 1),) * arr.ndim] = 1.0
                return True
            return False
        once(pyramid, "store_blocks", half_written)
    elif phase == "pyramid metadata":
        once(pyramid, "write_multiscales")
    elif phase == "complete flag":
        once(run, "mark_complete")
    elif phase == "marker removal":
        once(run, "remove_markers")


@pytest.fixture(scope="module")
def pyramid_case(tmp_path_factory):
    """A model, a 2-frame 544^2 input (three pyramid levels) and its uninterrupted prediction."""
    tmp = tmp_path_factory.mktemp("pyramid_kill")
    model = make_model_dir(tmp / "m")
    src = _source(tmp, shape=(2, 544, 544))
    ref = tmp / "ref.zarr"
    P.predict(str(src), str(ref), model, chunks=(1, 136, 136), scheduler="sync", progress=False)
    assert (ref / "2").exists()
    return tmp, model, src, ref


@pytest.mark.parametrize("phase", ["level 0 created", "pyramid level 1", "pyramid level 2", "pyramid metadata",
                                   "complete flag", "marker removal"])
def test_a_kill_at_any_phase_resumes_without_recomputing(pyramid_case, monkeypatch, phase):
    tmp, model, src, ref = pyramid_case
    out = tmp / f"out_{phase.replace(' ', '_')}.zarr"
    kw = dict(chunks=(1, 136, 136), scheduler="sync", progress=False)
    calls = []
    real_block = P.predict_block
    monkeypatch.setattr(blocks, "predict_block", lambda *a, **k: calls.append(1) or real_block(*a, **k))
    _kill_at(monkeypatch, phase)
    with pytest.raises(_Killed):
        P.predict(str(src), str(out), model, **kw)
    if phase == "marker removal":
        assert is_complete(out)
    else:
        assert not is_complete(out)
    done = P.done_blocks(out)
    total = P.plan(P.get_model(model), open_image(str(src)), kw["chunks"]).nblocks
    assert len(done) == len(calls) == (0 if phase == "level 0 created" else total)
    calls.clear()
    res = P.predict(str(src), str(out), model, resume=True, **kw)
    assert len(calls) == total - len(done)  # no level-0 block written before the kill was computed again
    assert is_complete(out) and not (out / P.MARKER_DIR).exists()
    group = zarr.open_group(str(out), mode="r")
    assert read_multiscales(group) == read_multiscales(zarr.open_group(str(ref), mode="r"))
    for level in ("0", "1", "2"):
        assert np.array_equal(group[level][...], zarr.open_array(store=str(ref / level))[...])
    assert not (out / "3").exists()
    assert res.attrs["predict_stats"]["blocks_computed"] == len(calls)
