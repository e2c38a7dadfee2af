"""Keep ``checkpoints/last.ckpt`` current however a run ends, so ``run.resume=last`` loses nothing.

``ModelCheckpoint(save_last=True)`` writes it at epoch ends only. This callback also writes it
when training stops mid-epoch (``trainer.max_steps``) and when a run stops on an exception or
Ctrl-C. Lightning's own ``OnExceptionCheckpoint`` is not used: it makes every plain ``fit()``
silently resume from its file, and resuming here is always explicit (``run.resume``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class LastCheckpoint(L.Callback):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._saved_step = -1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"\nstopped by {type(exception).__name__} at step {trainer.global_step}; saved {self.path} "
                  "(resume with run.resume=last)", flush=True)
