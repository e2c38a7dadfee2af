"""Checkpoint the global random number generators, so a resumed run draws what the uninterrupted
one would have drawn (the Gumbel noise, dropout, the VP gate's noise all come from torch's
global RNG).

Lightning restores the model, optimiser, schedulers, loops and callback states, but not the
global RNGs. This callback saves those of every rank (torch CPU and CUDA, numpy, Python) as
tensors and plain lists (so the checkpoint still loads with ``weights_only=True``) and restores
them when the resumed fit starts training, after its sanity check. The DataLoaders draw from the
torch RNG too, and ``datamodules/loaders.py`` keeps those draws where the uninterrupted run made
them.
"""

from __future__ import annotations

import random
from typing import Optional

import lightning as L
import numpy as np
import torch

from tokensel.callbacks.per_rank import gather, mine

KEY = "global_rng_states"  # checkpoint key: one state per rank


def collect_rng_state() -> dict:
    numpy_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this rank's device only (touching the others would start a CUDA context on each)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": [version, list(internal), gauss],
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])  # the current device: the rank's own
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class GlobalRNGState(L.Callback):
    def __init__(self) -> None:
        self._at_batch_start: Optional[dict] = None
        self._to_restore: Optional[list] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._at_batch_start = collect_rng_state()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # Saved in the middle of a step (Ctrl-C, an exception): the resumed run redoes that step,
        # so it needs the state the step started from.
        mid_step = progress.started > progress.processed and self._at_batch_start is not None
        checkpoint[KEY] = gather(trainer, self._at_batch_start if mid_step else collect_rng_state())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._to_restore = checkpoint.get(KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        state = mine(trainer, self._to_restore)  # none if the number of ranks changed: not exact then
        if state is not None:
            restore_rng_state(state)
        self._to_restore = None
