"""Two CPU processes (gloo) through the real entry point, on uneven shards."""

import pytest
import torch

from conftest import FAST_ARGS, TINY_VAL, read_scalars, run_module


@pytest.mark.slow
def test_ddp_two_processes_equal_steps_and_exact_validation(tiny_corpus, tmp_path):
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.accelerator=cpu",
                        "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=2", "data.num_workers=1"]
    result = run_module("tokensel.experiments.train", "gumbel_ae", *args, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "gumbel_ae" / "version_0"
    # 80 train samples, batch 8, 2 ranks: ceil(80 / 16) = 5 steps per epoch on *both* ranks
    # (an uneven count would hang the all-reduce), so 10 optimiser steps in 2 epochs.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10
    # validation saw each of the 18 held-out samples exactly once, summed over both ranks
    samples = [v for _, v in read_scalars(run_dir)["val/samples"]]
    assert samples and all(v == sum(TINY_VAL.values()) for v in samples), samples
    assert result.stdout.count("run folder:") == 1  # the summary is printed by rank 0 only
