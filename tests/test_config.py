"""Config values: types and ranges from Python, ``--config`` YAML and a model's ``config.yaml`` (issue 14).

``steps: 2.5``, ``lr: "0.001"`` and ``augment: "no"`` (a truthy string) once
passed; every value is now checked against its field's type hint and range,
with one line naming the key, the value and what was expected.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from n2v_chunked.model import checkpoint as ckpt
from n2v_chunked.cli import main
from n2v_chunked.model.config import MaskConfig, ModelConfig, TrainConfig, from_dict, read_config_file
from n2v_chunked.errors import ConfigError, N2VError

from helpers import make_model_dir

SECTIONS = {"model": ModelConfig, "mask": MaskConfig, "train": TrainConfig}

BAD_TYPES = [
    ("train", "steps", 2.5, "is a float, expected an integer"),
    ("train", "lr", "0.001", "is a string, expected a number"),
    ("train", "augment", "no", "is a string, expected true or false"),
    ("train", "augment", 1, "is an integer, expected true or false"),
    ("train", "batch_size", True, "is a boolean, expected an integer"),
    ("train", "lr", float("nan"), "is not finite, expected a number"),
    ("train", "patch_size", [64, "64"], "expected a list of integers"),
    ("train", "patch_size", 64, "is an integer, expected a list of integers"),
    ("train", "schedule", ["cosine"], "is a list, expected a string"),
    ("train", "time_budget", "1h", "is a string, expected a number"),
    ("model", "dims", 2.0, "is a float, expected an integer"),
    ("model", "n2v2", "false", "is a string, expected true or false"),
    ("model", "features", None, "is empty, expected an integer"),
    ("mask", "density", "1/64", "is a string, expected a number"),
    ("mask", "struct_axes", "x", "is a string, expected a list of strings"),
]

BAD_RANGES = [
    ("train", "steps", -1, ">= 0"),
    ("train", "lr", 0, "> 0"),
    ("train", "val_interval", 0, ">= 1"),
    ("train", "checkpoint_interval", 0, ">= 1"),
    ("train", "num_workers", -2, ">= 0"),
    ("train", "warmup", 1.0, "a fraction in [0, 1)"),
    ("train", "patch_size", [64, 0], "positive"),
    ("train", "precision", "fp16", "auto, bf16 or fp32"),
    ("model", "depth", 7, "between 0 and 6"),
    ("model", "kernel_size", 4, "odd and positive"),
    ("mask", "neighbourhood", 4, "odd and >= 3"),
    ("mask", "struct_axes", ["w"], "among z, y, x"),
]


@pytest.mark.parametrize("section, key, value, said", BAD_TYPES, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_TYPES])
def test_wrong_types_are_refused_naming_key_value_and_type(section, key, value, said):
    with pytest.raises(ConfigError) as exc:
        from_dict(SECTIONS[section], {key: value}, section)
    msg = str(exc.value)
    assert f"section {section!r}" in msg and f"{key!r} = {value!r}" in msg and said in msg
    assert isinstance(exc.value, ValueError) and "\n" not in msg


@pytest.mark.parametrize("section, key, value, said", BAD_RANGES, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_RANGES])
def test_values_out_of_range_are_refused(section, key, value, said):
    with pytest.raises(ConfigError, match=rf"section {section!r}: {key} must be .*got") as exc:
        SECTIONS[section](**{key: value})  # the Python API checks as much as from_dict
    assert said in str(exc.value)


def test_right_types_are_kept_or_widened():
    cfg = TrainConfig(steps=np.int64(10), lr=1, patch_size=(np.int64(32), 32), time_budget=5)
    assert cfg.steps == 10 and type(cfg.steps) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.time_budget) is float
    assert cfg.patch_size == [32, 32] and all(type(p) is int for p in cfg.patch_size)
    assert from_dict(MaskConfig, {"struct_axes": ["y", "x"], "density": 0.25}, "mask").struct_axes == ["y", "x"]


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"section 'train' must be a mapping.*got a list"):
        from_dict(TrainConfig, [1, 2], "train")


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-3`` as text; a config file must not then refuse ``lr: 1e-3``."""
    path = tmp_path / "c.yaml"
    path.write_text('train:\n  lr: 1e-3\n  quoted: "1e-3"\n  flag: no\n')
    assert read_config_file(path)["train"] == {"lr": 0.001, "quoted": "1e-3", "flag": False}


# ----------------------------------------------------------------------------
# --config: option values arrive typed from YAML, past argparse's conversion.
# ----------------------------------------------------------------------------

CLI_BAD = [
    ("train", "steps: 2.5", "'steps' = 2.5 is a float, expected an integer"),
    ("train", 'lr: "0.001"', "'lr' = '0.001' is a string, expected a number"),
    ("train", 'n2v2: "no"', "'n2v2' = 'no' is a string, expected true or false"),
    ("train", "minutes: [1]", "'minutes' = [1] is a list, expected a number"),
    ("train", "schedule: linear", "'schedule' = 'linear' must be one of plateau, cosine"),
    ("predict", "ngff: 0.3", "'ngff' = '0.3' must be one of 0.4, 0.5"),
    ("predict", "tta: 1", "'tta' = 1 is an integer, expected true or false"),
]


@pytest.mark.parametrize("command, line, said", CLI_BAD, ids=[c[1] for c in CLI_BAD])
def test_config_file_option_types(tmp_path, capfd, command, line, said):
    cfg = tmp_path / "n2v.yaml"
    cfg.write_text(f"{command}:\n  {line}\n")
    args = ["in.zarr", "--model-dir", str(tmp_path / "m")] if command == "train" else \
        ["in.zarr", "out.zarr", "--model-dir", str(tmp_path / "m")]
    assert main(["--config", str(cfg), command, *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == f"n2v-chunked: error: config file {cfg}, section '{command}': {said}"
    assert not (tmp_path / "m").exists()


def test_config_file_lists_numbers_and_nulls_are_accepted(tmp_path, capfd):
    """``chunks: [1, 64]``, ``ngff: 0.5`` and ``device: null`` are what a user writes: no type error."""
    cfg = tmp_path / "n2v.yaml"
    cfg.write_text("predict:\n  chunks: [64, 64]\n  ngff: 0.5\n  device: null\n  tta: false\n")
    assert main(["--config", str(cfg), "predict", str(tmp_path / "no.zarr"), "o.zarr", "--model-dir", "m"]) == 2
    assert "model directory not found" in capfd.readouterr().err  # got past the config


def test_model_config_yaml_with_a_wrong_type_names_the_file_and_key(tmp_path):
    model = make_model_dir(tmp_path / "m")
    meta = yaml.safe_load((model / ckpt.CONFIG).read_text())
    meta["train"]["steps"] = 2.5
    (model / ckpt.CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(N2VError, match=rf"{model / ckpt.CONFIG}: config section 'train': 'steps' = 2.5 is a float"):
        ckpt.load_model(model)
