"""Smoke run of benchmarks/gpu.py on a CPU: its rows are there and its ratios are the quotients they claim."""

import pytest
from helpers import run_benchmark


def test_gpu_benchmark_smoke_arithmetic():
    proc, rows = run_benchmark("gpu.py", "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = {}
    for r in rows:
        by.setdefault(r["measure"], []).append(r)
    assert by["setup"][0]["device"] == "cpu"
    ceilings = {r["config"]: r["mpix_per_s"] for r in by["ceiling"]}
    assert len(by["pipeline"]) == 3
    for p in by["pipeline"]:
        assert ceilings[p["ceiling_config"]] == p["ceiling_mpix_per_s"]
        assert p["ratio"] == pytest.approx(p["mpix_per_s"] / p["ceiling_mpix_per_s"], abs=1e-3)
    train_ceilings = {r["batch_size"]: r["patches_per_second"] for r in by["train_ceiling"]}
    assert sorted(train_ceilings) == [4, 16]  # --batch-size and 4x
    for t in by["train"]:
        own = train_ceilings[t["batch_size"]]
        assert t["ceiling"] == max(own, key=own.get) and t["ceiling_patches_per_second"] == own[t["ceiling"]]
        assert t["ratio"] == pytest.approx(t["patches_per_second"] / t["ceiling_patches_per_second"], abs=1e-3)
        assert t["steps"] == (3 if t["batch_size"] == 4 else 1)  # the same patches at 4x the batch
