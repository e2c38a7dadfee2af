"""Lightning's seams in the run config: loggers (TensorBoard, CSV, W&B offline), user callbacks by
import path, any Trainer keyword argument checked against the Trainer's signature, --print-config."""

from __future__ import annotations

import csv

import pytest
import yaml

from conftest import FAST_ARGS, run_module
from tokensel.common.errors import ConfigError
from tokensel.experiments.config import config_yaml, load_config


def test_trainer_arguments_pass_through_and_print_as_written():
    config = load_config("gumbel_ae", overrides=["trainer.max_time=00:01:00:00", "trainer.fast_dev_run=2",
                                                 "trainer.deterministic=warn", "trainer.profiler=simple"])
    assert config.trainer.extra == {"max_time": "00:01:00:00", "fast_dev_run": 2, "deterministic": "warn",
                                    "profiler": "simple"}
    printed = yaml.safe_load(config_yaml(config))
    assert printed["trainer"]["max_time"] == "00:01:00:00" and "extra" not in printed["trainer"]
    assert printed["trainer"]["max_steps"] == config.trainer.max_steps
    again = load_config("gumbel_ae", overrides=[f"trainer.{k}={v}" for k, v in printed["trainer"].items()
                                                if k == "max_time"])
    assert again.trainer.extra == {"max_time": "00:01:00:00"}


@pytest.mark.parametrize("override, message", [
    ("trainer.fast_dev_rn=1", "trainer.fast_dev_rn: not an argument of lightning.Trainer; did you mean trainer.fast_dev_run?"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe': lightning.Trainer expects"),
    ("trainer.detect_anomaly=3", "trainer.detect_anomaly=3: lightning.Trainer expects <class 'bool'>"),
    ("trainer.logger=csv", "trainer.logger: tokensel sets it; use run.logger"),
    ("trainer.callbacks=[]", "trainer.callbacks: tokensel sets it; use run.callbacks"),
    ("run.logger=mlflow", "run.logger='mlflow': expected one of tensorboard, csv, wandb"),
    ("run.logger=[csv,comet]", "run.logger[1]='comet'"),
    ("run.callbacks=[nowhere.Callback]", "run.callbacks[0]='nowhere.Callback': cannot import nowhere"),
    ("run.callbacks=[lightning.pytorch.callbacks.NoSuch]", "lightning.pytorch.callbacks has no NoSuch"),
    ("run.callbacks=[{class_path: lightning.pytorch.callbacks.Timer, args: {}}]", "unknown field 'args'"),
])
def test_bad_lightning_options_are_one_line_before_anything_is_built(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("gumbel_ae", overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_print_config_prints_the_resolved_config_and_exits():
    result = run_module("tokensel.experiments.train", "vp_noise", "selector.depth=3", "run.logger=[csv,tensorboard]",
                        "--print-config")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["selector"]["name"] == "vp_noise" and printed["selector"]["depth"] == 3
    assert printed["run"]["logger"] == ["csv", "tensorboard"] and printed["optim"]["name"] == "adamw"
    assert "done in" not in result.stdout and "no data.root given" not in result.stdout  # nothing ran


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_csv_and_wandb_offline_with_a_user_callback(tiny_corpus, tmp_path):
    user_ckpts = tmp_path / "user_ckpts"
    callback = ("run.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
                f"init_args: {{dirpath: '{user_ckpts}', filename: user, every_n_train_steps: 1}}}}]")
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path / 'runs'}", "trainer.max_steps=2",
                        "run.panels_every_n_steps=0", "run.logger=[wandb,csv,tensorboard]", callback,
                        "trainer.max_time=00:00:30:00", "trainer.deterministic=warn", "trainer.profiler=simple"]
    result = run_module("tokensel.experiments.train", "gumbel_ae", *args,
                        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "gumbel_ae").iterdir()
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard first: panels and reports read it
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert "train/loss" in rows[0] and any(r["train/loss"] for r in rows)
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert (user_ckpts / "user.ckpt").is_file()
    assert "FIT Profiler Report" in result.stdout + result.stderr
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["trainer"]["max_time"] == "00:00:30:00" and written["run"]["logger"] == ["wandb", "csv", "tensorboard"]
