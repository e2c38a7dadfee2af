"""One real run through `make train` on generated shards, then inference and resume from it."""

import math
import subprocess

import pytest
import torch

from conftest import FAST_ARGS, REPO, read_image_tags, read_scalars

pytestmark = pytest.mark.slow

SCALARS = ("loss", "keep_ratio", "feat_recon", "img_recon", "reg")


def make_train(selector: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "train", f"SELECTOR={selector}", f"ARGS={' '.join(args)}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={runs}", "trainer.max_epochs=2",
                        "data.samples_per_epoch=32"]
    result = make_train("gumbel_ae", args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "gumbel_ae" / "version_0", result, args


def test_run_logs_every_scalar_finite_under_train_and_val(trained_run):
    run_dir, _, _ = trained_run
    scalars = read_scalars(run_dir)
    for stage in ("train", "val"):
        for name in SCALARS:
            values = [v for _, v in scalars.get(f"{stage}/{name}", [])]
            assert values, f"{stage}/{name} missing; have {sorted(scalars)}"
            assert all(math.isfinite(v) for v in values), f"{stage}/{name} not finite: {values}"
    assert all(0.0 <= v <= 1.0 for _, v in scalars["train/keep_ratio"])
    # 2 epochs x 4 steps (32 samples / batch 8), one train/loss point per step
    assert [s for s, _ in scalars["train/loss"]] == list(range(8))


def test_run_writes_panels_hparams_config_and_selector_only_checkpoints(trained_run):
    run_dir, result, _ = trained_run
    assert {"panels/train", "panels/val"} <= set(read_image_tags(run_dir))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    assert "depth: 1" in (run_dir / "hparams.yaml").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["state_dict"] and all(k.startswith("net.") for k in ckpt["state_dict"] if "val_" not in k)
    assert not any("encoder" in k for k in ckpt["state_dict"])
    assert f"run folder:   {run_dir}" in result.stdout
    assert "tensorboard --logdir" in result.stdout


def test_checkpoint_selects_without_lightning(trained_run):
    from tokensel.selectors.catalog import load_selector

    run_dir, _, _ = trained_run
    selector = load_selector(run_dir / "checkpoints" / "last.ckpt")
    assert not selector.training
    features = torch.randn(3, selector.dims.num_tokens, selector.dims.dim)
    indices, kept = selector.select(features, 0.5)
    k = round(0.5 * selector.dims.num_tokens)
    assert indices.shape == (3, k) and kept.shape == (3, k, selector.dims.dim)
    assert (indices[:, 1:] > indices[:, :-1]).all()
    scores = selector.scores(features)
    assert torch.equal(indices, scores.topk(k).indices.sort().values)
    assert torch.equal(kept[1], features[1, indices[1]])


def test_resume_continues_the_same_run(trained_run):
    run_dir, _, args = trained_run
    more = [a for a in args if not a.startswith("trainer.max_epochs")] + ["trainer.max_epochs=3", "run.resume=last"]
    result = make_train("gumbel_ae", more)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 2
    steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
    assert max(steps) == 11


def test_resume_with_another_selector_is_refused(trained_run, tmp_path):
    from conftest import run_module

    run_dir, _, args = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = run_module("tokensel.experiments.train", "straight_through", *args, f"run.resume={ckpt}",
                        f"run.root={tmp_path}")
    assert result.returncode == 2
    assert "gumbel_ae checkpoint, not straight_through" in result.stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_corpus, tmp_path):
    import os
    import signal
    import sys
    import time

    from conftest import read_scalars

    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_epochs=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "tokensel.experiments.train", "gumbel_ae", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    run_dir = tmp_path / "gumbel_ae" / "version_0"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (
                list(run_dir.glob("events.out.*")) and len(read_scalars(run_dir).get("train/loss", [])) >= 3):
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "saved" in out and "run.resume=last" in out, out[-2000:]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert step >= 3
    resumed = make_train("gumbel_ae", [a for a in args if "max_epochs" not in a] +
                         [f"trainer.max_steps={step + 2}", "run.resume=last"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    again = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert again == step + 2
