"""Two CPU processes (gloo) through the real entry point, on uneven shards."""

import json

import pytest
import torch

from conftest import FAST_ARGS, TINY_VAL, read_scalars, run_module


@pytest.mark.slow
def test_ddp_two_processes_equal_steps_and_exact_validation(tiny_corpus, tmp_path):
    cache = tmp_path / "cache"  # a fresh one: both ranks build it, then both read it
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.accelerator=cpu",
                        "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=2", "data.num_workers=1",
                        f"data.feature_cache_dir={cache}"]
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
    # each rank encoded its own shards, rank 0 wrote each split's index once; training read the cache
    for split, total in (("train", 80), ("val", sum(TINY_VAL.values()))):
        (folder,) = cache.glob(f"{split}-*")
        assert sorted(p.name for p in (folder / "parts").iterdir()) == ["rank0-of2.json", "rank1-of2.json"]
        assert all(json.loads((folder / "parts" / f"rank{r}-of2.json").read_text()) for r in (0, 1))
        assert sum(e["count"] for e in json.loads((folder / "features.json").read_text())["shards"]) == total
    features = json.loads((run_dir / "metrics.json").read_text())["features"]
    assert set(features["sources"]) == {"train", "val"} and all(s.startswith("cached") for s in features["sources"].values())
    assert features["encoder_batches"] == {"train": 0, "val": 0} and features["cache_build_batches"] > 0
