"""How a training run writes and reads its checkpoints: a Trainer plugin (``plugins=[SafeCheckpointIO()]``).

Lightning's ``TorchCheckpointIO`` writes through fsspec without ``fsync``, and ``Trainer.fit(ckpt_path=...)``
reads with whatever ``weights_only`` it is given. This one writes every checkpoint atomically
(``common/checkpoint_files.py``: temporary file, ``fsync``, ``os.replace``), so a kill during a save
leaves the previous good file, and reads every checkpoint with ``weights_only=True``, so a file
that needs pickled objects is refused with a one-line ``CheckpointError``, never unpickled.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.fabric.plugins import TorchCheckpointIO

from tokensel.common.checkpoint_files import load_plain, save_atomic


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Any] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_plain(path, map_location)  # weights_only=True, whatever the caller asked
