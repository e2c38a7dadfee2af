"""Count the samples the data workers skipped, and log the count as ``data/skipped``."""

from __future__ import annotations

import lightning as L
import torch

from tokensel.callbacks.per_rank import gather, mine

KEY = "skipped_per_rank"  # checkpoint key: one count per rank


class SkippedSamples(L.Callback):
    """Sums ``FeatureBatch.n_skipped`` over training and validation batches.

    Each rank logs its running count every step; at the end of each training epoch the total
    over all ranks is logged once as ``data/skipped_total`` and kept in ``self.total``.
    """

    def __init__(self) -> None:
        self.local = 0
        self.total = 0

    def _count(self, pl_module, batch) -> None:
        self.local += int(getattr(batch, "n_skipped", 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count(pl_module, batch)
        pl_module.log("data/skipped", float(self.local), on_step=True, on_epoch=False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(pl_module, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        local = torch.tensor(float(self.local), device=pl_module.device)
        self.total = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        pl_module.log("data/skipped_total", float(self.total), on_step=False, on_epoch=True)

    # every rank's own count (the callback state would hold rank 0's only), so a resume neither
    # loses nor repeats a count
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = gather(trainer, self.local)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.local = int(mine(trainer, checkpoint.get(KEY)) or 0)
