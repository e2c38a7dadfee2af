"""Checkpoints that exist when needed: periodic saves (callbacks/last_checkpoint.py), atomic writes and
weights-only reads (common/checkpoint_files.py, callbacks/checkpoint_io.py)."""

import argparse
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn

from conftest import REPO
from tokensel.callbacks.checkpoint_io import SafeCheckpointIO
from tokensel.callbacks.last_checkpoint import LastCheckpoint
from tokensel.common.checkpoint_files import load_plain, remove_stale_temps, save_atomic
from tokensel.common.errors import CheckpointError


class Tiny(L.LightningModule):
    def __init__(self, batches: int):
        super().__init__()
        self.batches = batches
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(self.batches, 1)), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveLog(L.Callback):
    """(global step, epochs finished) of every checkpoint written."""

    def __init__(self):
        self.saves = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves.append((trainer.global_step, trainer.fit_loop.epoch_progress.current.processed))


def fit(tmp_path, **last_checkpoint):
    log = SaveLog()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, plugins=[SafeCheckpointIO()],
                        callbacks=[LastCheckpoint(tmp_path / "last.ckpt", **last_checkpoint), log])
    trainer.fit(Tiny(batches=6))
    return log.saves


def test_last_checkpoint_every_n_steps_and_at_epoch_ends(tmp_path):
    # 6 steps per epoch: step 6 is an epoch's last batch, saved once, after the epoch (1 finished)
    assert fit(tmp_path, every_n_steps=3) == [(3, 0), (6, 1), (9, 1), (12, 2)]
    assert load_plain(tmp_path / "last.ckpt")["global_step"] == 12
    assert fit(tmp_path) == [(6, 1), (12, 2)]  # epoch ends only


def test_last_checkpoint_every_minutes(tmp_path):
    # an interval shorter than any step: every batch is due (an epoch's last one saves after the epoch)
    assert [s for s, _ in fit(tmp_path, every_minutes=1e-9)] == list(range(1, 13))


class KillWhilePickled:
    """Kills its own process with SIGKILL while torch.save is serialising the checkpoint."""

    def __reduce__(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


CHILD = """
import sys, torch
sys.path.insert(0, "tests")
from test_checkpoints import KillWhilePickled
from tokensel.common.checkpoint_files import save_atomic
save_atomic({"global_step": 2, "w": torch.ones(1000), "bomb": KillWhilePickled()}, sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"global_step": 1, "w": torch.zeros(1000)}, path)
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert load_plain(path)["global_step"] == 1 and torch.equal(load_plain(path)["w"], torch.zeros(1000))
    assert [p.name for p in remove_stale_temps(tmp_path)][0].startswith(".last.ckpt.")  # the half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_reads_refuse_pickled_objects_and_damage(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.ckpt")
    save_atomic({"state_dict": {"w": torch.ones(4096)}}, tmp_path / "good.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"pickled.ckpt: holds a pickled Python object \(argparse.Namespace\)"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)  # asked for, not granted
    with pytest.raises(CheckpointError, match="cut.ckpt: not a readable checkpoint"):
        load_plain(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match="nowhere.ckpt: no such checkpoint"):
        load_plain(tmp_path / "nowhere.ckpt")
    assert torch.equal(SafeCheckpointIO().load_checkpoint(tmp_path / "good.ckpt")["state_dict"]["w"], torch.ones(4096))
