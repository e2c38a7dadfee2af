"""Sweeps on many machines: `--shard I/N`, a job array through submitit (its local executor here:
there is no SLURM cluster), and the report that merges the runs whoever ran them."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml

from conftest import REPO, run_module
from tokensel.common.errors import TokenselError
from tokensel.experiments import cli
from tokensel.experiments.sweep_runner import Shard, parse_params

TINY_ARGS = ["encoder.name=timm:vit_tiny_patch16_224", "encoder.pretrained=", "encoder.image_size=64",
             "data.recon_size=32", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
             "selector.reconstructor_depth=1", "selector.image_decoder_depth=1", "selector.image_decoder_channels=32",
             "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.max_steps=2",
             "trainer.max_epochs=1", "run.panels_every_n_steps=0"]


def test_shard_takes_every_nth_run_and_rejects_bad_specs():
    assert Shard.parse("1/3").take(list(range(8))) == [1, 4, 7]
    assert Shard.parse(" 0 / 1 ").take([5, 6]) == [5, 6]
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(TokenselError, match="expected I/N with 0 <= I < N"):
            Shard.parse(bad)
    assert parse_params(["timeout_min=240", "slurm_partition=gpu", "gpus_per_node=8"]) == {
        "timeout_min": 240, "slurm_partition": "gpu", "gpus_per_node": 8}


@pytest.mark.parametrize("args, message", [
    (["--launcher", "slurm"], "--launcher slurm: Could not detect \"srun\""),
    (["--slurm", "timeout_min=5"], "--slurm sets the job array's parameters: add --launcher slurm"),
    (["--launcher", "local", "--slurm", "bogus=1"], "--slurm: Parameter 'bogus'"),
    (["--shard", "2/2"], "--shard '2/2'"),
])
def test_launch_mistakes_are_one_line(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["sweep", "depth", "--out", str(tmp_path), *args]) == 2  # as `tokensel sweep` runs it
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert message in line


def test_a_launch_mistake_from_the_tokensel_command(tmp_path):
    result = run_module("tokensel.experiments.cli", "sweep", "depth", "--out", str(tmp_path), "--shard", "2/2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "--shard '2/2'" in line


@pytest.mark.slow
def test_a_shard_then_a_local_job_array_then_one_merged_report(tiny_corpus, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "out": str(tmp_path / "sweeps"), "axes": {"selector.depth": [1, 2]},
                                    "budgets": [0.5], "eval_max_samples": 8}))
    folder = tmp_path / "sweeps" / "tiny"
    args = TINY_ARGS + [f"data.root={tiny_corpus}"]

    def sweep(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "sweep", f"SWEEP={path}", f"ARGS={' '.join(extra + tuple(args))}"],
                              cwd=REPO, capture_output=True, text=True, timeout=900)

    shard = sweep("--shard", "0/2")  # any scheduler: N commands, one shard each
    assert shard.returncode == 0, shard.stdout[-3000:] + shard.stderr[-3000:]
    assert "shard 0/2: 1 of them; 0 done, 1 to run" in shard.stdout and "shard 0/2: 1 of 1 runs done" in shard.stdout
    assert json.loads((folder / "runs" / "depth=1_seed=0" / "status.json").read_text())["status"] == "done"
    assert not (folder / "runs" / "depth=2_seed=0").exists() and not (folder / "results.csv").exists()

    partial = sweep("--report-only")
    assert partial.returncode == 0 and "1/2 runs done, 0 failed, 1 not run yet" in partial.stdout, partial.stdout[-2000:]

    array = sweep("--launcher", "local", "--wait")  # the SLURM path, on submitit's local executor
    assert array.returncode == 0, array.stdout[-3000:] + array.stderr[-3000:]
    assert "1 done, 1 to run" in array.stdout and "submitted 1 runs as job array" in array.stdout
    assert list((folder / "submitit").rglob("*_log.out"))  # submitit's own log of the task
    assert json.loads((folder / "runs" / "depth=2_seed=0" / "status.json").read_text())["status"] == "done"
    assert "2/2 runs done, 0 failed" in array.stdout
    with open(folder / "results.csv") as fh:
        assert [r["selector.depth"] for r in csv.DictReader(fh)] == ["1", "2"]  # merged: one run from each
