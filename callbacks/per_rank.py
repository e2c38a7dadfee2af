"""State that differs between ranks, in a checkpoint that only rank 0 writes.

Lightning saves a callback's ``state_dict()`` from rank 0 alone. What each rank holds on its own
(its RNG states, its count of skipped samples) is gathered into a list, one entry per rank, when
a checkpoint is saved (every rank saves), and each rank takes its own entry back on resume.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist


def gather(trainer, value: Any) -> list:
    """``[value of rank 0, value of rank 1, ...]``; call it on every rank at once."""
    if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
        values: list = [None] * trainer.world_size
        dist.all_gather_object(values, value)
        return values
    return [value]


def mine(trainer, values: Optional[list]) -> Any:
    """This rank's entry of a :func:`gather` list (None if there is none)."""
    if not values:
        return None
    return values[trainer.global_rank] if len(values) == trainer.world_size else None
