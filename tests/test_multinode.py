"""Two "nodes" of one process each, on this machine: what a multi-node job runs on every node
(docs/many-nodes.md): the same command with ``trainer.num_nodes=2 trainer.devices=1`` and the
node's ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE`` (gloo, loopback only)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import FAST_ARGS, REPO, TINY_VAL, read_scalars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_one_process_each_read_disjoint_shares_and_step_together(tiny_corpus, tmp_path):
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "run.version=nodes", "trainer.max_epochs=1",
                        "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp", "trainer.accelerator=cpu",
                        "data.num_workers=1", "run.panels_every_n_steps=0"]
    network = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "tokensel.experiments.train", "gumbel_ae", *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **network, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    # each node is its own rank of one world of two
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    run_dir = tmp_path / "gumbel_ae" / "nodes"
    # 80 train samples, batch 8, world 2: 5 steps in the epoch on both nodes (unequal counts would
    # hang DDP's all-reduce)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    # validation counted each of the 18 held-out samples exactly once across the two nodes: their
    # shares (5 and 13 samples here) are disjoint and complete; two copies of one share would give 10 or 26
    samples = [v for _, v in read_scalars(run_dir)["val/samples"]]
    assert samples and all(v == sum(TINY_VAL.values()) for v in samples), samples
    assert outputs[0].count("run folder:") == 1 and "run folder:" not in outputs[1]  # rank 0 reports
