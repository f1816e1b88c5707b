"""Object stores end to end (issue 17), against a real S3 server on 127.0.0.1.

The server is moto's standalone server with IAM authentication (``s3``
fixture, tests/s3server.py); a fault-injecting proxy sits in front of it for
the retry tests, and a local ``http.server`` serves an OME-Zarr folder for the
read-only URL test.  Images are tiny and training runs two steps, so the file
stays within about a minute on two cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import xarray as xr

from n2v_chunked.errors import OutputExistsError
from n2v_chunked.io import objects, stores
from n2v_chunked.cli import main
from n2v_chunked.io.ome import write_ome_zarr
from n2v_chunked.io.sources import open_image

from helpers import make_model_dir, noisy
from s3server import FaultProxy, serve_folder

PREFIX = "n2v-chunked: error:"
FAST_TRAIN = ["--steps", "2", "--batch-size", "4", "--patch", "32,32", "--features", "4", "--val-interval", "2",
              "--precision", "fp32", "--no-progress", "--seed", "0"]
SUMMARY = re.compile(r"(\d+) block\(s\) computed, (\d+) skipped of (\d+)")


def _bucket(s3, name: str) -> str:
    client = s3.client()
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)
    return name


def _predict(src: str, out: str, model: Path, *extra: str) -> list[str]:
    return ["predict", src, out, "--model-dir", str(model), "--chunks", "1,32,32", "--scheduler", "sync",
            "--no-progress", "--no-pyramid", *extra]


def _values(url: str) -> np.ndarray:
    return np.asarray(open_image(url).values)


def _objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _one_error_line(capfd) -> str:
    err = [l for l in capfd.readouterr().err.strip().splitlines() if l]
    assert err and err[-1].startswith(PREFIX), err
    assert not any("Traceback" in l for l in err), err
    return err[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("s3")
    tif = tmp / "img.tif"
    tifffile.imwrite(tif, noisy((3, 64, 64)), photometric="minisblack", metadata={"axes": "TYX"})
    model = make_model_dir(tmp / "model", features=4)
    return {"tmp": tmp, "tif": tif, "model": model}


def test_convert_info_train_predict_through_s3_equal_local_and_no_secret_leaks(s3_env, files, tmp_path, capfd,
                                                                                monkeypatch):
    s3 = s3_env
    _bucket(s3, "data")
    key, secret = s3.admin
    local = tmp_path / "img.ome.zarr"
    assert main(["convert", str(files["tif"]), str(local), "--axes", "tyx"]) == 0
    assert main(["convert", str(files["tif"]), "s3://data/img.ome.zarr", "--axes", "tyx"]) == 0
    assert main(["info", "s3://data/img.ome.zarr"]) == 0
    assert "complete" in capfd.readouterr().out
    np.testing.assert_array_equal(_values("s3://data/img.ome.zarr"), _values(str(local)))

    # Training streams from the bucket exactly as from disk.
    assert main(["-v", "train", "s3://data/img.ome.zarr", "--model-dir", str(tmp_path / "m_s3"), *FAST_TRAIN]) == 0
    assert main(["train", str(local), "--model-dir", str(tmp_path / "m_local"), *FAST_TRAIN]) == 0
    w_s3 = torch.load(tmp_path / "m_s3" / "weights_best.pt", weights_only=True, map_location="cpu")
    w_loc = torch.load(tmp_path / "m_local" / "weights_best.pt", weights_only=True, map_location="cpu")
    w_s3, w_loc = (w.get("model", w) if isinstance(w, dict) else w for w in (w_s3, w_loc))
    for name, t in w_loc.items():
        if torch.is_tensor(t):
            torch.testing.assert_close(w_s3[name], t, atol=1e-6, rtol=0)

    # Predict bucket to bucket, with the credentials given only as storage options.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    opts = ["--storage-options", f"key={key}", "--storage-options", f"secret={secret}"]
    assert main(["-v", *_predict("s3://data/img.ome.zarr", "s3://data/out.ome.zarr", files["model"], *opts)]) == 0
    assert main(_predict(str(local), str(tmp_path / "out.ome.zarr"), files["model"])) == 0
    logs = capfd.readouterr()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    np.testing.assert_allclose(_values("s3://data/out.ome.zarr"), _values(str(tmp_path / "out.ome.zarr")), atol=1e-6)
    assert not _objects(s3, "data", "out.ome.zarr.lock")  # released
    assert not _objects(s3, "data", "out.ome.zarr/.n2v_blocks")  # markers removed at completion

    # The secret is nowhere: logs, the bucket (provenance, metadata), the models.
    assert secret not in logs.out + logs.err
    for name, data in _objects(s3, "data").items():
        assert secret.encode() not in data, name
    for f in (tmp_path / "m_s3").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_predict_from_a_read_only_http_url(files, tmp_path):
    src = tmp_path / "img.ome.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((2, 64, 64), seed=3), dims=("t", "y", "x")), chunks=(1, 32, 32),
                   progress=False)
    url, stop = serve_folder(tmp_path)
    try:
        assert main(_predict(f"{url}/img.ome.zarr", str(tmp_path / "out_http.zarr"), files["model"])) == 0
    finally:
        stop()
    assert main(_predict(str(src), str(tmp_path / "out_local.zarr"), files["model"])) == 0
    np.testing.assert_array_equal(_values(str(tmp_path / "out_http.zarr")), _values(str(tmp_path / "out_local.zarr")))


def _markers(s3, bucket: str, out: str) -> set[str]:
    resp = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{out}/.n2v_blocks/")
    return {o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", [])}


def test_killed_prediction_on_s3_resumes_and_a_second_run_is_refused_by_the_lock(s3_env, files, tmp_path, capfd):
    s3 = s3_env
    _bucket(s3, "kill")
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((4, 128, 128), seed=1), dims=("t", "y", "x")), chunks=(1, 32, 32),
                   progress=False)
    total = 4 * 4 * 4
    assert main(_predict(str(src), str(tmp_path / "ref.zarr"), files["model"])) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "n2v_chunked.cli", *_predict(str(src), "s3://kill/out.zarr", files["model"])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # a loaded machine: the child imports torch first
    while len(_markers(s3, "kill", "out.zarr")) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no progress within 300 s"
        time.sleep(0.01)

    # A second run on the same output, while the first lives: refused by the lock.
    capfd.readouterr()
    assert main(_predict(str(src), "s3://kill/out.zarr", files["model"], "--resume")) == 2
    assert f"s3://kill/out.zarr is being written by a prediction (pid {proc.pid}" in _one_error_line(capfd)

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _markers(s3, "kill", "out.zarr")
    assert 3 <= len(done) < total
    assert _objects(s3, "kill", "out.zarr.lock")  # the kill leaves its lock, taken over below (pid gone)
    # The resumed run is a real process too: its stderr must hold no "Unclosed client session" (sessions closed).
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Unclosed" not in res.stderr, res.stderr[-2000:]
    computed, skipped, n = map(int, SUMMARY.search(res.stdout).groups())
    assert (computed, skipped, n) == (total - len(done), len(done), total)  # nothing recomputed
    np.testing.assert_array_equal(_values("s3://kill/out.zarr"), _values(str(tmp_path / "ref.zarr")))
    assert not _objects(s3, "kill", "out.zarr.lock")


@pytest.fixture
def proxy(s3_env):
    p = FaultProxy(s3_env.url)
    try:
        yield p
    finally:
        p.close()


def test_transient_503s_outlasting_the_clients_retries_are_retried_per_block_and_reported(
        s3_env, files, proxy, tmp_path, capfd, monkeypatch):
    s3 = s3_env
    monkeypatch.setattr(stores, "BACKOFF_S", 0.01)
    _bucket(s3, "faults")
    src = tmp_path / "in.ome.zarr"
    img = xr.DataArray(noisy((2, 64, 64), seed=2), dims=("t", "y", "x"))
    for where in (str(src), "s3://faults/in.zarr"):
        write_ome_zarr(where, img, chunks=(1, 32, 32), progress=False)
    assert main(_predict(str(src), str(tmp_path / "ref.zarr"), files["model"])) == 0
    # One chunk read and one chunk write fail one time more than the client tries a request
    # (1 + CLIENT_RETRIES): each outlasts the client's retries, and the per-block retry carries on.
    left = {"GET": objects.CLIENT_RETRIES + 2, "PUT": objects.CLIENT_RETRIES + 2}
    key = {"GET": "/faults/in.zarr/0/c/1/1/0", "PUT": "/faults/out.zarr/0/c/1/1/0"}

    def fault(method: str, path: str) -> bool:
        if method in key and path.endswith(key[method]) and left[method] > 0:
            left[method] -= 1
            return True
        return False

    proxy.inject(fault, -1)
    capfd.readouterr()
    rc = main(_predict("s3://faults/in.zarr", "s3://faults/out.zarr", files["model"],
                       "--storage-options", f"endpoint_url={proxy.url}"))
    err = capfd.readouterr().err
    assert rc == 0, err
    assert left == {"GET": 0, "PUT": 0} and proxy.failed == 2 * (objects.CLIENT_RETRIES + 2)
    for what in ("reading array s3://faults/in.zarr/0", r"block \(1, 1, 0\): writing s3://faults/out.zarr"):
        assert re.search(what + r".*: transient error \(.*503 Service Unavailable.*\); retry 1 of 5", err), err
    np.testing.assert_array_equal(_values("s3://faults/out.zarr"), _values(str(tmp_path / "ref.zarr")))


def test_a_block_that_keeps_failing_stops_with_one_line_and_resumes(s3_env, files, proxy, tmp_path, capfd,
                                                                   monkeypatch):
    s3 = s3_env
    _bucket(s3, "faults2")
    monkeypatch.setattr(stores, "BACKOFF_S", 0.01)
    monkeypatch.setattr(stores, "RETRIES", 2)
    src = tmp_path / "in.ome.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((2, 64, 64), seed=4), dims=("t", "y", "x")), chunks=(1, 32, 32),
                   progress=False)
    proxy.inject(lambda m, p: m == "PUT" and "/out.zarr/0/c/1/" in p, -1)  # every write of the second plane
    capfd.readouterr()
    argv = _predict(str(src), "s3://faults2/out.zarr", files["model"], "--storage-options", f"endpoint_url={proxy.url}")
    assert main(argv) == 2
    line = _one_error_line(capfd)
    assert re.search(r"prediction stopped: block \(1, \d, \d\): writing s3://faults2/out.zarr: still failing after "
                     r"3 attempts: .*; s3://faults2/out.zarr stays marked incomplete", line), line
    assert len(_markers(s3, "faults2", "out.zarr")) < 8
    assert b'"complete":false' in _objects(s3, "faults2", "out.zarr/zarr.json")["out.zarr/zarr.json"].replace(b" ", b"")
    proxy.inject(None)
    assert main([*argv, "--resume"]) == 0
    assert main(_predict(str(src), str(tmp_path / "ref.zarr"), files["model"])) == 0
    np.testing.assert_array_equal(_values("s3://faults2/out.zarr"), _values(str(tmp_path / "ref.zarr")))


@pytest.mark.parametrize("case", ["missing-bucket", "wrong-credentials", "read-only-bucket", "missing-bucket-output"])
def test_store_refusals_are_one_line(case, s3_env, files, tmp_path, capfd, monkeypatch):
    s3 = s3_env
    _bucket(s3, "data")
    if not _objects(s3, "data", "small.zarr/zarr.json"):
        src = tmp_path / "small.zarr"
        write_ome_zarr(src, xr.DataArray(noisy((1, 64, 64)), dims=("t", "y", "x")), chunks=(1, 32, 32), progress=False)
        assert main(["convert", str(src), "s3://data/small.zarr"]) == 0
    capfd.readouterr()
    if case == "missing-bucket":
        argv, want = ["info", "s3://no-such-bucket/img.zarr"], "s3://no-such-bucket/img.zarr: the bucket does not exist"
    elif case == "missing-bucket-output":
        argv = _predict("s3://data/small.zarr", "s3://no-such-bucket/out.zarr", files["model"])
        want = "no-such-bucket"
    elif case == "wrong-credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-1234")
        argv, want = ["info", "s3://data/small.zarr"], "s3://data/small.zarr: the store refused the credentials"
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.reader[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.reader[1])
        argv = _predict("s3://data/small.zarr", "s3://data/ro_out.zarr", files["model"])
        want = "Access Denied"
    assert main(argv) == 2
    line = _one_error_line(capfd)
    assert want in line, line
    assert "wrong-secret-1234" not in line and s3.reader[1] not in line
    assert not _objects(s3, "data", "ro_out.zarr")


def test_storage_options_parse_and_redact():
    opts = stores.parse_storage_options(["anon=true", "client_kwargs.region_name=eu-west-1", "max_concurrency=8",
                                         "secret=abcd1234efgh"])
    assert opts == {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}, "max_concurrency": 8,
                    "secret": "abcd1234efgh"}
    stores.remember_secrets(opts)
    assert stores.redact("failed with abcd1234efgh at https://u:pw@host/x?X-Amz-Signature=0ff1ce&a=1") == (
        "failed with *** at https://u:***@host/x?X-Amz-Signature=***&a=1")
    with pytest.raises(stores.N2VError, match=r"KEY=VALUE, got 'secret'"):
        stores.parse_storage_options(["secret"])


def test_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)  # import fails as if not installed
    with pytest.raises(stores.N2VError, match=r"pip install 'n2v-chunked\[s3\]'"):
        stores.require_client("s3://bucket/x.zarr")


def test_yaml_storage_options_top_level_and_per_command(tmp_path):
    from n2v_chunked.cli.commands import build_parser
    from n2v_chunked.cli.config_file import apply_config_file

    cfg = tmp_path / "n2v.yaml"
    cfg.write_text("storage_options:\n  anon: true\n  client_kwargs: {region_name: eu-west-1}\n"
                   "info:\n  storage_options: {endpoint_url: 'http://127.0.0.1:9'}\n")
    top = apply_config_file(build_parser(), ["--config", str(cfg), "info", "s3://b/x.zarr"])
    assert top == {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}, "endpoint_url": "http://127.0.0.1:9"}


def within_rounding(ratio: float, a: float, b: float, half_step: float) -> bool:
    """Whether ``ratio`` (printed to 3 decimals) is a / b for some values that print as ``a`` and ``b``."""
    lo, hi = (a - half_step) / (b + half_step), (a + half_step) / max(b - half_step, 1e-12)
    return lo - 5e-4 <= ratio <= hi + 5e-4


@pytest.mark.parametrize("chunk, stored", [("auto", [1, 128, 128]), ("64", [1, 64, 64])])
def test_remote_benchmark_smoke(s3, chunk, stored):
    from helpers import run_benchmark

    proc, records = run_benchmark("remote.py", "--smoke", "--chunk", chunk)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = {r["bench"]: r for r in records}
    assert set(by) == {"store", "sampler", "predict"}
    assert all(r["chunks"] == stored for r in records)  # auto: what convert writes, one chunk per 128^2 plane here
    assert by["sampler"]["remote_mb_read"] > 0  # the timed window reads blocks, not only the start-up buffer
    ceiling, sampler, pred = by["store"], by["sampler"], by["predict"]
    # each ratio is the quotient of the two sides measured in the same run (printed rounded: 1, 2 and 3 decimals)
    assert within_rounding(sampler["ratio"], sampler["remote_patches_s"], sampler["local_patches_s"], 0.05)
    assert within_rounding(sampler["share_of_store_ceiling"], sampler["remote_mb_s"], ceiling["remote_mb_s"], 0.005)
    assert pred["ratio"] == round(pred["median_remote"] / pred["median_local"], 3)
    assert pred["median_local"] == sorted(pred["local_mpix_s"])[len(pred["local_mpix_s"]) // 2]


def test_url_passwords_stay_out_of_the_output_metadata(files, tmp_path):
    from n2v_chunked.prediction import predict

    src = tmp_path / "img.ome.zarr"
    write_ome_zarr(src, xr.DataArray(noisy((1, 64, 64), seed=5), dims=("t", "y", "x")), chunks=(1, 32, 32),
                   progress=False)
    url, stop = serve_folder(tmp_path)
    try:  # the local server ignores the credentials in the URL; what matters is where they end up
        authed = url.replace("http://", "http://user:pa55word99@") + "/img.ome.zarr"
        predict(authed, str(tmp_path / "out.zarr"), files["model"], chunks=(1, 32, 32), scheduler="sync",
                progress=False, pyramid=False)
    finally:
        stop()
    meta = (tmp_path / "out.zarr" / "zarr.json").read_text()
    assert "pa55word99" not in meta and "user:***@" in meta


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_overwrite_rule_for_every_writer_on_disk_and_on_s3(where, s3_env, tmp_path):
    """Missing: free; a Zarr store: replaced only with overwrite; a file or another folder: never."""
    from n2v_chunked.io.ome import check_replaceable, create_ome_zarr

    root = f"s3://{_bucket(s3_env, 'rule')}/{tmp_path.name}" if where == "s3" else str(tmp_path)

    def put(key: str, data: bytes) -> None:
        if where == "s3":
            s3_env.client().put_object(Bucket="rule", Key=f"{tmp_path.name}/{key}", Body=data)
        else:
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(data)

    assert check_replaceable(f"{root}/missing.zarr", False) is False
    create_ome_zarr(f"{root}/o.zarr", (8, 8), "yx")
    with pytest.raises(OutputExistsError, match=r"exists; pass --overwrite to replace it \(or --resume"):
        check_replaceable(f"{root}/o.zarr", False, resumable=True)
    assert check_replaceable(f"{root}/o.zarr", True) is True
    put("mine/thesis.txt", b"precious")
    put("file.bin", b"x")
    for name, why in [("mine", "a non-empty folder but not a Zarr store"), ("file.bin", "a file, not a Zarr store")]:
        for writer in (lambda u: check_replaceable(u, True), lambda u: create_ome_zarr(u, (8, 8), "yx", overwrite=True)):
            with pytest.raises(OutputExistsError, match=f"refusing to overwrite {root}/{name}: it is {why}"):
                writer(f"{root}/{name}")
    assert objects.read(f"{root}/mine/thesis.txt") == b"precious" and objects.read(f"{root}/file.bin") == b"x"


def test_lock_create_on_s3_is_a_conditional_write(s3_env, monkeypatch):
    from n2v_chunked.io import lock as L

    _bucket(s3_env, "locks")
    files = L._files("s3://locks/out.zarr.lock")
    assert files.create(b"first") is True
    assert files.create(b"second") is False  # only one wins: If-None-Match: * on the server, no check before
    assert files.read() == b"first"


def test_credentials_from_options_environment_and_profile(tmp_path, monkeypatch):
    from n2v_chunked.io.objects import s3_config

    (tmp_path / "config").write_text("[profile lab]\nregion = eu-west-1\nendpoint_url = http://127.0.0.1:9\n")
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = profilesecret\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    config, client, retry = s3_config({})
    assert config == {"access_key_id": "PROFILEKEY", "secret_access_key": "profilesecret", "region": "eu-west-1",
                      "endpoint": "http://127.0.0.1:9"}
    assert client["allow_http"] and retry["max_retries"] == objects.CLIENT_RETRIES
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")  # the environment's keys win over the profile's ...
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    config, _, _ = s3_config({"secret": "s", "anon": "true"})  # ... and options over both
    assert config == {"secret_access_key": "s", "skip_signature": True, "endpoint": "http://127.0.0.1:9"}


def test_object_stores_pickle_for_dask_workers(s3_env):
    import pickle

    import obstore

    _bucket(s3_env, "pickled")
    objects.write("s3://pickled/a.zarr/x", b"data")
    path = pickle.loads(pickle.dumps(objects.zarr_store("s3://pickled/a.zarr", read_only=True)))
    assert path.path == "a.zarr"
    assert bytes(obstore.get(path.store.store, "a.zarr/x").bytes()) == b"data"  # credentials and endpoint came along


def test_prediction_from_a_url_reads_ahead(s3_env, files, monkeypatch):
    """A remote input: one read task per working block, and twice the dask threads (torch's unchanged)."""
    from n2v_chunked.cluster import scheduling
    from n2v_chunked.prediction import run

    monkeypatch.setattr(scheduling, "usable_cpus", lambda: 4)
    assert scheduling.thread_layout("threads") == (4, 1)
    assert scheduling.thread_layout("threads", stores.REMOTE_READ_AHEAD) == (4 * stores.REMOTE_READ_AHEAD, 1)
    assert scheduling.thread_layout("sync", stores.REMOTE_READ_AHEAD) == (1, 4)
    _bucket(s3_env, "ahead")
    write_ome_zarr("s3://ahead/in.zarr", xr.DataArray(noisy((1, 64, 64)), dims=("t", "y", "x")), chunks=(1, 16, 16),
                   progress=False)
    seen = {}
    real = run._run
    monkeypatch.setattr(run, "_run", lambda job, *a, **k: seen.update(chunks=job.data.data.chunksize,
                                                                    read_ahead=job.remote) or real(job, *a, **k))
    run.predict("s3://ahead/in.zarr", "s3://ahead/out.zarr", files["model"], chunks=(1, 32, 32), scheduler="sync",
                progress=False, pyramid=False)
    assert seen["chunks"] == (1, 32, 32) and seen["read_ahead"] is True  # not the store's 16x16


@pytest.mark.parametrize("name", ["o.zarr", "o.zarr/0"])
def test_an_incomplete_output_is_flagged_by_url_as_on_disk(name, s3_env, tmp_path, caplog):
    """Issue 28 item 6: a group or its level array, named by URL, warns like a local path."""
    from n2v_chunked.io.ome import create_ome_zarr

    root = f"s3://{_bucket(s3_env, 'partial')}/{tmp_path.name}"
    create_ome_zarr(f"{root}/o.zarr", (8, 8), "yx")
    with caplog.at_level("WARNING", logger="n2v_chunked"):
        open_image(f"{root}/{name}")
    assert caplog.text.count("marked incomplete") == 1
