"""Exact resume: a run killed with SIGKILL (no handler runs) and resumed with ``run.resume=last``
ends at the same global step with the same metrics as the uninterrupted run of the same seed.

A checkpoint every 3 steps; the kill comes as soon as the checkpoint holds a given step (or a
later one, if the run got there first). With two DataLoader workers (6 steps per epoch): step 3,
mid-epoch at an odd batch (the resumed DataLoader's round-robin must start on the other worker),
before the first validation; step 9, the same after it. With none (5 steps per epoch): step 5, an
epoch end. On this project's 2-core CPU the resumed runs' final metrics and every logged
train/loss were bit-identical to the uninterrupted runs'."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from conftest import FAST_ARGS, REPO, read_scalars, run_module

TRAIN = "tokensel.experiments.train"
ARGS = FAST_ARGS + ["data.samples_per_epoch=40", "run.checkpoint_every_n_steps=3", "run.panels_every_n_steps=0"]
# (workers, kill after step, epochs, steps): 40 samples per epoch in batches of 8 are 5 steps, or
# ceil(5 / 2) = 3 per worker and 6 steps with 2 workers
CASES = [(2, 9, 3, 18), (0, 5, 2, 10)]  # mid-epoch with 2 loader workers; at an epoch end with none


@pytest.fixture(scope="module")
def damaged_corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus with every 7th training image's bytes flipped: skipped samples must be
    counted the same across a kill and a resume."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(tiny_corpus, root, dirs_exist_ok=True)
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for i, (name, data) in enumerate(members):
                if name.endswith(".jpg") and i % 7 == 0:
                    data = bytes(255 - b for b in data)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def saved_step(path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except (OSError, RuntimeError, KeyError):  # not there yet
        return -1


def start(args: list[str], log) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe nobody reads while we wait
        return subprocess.Popen([sys.executable, "-m", TRAIN, "gumbel_ae", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_after_checkpoint(proc: subprocess.Popen, last_ckpt, after_step: int) -> int:
    """SIGKILL ``proc`` once ``last_ckpt`` holds step ``after_step`` or a later one; return that step."""
    deadline = time.time() + 300
    while (step := saved_step(last_ckpt)) < after_step:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return step


@pytest.mark.slow
@pytest.mark.parametrize("workers,after_step,epochs,steps", CASES)
def test_kill_minus_9_then_resume_ends_like_the_uninterrupted_run(damaged_corpus, tmp_path, workers, after_step,
                                                                  epochs, steps):
    common = ARGS + [f"data.root={damaged_corpus}", f"data.num_workers={workers}", f"trainer.max_epochs={epochs}"]
    killed_dir = tmp_path / "killed" / "gumbel_ae" / "version_0"
    # the uninterrupted run and the one to kill side by side (the result does not depend on timing)
    whole = start(common + [f"run.root={tmp_path}/whole"], tmp_path / "whole.log")
    victim = start(common + [f"run.root={tmp_path}/killed"], tmp_path / "killed.log")
    try:
        step = kill_after_checkpoint(victim, killed_dir / "checkpoints" / "last.ckpt", after_step)
        whole.wait(timeout=600)
        whole_out = (tmp_path / "whole.log").read_text()
    finally:
        for proc in (whole, victim):
            if proc.poll() is None:
                proc.kill()
    assert whole.returncode == 0, whole_out[-3000:]
    assert "weights_only" not in whole_out  # nothing asks Lightning to unpickle
    assert after_step <= step < steps
    resumed = run_module(TRAIN, "gumbel_ae", *common, f"run.root={tmp_path}/killed", "run.resume=last")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stdout + resumed.stderr and "weights_only" not in resumed.stderr
    assert not list((killed_dir / "checkpoints").glob(".*.tmp"))

    a = json.loads((tmp_path / "whole" / "gumbel_ae" / "version_0" / "metrics.json").read_text())
    b = json.loads((killed_dir / "metrics.json").read_text())
    assert (b["global_step"], b["epoch"]) == (a["global_step"], a["epoch"]) == (steps, epochs)
    assert b["skipped"] == a["skipped"] > 0  # the flipped images met in both runs, each counted once
    assert set(b["metrics"]) == set(a["metrics"])
    worst = max(abs(b["metrics"][k] - v) for k, v in a["metrics"].items())
    print(f"resumed from step {step}: max |metric difference| {worst:.3g}")  # pytest -s shows it
    for key, value in a["metrics"].items():
        assert math.isclose(b["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-6), (key, value, b["metrics"][key], step)
    # every train/loss the killed-then-resumed run logged matches the uninterrupted run at that step
    reference = dict(read_scalars(tmp_path / "whole" / "gumbel_ae" / "version_0")["train/loss"])
    logged = read_scalars(killed_dir)["train/loss"]
    assert sorted({s for s, _ in logged}) == list(range(steps))
    for s, value in logged:
        assert math.isclose(value, reference[s], rel_tol=1e-5, abs_tol=1e-6), (s, value, reference[s], step)
