"""Smoke runs of the quality benchmarks: they run, print their JSON, and refuse bad options in one line."""

import math

import pytest
from helpers import bsd68_data, run_benchmark

DATA = bsd68_data()


@pytest.mark.skipif(DATA is None, reason="BSD68 data absent: no Train400/ and BSD68/ under $N2V_DATA or shared/data")
@pytest.mark.parametrize("flags, replacement, ema", [
    ([], "median", 0.999),
    pytest.param(["--paper"], "uniform", 0.0, marks=pytest.mark.slow),  # the flags map to the config: test_train_cli
    pytest.param(["--n2v2"], "median", 0.999, marks=pytest.mark.slow)])
def test_bsd68_smoke(flags, replacement, ema):
    proc, rows = run_benchmark("bsd68.py", "--data", str(DATA), "--steps", "2", "--batch-size", "8", "--patch", "32",
                      "--features", "4", "--n-train", "12", "--n-test", "2", "--val-interval", "1", "--quiet",
                      "--train-ceiling", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = rows
    assert row["steps"] == 2 and row["replacement"] == replacement and row["n2v2"] is ("--n2v2" in flags)
    assert row["ema"] == ema and (row["psnr_last_step_weights"] is None) == (ema == 0)
    assert 19 < row["psnr_noisy_input"] < 22  # sigma 25 on 0..255: about 20.2 dB
    for key in ("psnr", "psnr_blend", "centre_weight", "patches_per_second"):
        assert math.isfinite(row[key]), key
    assert -1 < row["centre_weight"] < 1
    # the loop against the bare train step in its best layout/precision
    assert set(row["train_step_patches_per_second"]) == {"fp32 NCHW", "fp32 channels-last", "bf16 channels-last"}
    assert row["train_ceiling"] in row["train_step_patches_per_second"] and row["train_ratio"] > 0


def test_bsd68_bad_option_is_one_line(tmp_path):
    data = DATA or tmp_path  # without the data, the missing images are the one line
    proc, rows = run_benchmark("bsd68.py", "--data", str(data), "--mask-density", "0.7", "--n-train", "12", "--n-test", "1",
                      "--steps", "1", "--quiet")
    assert proc.returncode != 0 and not rows
    if DATA is None:
        assert proc.stderr.strip() == f"bsd68: no PNG images in {tmp_path / 'Train400'}"
        return
    assert proc.stderr.strip() == "bsd68: mask density must be in (0, 0.5], got 0.7"


def test_replacement_smoke():
    proc, rows = run_benchmark("replacement.py", "--steps", "2", "--batch-size", "16", "--features", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    uniform, median, diff = rows
    assert (uniform["replacement"], median["replacement"]) == ("uniform", "median")
    assert uniform["steps"] == median["steps"] == 2 and uniform["batch_size"] == 16 and uniform["features"] == 4
    assert uniform["psnr_noisy"] == median["psnr_noisy"]  # the same noisy input for both
    assert diff["median_minus_uniform_db"] == pytest.approx(median["psnr"] - uniform["psnr"], abs=2e-3)


def test_channels_smoke():
    proc, rows = run_benchmark("channels.py", "--steps", "2", "--seeds", "0", "--batch-size", "4", "--patch", "32",
                               "--features", "4", "--val-patches", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    *runs, summary = rows
    assert [(r["channels"], r["budget"]) for r in runs] == [
        ("independent", "reference"), ("joint", "equal_steps"), ("joint", "equal_time")]
    assert runs[0]["steps"] == runs[1]["steps"] == 2 and runs[0]["bleed"][0] == pytest.approx(0, abs=0.05)
    assert summary["summary"] and len(summary["independent"]["psnr"]) == 2
    for r in runs:
        assert all(math.isfinite(v) for v in r["psnr"] + r["bleed"])


def test_precision_smoke():
    proc, rows = run_benchmark("precision.py", "--skip", "bsd68", "--steps", "2", "--batch-size", "8", "--features", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows[0]["runtime"] == "torch" and rows[0]["precision"] == "fp32" and rows[0]["delta_db"] == 0
    assert {(r["runtime"], r["precision"]) for r in rows} >= {("torch", "fp32"), ("torch", "bf16")}
    from n2v_chunked.engine.runtimes import can_run

    for r in rows:
        if "skipped" in r:  # a combination this CPU refuses (OpenVINO bf16 without native bf16), never scored as run
            assert not can_run(r["runtime"], r["precision"]), r
            continue
        assert r["data"] == "nuclei" and math.isfinite(r["psnr"]) and r["passes"] == (abs(r["delta_db"]) < 0.05)


def test_scale_smoke():
    proc, rows = run_benchmark("scale.py", "--sizes-gb", "0.002", "0.004", "--blocks", "2", "--patches", "128",
                               timeout=600)  # four child processes that each import torch: slow on a loaded host
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {(r["measure"], r["gb"]): r for r in rows if r["measure"] in ("startup", "predict")}
    assert set(runs) == {(m, gb) for m in ("startup", "predict") for gb in (0.002, 0.004)}
    for (measure, gb), r in runs.items():
        assert r["bytes"] == 2 * math.prod(r["shape"]) and abs(r["bytes"] - gb * 1e9) < 0.1 * gb * 1e9
    for r in (r for r in rows if r["measure"] == "ratio"):  # each ratio is the quotient of the two runs' figures
        small, large = runs[(r["phase"], 0.002)][r["figure"]], runs[(r["phase"], 0.004)][r["figure"]]
        assert (r["small"], r["large"]) == (small, large)
        assert r["ratio"] == (round(large / small, 3) if small else None)
        assert r["met"] == (None if r["target"] is None or not small else large / small <= r["target"])
    predict = runs[("predict", 0.004)]
    assert predict["blocks_written"] >= 2 and predict["listings"] == 0 and predict["batch_tasks"] > 0
    assert runs[("startup", 0.004)]["listings_at_startup"] == 0


def test_collections_smoke():
    proc, rows = run_benchmark("collections.py", "--rows", "1", "--columns", "2", "--fields", "2", "--size", "64",
                               "--chunk", "32", "--latency-ms", "0", "--threads", "4", "--train-images", "1", "4",
                               "--features", "4", "--val-patches", "16", "--no-warm-up")
    assert proc.returncode == 0, proc.stderr[-2000:]
    setup, planning, one, four, ratio = rows
    assert (one["measure"], one["images"], four["images"]) == ("training", 1, 4)
    assert one["met"] and four["met"] and 0 < one["startup_s"] and one["listings"] == 0
    assert (one["images_opened"], four["images_opened"]) == (1, 4)  # each image opened once, by the sampler
    assert ratio["measure"] == "training_ratio" and ratio["images"] == [1, 4]
    assert setup["images"] == 4 and "cpu" in setup
    assert (planning["images"], planning["wells"], planning["chunk_reads"], planning["listings"]) == (4, 2, 0, 0)
    assert planning["met"] is True and planning["metadata_reads"] > 4 and planning["threads"] == 4
