"""TensorBoard image panels: the input, its reconstruction and the kept-token mask over it."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from tokensel.datamodules.batch import FeatureBatch


def mask_overlay(image: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], dim: float = 0.25) -> torch.Tensor:
    """Dim the dropped tokens' patches of ``image`` (B, 3, H, W) and outline the kept ones.

    ``keep`` is (B, N) in [0, 1] in raster order on ``grid``.
    """
    b, _, H, W = image.shape
    keep_map = keep.float().view(b, 1, *grid)
    up = F.interpolate(keep_map, size=(H, W), mode="nearest")
    shaded = image * (dim + (1 - dim) * up)
    # a thin green edge where kept meets dropped, so the token grid reads at a glance
    edge = (F.max_pool2d(up, 3, 1, 1) - (-F.max_pool2d(-up, 3, 1, 1))).clamp(0, 1)
    green = torch.tensor([0.1, 0.9, 0.2], device=image.device).view(1, 3, 1, 1)
    return shaded * (1 - edge) + green * edge


class SelectionPanels(L.Callback):
    """Every ``every_n_steps`` training steps, and on the first batch of every validation, log a
    panel with one column per sample: input, reconstruction (if the objective makes one), and
    the keep mask over the input."""

    def __init__(self, every_n_steps: int = 50, max_images: int = 4, min_side: int = 128):
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.min_side = min_side

    def _log(self, trainer: L.Trainer, pl_module, batch: FeatureBatch, tag: str) -> None:
        if not trainer.is_global_zero or trainer.logger is None or not hasattr(trainer.logger.experiment, "add_image"):
            return
        out = pl_module.visualise(batch, self.max_images)
        image = batch.image[: self.max_images].float()
        if image.shape[-1] < self.min_side:  # small reconstruction targets are unreadable as-is
            image = F.interpolate(image, size=(self.min_side, self.min_side), mode="nearest")
        rows = [image]
        if out.recon is not None:
            rows.append(F.interpolate(out.recon.float(), size=image.shape[-2:], mode="nearest"))
        rows.append(mask_overlay(image, out.keep, batch.grid))
        panel = make_grid(torch.cat(rows), nrow=len(image), padding=2, pad_value=1.0)
        trainer.logger.experiment.add_image(tag, panel.cpu(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module, batch, "panels/train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, pl_module, batch, "panels/val")
