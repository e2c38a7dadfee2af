"""Shared fixtures: a tiny generated corpus and helpers to run the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No test may reach for a model hub: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_TRAIN = {"coco": 40, "docvqa": 24, "chartqa": 16}  # uneven on purpose
TINY_VAL = {"coco": 8, "docvqa": 6, "chartqa": 4}
# Small enough to run in seconds on 2 CPU cores; the laptop preset is larger.
FAST_ARGS = [
    "encoder.image_size=64", "data.recon_size=32", "data.batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=16", "selector.depth=1", "selector.reconstructor_depth=1",
    "selector.image_decoder_depth=1", "selector.image_decoder_channels=32",
    "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "run.panels_every_n_steps=2",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A generated corpus in the real shard format, with uneven shards per source."""
    from tokensel.datamodules.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, seed=0, train=TINY_TRAIN, val=TINY_VAL, max_samples_per_shard=7)
    return root


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run folder's TensorBoard events: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
