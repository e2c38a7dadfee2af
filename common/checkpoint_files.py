"""Checkpoint files: written atomically, read without unpickling anything.

- :func:`save_atomic`: ``torch.save`` into a temporary file in the target's folder, ``fsync``, then
  ``os.replace`` over the target and ``fsync`` the folder. A kill or power loss at any moment leaves
  either the previous file or the new one, never part of one. A kill mid-write can leave the
  temporary file (``.<name>.*.tmp``); :func:`remove_stale_temps` clears them.
- :func:`load_plain`: ``torch.load(weights_only=True)``: tensors and plain Python values only. A file
  that is missing, damaged, or needs pickled Python objects is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from tokensel.common.cache import atomic_write, remove_stale_temps
from tokensel.common.errors import CheckpointError

__all__ = ["save_atomic", "load_plain", "remove_stale_temps"]


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`~tokensel.common.cache.atomic_write`."""
    return atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def load_plain(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        needs = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if needs:
            raise CheckpointError(f"{path}: holds a pickled Python object ({needs[0]}); refused, a checkpoint "
                                  "is read with weights_only=True (tensors and plain values only)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError)") from None
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
