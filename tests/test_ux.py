"""What a user sees (issue 19): quiet logs, progress in batch logs, Ctrl-C,
a wrong scheduler address, messages, the JupyterHub dashboard link."""

from __future__ import annotations

import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from n2v_chunked.cluster import progress as prog
from n2v_chunked.cli import main
from n2v_chunked.errors import N2VError

from helpers import make_model_dir, noisy

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m n2v_chunked.cli`` with stdout and stderr piped (no terminal, as in a batch job)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "n2v_chunked.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A 2D model with random weights and a 128 x 128 TIFF."""
    root = tmp_path_factory.mktemp("ux")
    tifffile.imwrite(root / "in.tif", noisy((128, 128)))
    return make_model_dir(root / "m"), root / "in.tif"


# ----------------------------------------------------------------------------
# progress.py
# ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_prints_a_line_per_interval_without_a_terminal(monkeypatch):
    monkeypatch.setattr(prog, "_interval", None)
    monkeypatch.setenv("N2V_PROGRESS_INTERVAL", "10")
    out, clock = io.StringIO(), Clock()
    p = prog.Progress(100, "predicting", "block", stream=out, tty=False, clock=clock)
    for _ in range(40):  # 40 blocks, one per second
        clock.t += 1.0
        p.update(1, "1.00 MPix/s")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "predicting: 10/100 blocks (10%), 1 blocks/s, ETA 1m30s; 1.00 MPix/s"
    assert len(lines) == 4  # at 10, 20, 30, 40 s; close adds none (nothing new since)
    assert lines[-1].startswith("predicting: 40/100 blocks (40%)")


def test_progress_percent_interval_and_resumed_start(monkeypatch):
    monkeypatch.setattr(prog, "_interval", None)
    prog.set_interval("25%")
    out, clock = io.StringIO(), Clock()
    p = prog.Progress(100, "train", "step", initial=20, stream=out, tty=False, clock=clock)
    for _ in range(80):
        clock.t += 0.5
        p.update(1, {"loss": "0.1000"})
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["train: 20/80 steps (25%)", "train: 40/80 steps (50%)",
                                                   "train: 60/80 steps (75%)", "train: 80/80 steps (100%)"]
    assert lines[0].endswith("; loss 0.1000")


@pytest.mark.parametrize("bad", ["0", "-5", "abc", "150%"])
def test_progress_interval_refuses_nonsense(bad):
    with pytest.raises(N2VError, match="--progress-interval"):
        prog.set_interval(bad)


def test_format_duration():
    assert [prog.format_duration(s) for s in (7, 121, 3725)] == ["7s", "2m01s", "1h02m"]


def test_predict_and_train_print_progress_lines_without_a_terminal(small, tmp_path):
    model, tif = small
    res = cli("predict", str(tif), str(tmp_path / "o.ome.zarr"), "--model-dir", str(model), "--axes", "yx",
              "--scheduler", "threads", "--chunks", "32,32", "--progress-interval", "25%", "--no-pyramid")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("predicting: ")]
    assert [ln.split(" (")[0] for ln in lines] == ["predicting: 4/16 blocks", "predicting: 8/16 blocks",
                                                    "predicting: 12/16 blocks", "predicting: 16/16 blocks"]
    assert "ETA" in lines[0] and "MPix/s" in lines[0]
    res = cli("train", str(tif), "--axes", "yx", "--model-dir", str(tmp_path / "m"), "--steps", "4",
              "--batch-size", "4", "--features", "4", "--patch", "32,32", "--val-interval", "2",
              "--precision", "fp32", "--progress-interval", "50%")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("train: ")]
    assert [ln.split(" (")[0] for ln in lines] == ["train: 2/4 steps", "train: 4/4 steps"]
    assert "\r" not in res.stderr  # no bar redrawn into a log file


# ----------------------------------------------------------------------------
# Logs, Ctrl-C
# ----------------------------------------------------------------------------


def test_predict_on_a_local_cluster_prints_link_progress_and_result_only(small, tmp_path):
    model, tif = small
    out = tmp_path / "o.ome.zarr"
    res = cli("predict", str(tif), str(out), "--model-dir", str(model), "--axes", "yx", "--scheduler", "local")
    assert res.returncode == 0, res.stderr
    err = res.stderr.splitlines()
    assert err[0].startswith("n2v-chunked: local dask cluster with ") and "dask dashboard: http" in err[0]
    assert all(ln.startswith("predicting: ") for ln in err[1:]), res.stderr
    assert "distributed" not in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.startswith(f"n2v-chunked: wrote {out}: 1 block(s) computed")


def test_ctrl_c_gives_one_line_and_exit_130(small, tmp_path):
    model, _ = small
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, noisy((1024, 1024)))
    out = tmp_path / "o.ome.zarr"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen(
        [sys.executable, "-m", "n2v_chunked.cli", "predict", str(tif), str(out), "--model-dir", str(model),
         "--axes", "yx", "--scheduler", "local", "--chunks", "32,32", "--progress-interval", "1%"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    first = p.stderr.readline()  # the dashboard link: the cluster is up
    assert "dask dashboard" in first
    second = p.stderr.readline()  # a progress line: blocks are being computed
    assert second.startswith("predicting: ")
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
    rest = p.stderr.read()
    assert p.wait(timeout=120) == 130
    lines = [ln for ln in rest.splitlines() if not ln.startswith("predicting: ")]
    assert lines == [f"n2v-chunked: interrupted; {out} stays marked incomplete, rerun with --resume to finish it"]
    assert not Path(f"{out}.lock").exists()


# ----------------------------------------------------------------------------
# A scheduler address that is not a dask scheduler
# ----------------------------------------------------------------------------


def test_scheduler_recovery_chatter_and_shutdown_warnings_stay_out_of_the_log(capfd):
    """A heartbeat from a worker the scheduler already dropped is its own recovery, never the user's
    news; after Ctrl-C only errors of distributed remain (the flaky line CI once caught)."""
    import logging

    from n2v_chunked.cli.logs import quiet_shutdown, setup_logging

    saved = {n: logging.getLogger(n).level
             for n in ("distributed", "dask", "tornado", "tornado.application", "asyncio", "n2v_chunked")}
    try:
        setup_logging()
        sched = logging.getLogger("distributed.scheduler")
        sched.warning("Received heartbeat from unregistered worker 'tcp://127.0.0.1:1'.")
        sched.warning("Worker tcp://127.0.0.1:1 failed 3 times")  # news: kept
        logging.getLogger("n2v_chunked.x").warning("Received heartbeat from unregistered worker")  # ours: kept
        err = capfd.readouterr().err.splitlines()
        assert err == ["n2v-chunked: warning: Worker tcp://127.0.0.1:1 failed 3 times",
                       "n2v-chunked: warning: Received heartbeat from unregistered worker"]
        quiet_shutdown()
        sched.warning("Removing worker 'tcp://127.0.0.1:1' caused the cluster to lose scattered data")
        # distributed's sync() cut short by Ctrl-C: its cancel callback fails in the loop (CI caught it once)
        logging.getLogger("tornado.application").error("Exception in callback functools.partial(cancel)")
        logging.getLogger("n2v_chunked.x").error("ours")
        assert capfd.readouterr().err.splitlines() == ["n2v-chunked: error: ours"]
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def test_distributed_imported_after_setup_keeps_tornado_quiet():
    """distributed sets its loggers' levels at import, which comes after our setup in a CLI run."""
    code = ("import logging; from n2v_chunked.cli.logs import setup_logging; setup_logging(); import distributed; "
            "print(logging.getLogger('tornado.application').level, logging.getLogger('distributed').level)")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("DASK_LOGGING", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["50", "30"], out.stderr


def test_ctrl_c_handler_quiets_then_interrupts(monkeypatch):
    import logging

    from n2v_chunked.cli import commands as cli_mod

    monkeypatch.setattr(signal, "signal", lambda sig, fn: handlers.__setitem__(sig, fn))
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    handlers: dict = {}
    names = ("distributed", "dask", "tornado", "tornado.application", "asyncio")
    saved = {n: logging.getLogger(n).level for n in names}
    logging.getLogger("n2v_chunked").setLevel(logging.WARNING)
    try:
        cli_mod._quiet_on_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            handlers[signal.SIGINT](signal.SIGINT, None)
        assert all(logging.getLogger(n).level > logging.CRITICAL for n in names)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def test_http_server_as_scheduler_fails_in_one_line_without_a_lock(small, tmp_path):
    model, tif = small
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "o.ome.zarr"
        res = cli("predict", str(tif), str(out), "--model-dir", str(model), "--axes", "yx",
                  "--scheduler", f"tcp://127.0.0.1:{srv.server_address[1]}", timeout=120)
    finally:
        srv.shutdown()
    assert res.returncode == 2
    assert res.stderr.splitlines() == [res.stderr.strip()]
    assert "is not a dask scheduler" in res.stderr and "8786" in res.stderr
    assert not out.exists() and not Path(f"{out}.lock").exists()


# ----------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------


def test_chunks_message_names_the_axes_once(small, tmp_path, capfd):
    model, _ = small
    tif = tmp_path / "z.tif"
    tifffile.imwrite(tif, noisy((4, 32, 32)), photometric="minisblack")
    m3 = make_model_dir(tmp_path / "m3", dims=3)
    rc = main(["predict", str(tif), str(tmp_path / "o.ome.zarr"), "--model-dir", str(m3), "--axes", "zyx",
               "--chunks", "4,32", "--scheduler", "sync"])
    err = capfd.readouterr().err
    assert rc == 2 and err.strip() == "n2v-chunked: error: chunks [4, 32] must give 3 sizes, one per axis zyx"


def test_negative_chunks_give_one_line_not_a_usage_dump(small, tmp_path, capfd):
    model, tif = small
    rc = main(["predict", str(tif), str(tmp_path / "o.ome.zarr"), "--model-dir", str(model), "--axes", "yx",
               "--chunks", "-8,32", "--scheduler", "sync"])
    err = capfd.readouterr().err
    assert rc == 2 and err.strip() == "n2v-chunked: error: --chunks must be positive integers; got '-8,32'"
    rc = main(["convert", str(tif), str(tmp_path / "c.ome.zarr"), "--axes", "yx", "--chunks", "-8,32"])
    err = capfd.readouterr().err
    assert rc == 2 and err.strip() == "n2v-chunked: error: --chunks must be positive integers; got '-8,32'"


def test_argparse_errors_are_one_line(capfd):
    rc = main(["predict", "in.tif"])
    err = capfd.readouterr().err
    assert rc == 2 and "usage:" not in err
    assert err.strip() == ("n2v-chunked: error: the following arguments are required: output, --model/--model-dir "
                           "(see n2v-chunked predict --help)")


def test_info_on_an_incomplete_output_says_how_much_is_written(tmp_path, capfd):
    from n2v_chunked.io.ome import create_ome_zarr

    out = str(tmp_path / "o.ome.zarr")
    arr = create_ome_zarr(out, (64, 64), ("y", "x"), dtype="float32", chunks=(32, 32),
                          provenance={"command": "predict"})
    import zarr

    zarr.open_array(store=f"{out}/0", mode="r+")[:32, :32] = 1.0
    assert main(["info", out]) == 0
    text = capfd.readouterr().out
    assert "INCOMPLETE: 1 of 4 chunks of level 0 written, 25%" in text
    assert "x that in memory" not in text
    del arr


def test_convert_says_what_it_wrote(small, tmp_path, capfd):
    _, tif = small
    out = tmp_path / "c.ome.zarr"
    assert main(["convert", str(tif), str(out), "--axes", "yx", "--no-progress"]) == 0
    line = capfd.readouterr().out.strip()
    assert line.startswith(f"n2v-chunked: wrote {out}: axes yx, shape 128 x 128, float32, 1 level(s), ")
    assert "on disk" in line


# ----------------------------------------------------------------------------
# JupyterHub
# ----------------------------------------------------------------------------


def test_dashboard_link_goes_through_the_jupyterhub_proxy(monkeypatch):
    import dask
    from distributed.utils import format_dashboard_link

    from n2v_chunked.cluster.common import _hub_link, dashboard_link_template

    assert dashboard_link_template({}) is None
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    with _hub_link():
        assert format_dashboard_link("10.1.2.3", 8787) == "/user/alice/proxy/8787/status"
    assert format_dashboard_link("10.1.2.3", 8787) == "http://10.1.2.3:8787/status"
    with dask.config.set({"distributed.dashboard.link": "https://my.hub/{port}"}), _hub_link():
        assert format_dashboard_link("h", 1) == "https://my.hub/1"  # a link the user set wins


# ----------------------------------------------------------------------------
# predict(..., scheduler="local") from a script
# ----------------------------------------------------------------------------

SCRIPT = """
from n2v_chunked.prediction import predict
{guard}predict({src!r}, {out!r}, {model!r}, axes="yx", scheduler="local", progress=False, pyramid=False)
{guard}print("done")
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_script_without_main_guard_says_so(small, tmp_path, guarded):
    model, tif = small
    out = tmp_path / "o.ome.zarr"
    guard = 'if __name__ == "__main__":\n    ' if guarded else ""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(guard=guard, src=str(tif), out=str(out), model=str(model)))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env,
                         cwd=tmp_path)
    if guarded:
        assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr
        return
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last == (f"n2v_chunked.errors.N2VError: the local dask cluster's worker processes import {script} "
                    "again, which calls predict() again: put the script's work under "
                    "`if __name__ == \"__main__\":` (see the README, Python)")
    assert "Nanny failed to start" not in res.stderr
    assert not Path(f"{out}.lock").exists()


def test_cluster_client_link_under_jupyterhub(local_cluster, monkeypatch, caplog):
    import logging

    from n2v_chunked.cluster import cluster_client

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    port = local_cluster.scheduler.http_server.port
    with caplog.at_level(logging.INFO, logger="n2v_chunked.announce"):
        with cluster_client(local_cluster.scheduler_address) as client:
            assert client.dashboard_link == f"/user/alice/proxy/{port}/status"  # what a notebook prints
    assert f"dask dashboard: /user/alice/proxy/{port}/status" in caplog.text


def test_convert_prints_progress_lines_without_a_terminal(small, tmp_path):
    _, tif = small
    res = cli("convert", str(tif), str(tmp_path / "c.ome.zarr"), "--axes", "yx", "--chunks", "32,32",
              "--progress-interval", "50%", "--no-pyramid")
    assert res.returncode == 0, res.stderr
    lines = [ln.split(" (")[0] for ln in res.stderr.splitlines()]
    assert lines and all(ln.startswith("writing level 0: ") for ln in lines), res.stderr
    done, total = lines[-1].split(": ")[1].split(" ")[0].split("/")
    assert done == total  # blocks are written several chunks at a time: their count depends on the layout
