"""Keep ``checkpoints/last.ckpt`` current, so a killed run loses at most the steps since the last save.

``last.ckpt`` is written:

- every ``every_n_steps`` optimiser steps (``run.checkpoint_every_n_steps``), and every
  ``every_minutes`` minutes of training (``run.checkpoint_every_minutes``; rank 0's clock decides
  for all ranks), each checked after a training batch;
- at every epoch end, after its validation. A periodic save that falls on an epoch's last batch
  waits for that point, so a run resumed from it does not skip the epoch's validation;
- when training stops (``trainer.max_steps`` mid-epoch, an exception, Ctrl-C).

A SIGKILL, an OOM kill or a pre-emption cannot be caught: that is what the periodic saves are
for. Every write goes through the Trainer's checkpoint I/O (``SafeCheckpointIO``: atomic), so a
kill during a save leaves the previous good file. Lightning's ``ModelCheckpoint`` is kept for
``best-*.ckpt`` only: its step and time triggers exclude each other, and its ``save_last`` writes
on an epoch's last batch before the validation that a resume would then skip. Lightning's
``OnExceptionCheckpoint`` is not used: it makes every plain ``fit()`` silently resume from its
file, and resuming here is always explicit (``run.resume``).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


class LastCheckpoint(Checkpoint):
    """A Lightning ``Checkpoint`` callback, so it runs after the other callbacks' hooks (their
    state at a step's end, e.g. the skipped-sample count, is in the file) and Lightning adds no
    default ``ModelCheckpoint`` beside it."""

    def __init__(self, path: str | Path, every_n_steps: int = 0, every_minutes: float = 0.0):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.every_seconds = every_minutes * 60.0
        self._saved_step = -1
        self._last_time = time.monotonic()

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resumable
        self._saved_step = trainer.global_step
        self._last_time = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a saved step
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._saved_step
        if self.every_seconds > 0:
            late = time.monotonic() - self._last_time >= self.every_seconds
            due = bool(trainer.strategy.broadcast(due or late))  # every rank saves, or none
        if due and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # else: the epoch end saves
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return
        if trainer.global_step != self._saved_step:
            self._save(trainer)
        if trainer.is_global_zero:
            print(f"\nstopped by {type(exception).__name__} at step {trainer.global_step}; saved {self.path} "
                  "(resume with run.resume=last)", flush=True)
