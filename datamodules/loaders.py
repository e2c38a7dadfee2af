"""The DataLoaders of a training run, made so that a resumed run continues exactly.

:class:`StreamLoader` (training) tells its :class:`ShardStream` which epoch each pass reads and,
after a resume, how many of its batches to skip, and reports that position for a checkpoint.

Both loaders also keep torch's global RNG where an uninterrupted run would have it. A DataLoader
takes one int64 from that RNG whenever it makes a new iterator (its workers' base seed): on every
pass in the main process (``num_workers=0``), on the first pass only with persistent workers. The
selector's noise comes from the same RNG, which a resume restores when training restarts
(``callbacks/rng_state.py``); from then on the resumed run must draw what the uninterrupted run
drew after its checkpoint. Two passes would not:

- the first training pass after a checkpoint taken at an epoch end, with ``num_workers=0``: the
  uninterrupted run made its iterator after the checkpoint, the resumed run before the restore.
  That pass draws once more, when it fetches its first batch;
- the first validation with persistent workers, when the uninterrupted run had validated before
  its checkpoint (and made its one iterator then): the resumed run's first iterator would draw
  again. That draw is undone.

A run that is not resumed draws exactly what plain DataLoaders draw.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from tokensel.datamodules.pipeline import ShardStream


def _draw_as_a_new_iterator() -> None:
    """The draw a DataLoader without a generator of its own makes for each new iterator."""
    torch.empty((), dtype=torch.int64).random_()


def _draw_then(iterator: Iterator) -> Iterator:
    _draw_as_a_new_iterator()  # runs at the first next(): after the resumed run restored the RNG
    yield from iterator


class StreamLoader(DataLoader):
    """The training loader of one :class:`ShardStream`.

    Before each pass it tells the stream (and so its workers) which epoch to read: the trainer's
    epoch (``next_epoch()``), or, on the first pass after a resume, the epoch the checkpoint
    recorded, without the batches of it already trained on. It is a Lightning stateful loader:
    ``state_dict`` says where training is, from ``progress()``: the trainer's batches processed
    this epoch (a step cut short by an exception is not one: the resume redoes it) and per epoch.
    """

    def __init__(self, stream: ShardStream, next_epoch: Callable[[], int], progress: Callable[[], tuple[int, int]],
                 **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.next_epoch, self.progress = next_epoch, progress
        self.epoch: Optional[int] = None  # the epoch of the pass under way
        self._resume_at: Optional[tuple[int, int]] = None

    def __iter__(self) -> Iterator:
        resumed = self._resume_at is not None
        epoch, done = self._resume_at or (self.next_epoch(), 0)
        self._resume_at = None
        self.epoch = epoch
        self.dataset.seek(epoch, done)
        iterator = super().__iter__()
        if resumed and done == 0 and self.num_workers == 0:
            return _draw_then(iterator)  # a pass the uninterrupted run started after its checkpoint
        return iterator

    def state_dict(self) -> dict:
        if self.epoch is None:
            return {}
        done, per_epoch = self.progress()
        if done >= per_epoch:
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches"]))


class ValLoader(DataLoader):
    """The validation loader. ``validated_before_resume``: the checkpoint this run resumed from was
    taken after the uninterrupted run's first validation (or sanity check)."""

    def __init__(self, stream: ShardStream, validated_before_resume: bool = False, **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self._undo_first_draw = validated_before_resume and self.persistent_workers
        self.iterated = False

    def __iter__(self) -> Iterator:
        self.iterated = True
        if not self._undo_first_draw:
            return super().__iter__()
        self._undo_first_draw = False
        state = torch.get_rng_state()
        iterator = super().__iter__()  # the draw the uninterrupted run made before its checkpoint
        torch.set_rng_state(state)
        return iterator
