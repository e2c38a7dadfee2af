"""Image panels: the reconstruction target, its reconstruction and the kept-token mask over it,
with each row labelled and every image at its own resolution (TensorBoard ``panels/*``, and the
latest validation panel as ``panel_val.png`` in the run folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

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


def render_panel(rows: Sequence[tuple[str, torch.Tensor]], titles: Sequence[str], scale: int = 2) -> np.ndarray:
    """``(H, W, 3)`` uint8: one labelled row per ``(label, images (B, 3, h, w) in [0, 1])`` and one
    titled column per sample; each image enlarged by the integer ``scale`` with nearest-neighbour
    sampling, so what is shown is exactly the tensor's resolution. Drawn with PIL (cheap enough to
    run every few steps)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    h, w = rows[0][1].shape[-2:]
    cell_h, cell_w, gap, label_w, title_h = h * scale, w * scale, 4, 190, 18
    n_cols = rows[0][1].shape[0]
    canvas = Image.new("RGB", (label_w + n_cols * (cell_w + gap), title_h + len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((label_w + c * (cell_w + gap), 2), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = title_h + r * (cell_h + gap)
        draw.multiline_text((4, top + cell_h // 2), label, fill="black", font=font, anchor="lm")
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c in range(n_cols):
            tile = Image.fromarray(pixels[c]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (cell_w + gap), top))
    return np.asarray(canvas).copy()


class SelectionPanels(L.Callback):
    """Every ``every_n_steps`` training steps, and on the first batch of every validation, log a
    panel with one column per sample and labelled rows: the reconstruction target (the image at
    ``data.recon_size``; the encoder saw it at its own input size), the reconstruction (if the
    objective makes one), and the kept tokens over the target, with each sample's kept count: a
    net trained for a budget shows its top-K at that budget, as deployed (gumbel_ae with
    ``selector.budget``, vp_noise); otherwise the eval-mode mask (gumbel_ae's noiseless gate)."""

    def __init__(self, every_n_steps: int = 50, max_images: int = 4, min_side: int = 128):
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.min_side = min_side  # images smaller than this are drawn at an integer scale up to it

    def panel(self, pl_module, batch: FeatureBatch) -> np.ndarray:
        out = pl_module.visualise(batch, self.max_images)
        image = batch.image[: self.max_images].float()
        side = image.shape[-1]
        rows = [(f"reconstruction target\n({side} px; data.recon_size)", image)]
        if out.recon is not None:
            rows.append(("reconstruction\nfrom the kept tokens", F.interpolate(out.recon.float(), size=image.shape[-2:],
                                                                               mode="nearest")))
        keep = out.keep.float()
        rows.append(("kept tokens (as deployed,\ndropped ones dimmed)", mask_overlay(image, keep, batch.grid)))
        titles = [f"kept {int(k.round().sum())}/{keep.shape[1]}" for k in keep]
        return render_panel(rows, titles, scale=max(1, -(-self.min_side // side)))

    def _log(self, trainer: L.Trainer, pl_module, batch: FeatureBatch, tag: str) -> None:
        if not trainer.is_global_zero or trainer.logger is None or not hasattr(trainer.logger.experiment, "add_image"):
            return
        panel = self.panel(pl_module, batch)
        trainer.logger.experiment.add_image(tag, panel, trainer.global_step, dataformats="HWC")
        folder: Optional[str] = getattr(trainer.logger, "log_dir", None)  # not trainer.log_dir: it broadcasts
        if tag == "panels/val" and folder:
            from PIL import Image

            Image.fromarray(panel).save(Path(folder) / "panel_val.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module, batch, "panels/train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, pl_module, batch, "panels/val")
