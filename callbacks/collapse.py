"""Flag budget-regulariser collapse: the keep ratio stuck near zero (*Adaptive Vision Token Selection
for Multi-Modal Inference*, arXiv 2503.16660, App. B.2).

With the plain ``alpha1 * L_pr`` term the optimiser can fall into the minimum ``L_pr = 0``
(App. B.1): every token is dropped and the reconstruction learns to ignore the mask. The paper
shows this as training curves (Fig. 9) and gives no numeric test, so ours is a config key:
collapse is a keep ratio below ``threshold`` for ``patience`` consecutive training steps, dated
at the first step of that streak (``run.collapse_threshold``, ``run.collapse_patience``).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import lightning as L


class CollapseWatch:
    """The streak logic on its own: feed ``(step, keep_ratio)`` in step order."""

    def __init__(self, threshold: float, patience: int):
        if patience < 1:
            raise ValueError(f"patience={patience}: must be at least 1")
        self.threshold = threshold
        self.patience = patience
        self.streak_start: Optional[int] = None
        self.streak = 0
        self.collapse_step: Optional[int] = None  # first step of the streak that reached patience

    def update(self, step: int, value: float) -> bool:
        """Take one value; True exactly once, on the step the streak reaches ``patience``."""
        if self.collapse_step is not None:
            return False
        if math.isnan(value) or value >= self.threshold:
            self.streak_start, self.streak = None, 0
            return False
        if self.streak_start is None:
            self.streak_start = step
        self.streak += 1
        if self.streak >= self.patience:
            self.collapse_step = self.streak_start
            return True
        return False


def find_collapse(curve: Iterable[tuple[int, float]], threshold: float, patience: int) -> Optional[int]:
    """The collapse step of a whole ``[(step, keep_ratio), ...]`` curve, or None."""
    watch = CollapseWatch(threshold, patience)
    for step, value in curve:
        if watch.update(step, value):
            break
    return watch.collapse_step


class CollapseDetector(L.Callback):
    """Watches ``train/keep_ratio`` (logged every step by the auto-encoder objectives).

    On collapse, rank 0 logs the scalar ``collapse/step`` (value: the first step of the streak)
    and a TensorBoard text ``collapse`` saying when and for how long; ``collapse_step`` keeps it
    for the run summary. Objectives that log no keep ratio are left alone. The state is
    checkpointed, so a resumed run neither loses nor repeats the event.
    """

    def __init__(self, threshold: float = 0.05, patience: int = 25, key: str = "train/keep_ratio"):
        self.watch = CollapseWatch(threshold, patience)
        self.key = key

    @property
    def collapse_step(self) -> Optional[int]:
        return self.watch.collapse_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is None:
            return
        step = trainer.global_step - 1  # the step whose batch just ended
        if not self.watch.update(step, float(value)):
            return
        w = self.watch
        message = (f"keep ratio below {w.threshold:g} for {w.patience} steps from step {w.collapse_step} "
                   f"(flagged at step {step})")
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_text"):  # one event each, written directly
            experiment.add_scalar("collapse/step", float(w.collapse_step), step)
            experiment.add_text("collapse", message, step)

    def state_dict(self) -> dict:
        w = self.watch
        return {"streak_start": w.streak_start, "streak": w.streak, "collapse_step": w.collapse_step}

    def load_state_dict(self, state_dict: dict) -> None:
        w = self.watch
        w.streak_start = state_dict.get("streak_start")
        w.streak = int(state_dict.get("streak", 0))
        w.collapse_step = state_dict.get("collapse_step")
