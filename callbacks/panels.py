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


def render_panel(rows: Sequence[tuple[str, torch.Tensor]], titles: Sequence[str], scale: int = 2,
                 dpi: int = 100) -> np.ndarray:
    """``(H, W, 3)`` uint8: one labelled row per ``(label, images (B, 3, h, w) in [0, 1])`` and one
    titled column per sample; each image drawn at ``scale`` screen pixels per image pixel, no
    smoothing, so what is shown is exactly the tensor's resolution."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = rows[0][1].shape[-2:]
    n_rows, n_cols = len(rows), rows[0][1].shape[0]
    label_w, title_h, gap = 1.9, 0.3, 0.06  # inches
    cell_w, cell_h = w * scale / dpi, h * scale / dpi
    fig = Figure(figsize=(label_w + n_cols * (cell_w + gap), title_h + n_rows * (cell_h + gap)), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    W, H = fig.get_size_inches()
    for r, (label, images) in enumerate(rows):
        top = H - title_h - r * (cell_h + gap)
        fig.text(0.05 / W, (top - cell_h / 2) / H, label, fontsize=7, va="center", ha="left", wrap=True)
        for c in range(n_cols):
            ax = fig.add_axes(((label_w + c * (cell_w + gap)) / W, (top - cell_h) / H, cell_w / W, cell_h / H))
            ax.imshow(images[c].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class SelectionPanels(L.Callback):
    """Every ``every_n_steps`` training steps, and on the first batch of every validation, log a
    panel with one column per sample and labelled rows: the reconstruction target (the image at
    ``data.recon_size``; the encoder saw it at its own input size), the reconstruction (if the
    objective makes one), and the eval-mode keep mask over the target (the mask inference ranks:
    gumbel_ae's noiseless mask, vp_noise's hard top-K), with each sample's kept count."""

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
        rows.append(("kept tokens (eval-mode mask,\ndropped ones dimmed)", mask_overlay(image, keep, batch.grid)))
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
