"""What a selector receives: :class:`FeatureBatch`, already on the device.

The datamodule's workers produce a plain dict of pixels, text and boxes (see ``pipeline.py``);
the datamodule turns it into a ``FeatureBatch`` on the device by running the frozen encoder
once (``datamodule.py``). Selectors only ever see this type, never the encoder or the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class FeatureDims:
    """Geometry of the frozen encoder's output, fixed for a run. Selectors are built from it."""

    num_tokens: int  # N = h * w
    dim: int  # C
    grid: tuple[int, int]  # (h, w)
    image_size: int  # side of the reconstruction target I

    def as_dict(self) -> dict:
        return {"num_tokens": self.num_tokens, "dim": self.dim, "grid": list(self.grid), "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDims":
        return cls(int(d["num_tokens"]), int(d["dim"]), (int(d["grid"][0]), int(d["grid"][1])), int(d["image_size"]))


@dataclass
class FeatureBatch:
    """One batch of frozen-encoder features and everything a selector objective may need.

    - ``features``: (B, N, C) patch tokens, prefix/CLS tokens removed, float32, no grad.
    - ``grid``: (h, w) with h * w = N, raster order.
    - ``image``: (B, 3, S, S) the reconstruction target I, RGB in [0, 1] (this is the one place
      its normalisation is defined), the same view the encoder saw, resized to ``S = data.recon_size``.
    - ``prompt`` / ``target``: the text. COCO: an empty prompt and one caption as target.
      DocVQA / ChartQA: the question as prompt and the first answer as target.
    - ``source``, ``keys``: per sample.
    - ``answer_tokens``: (B, N) bool, the tokens covered by the answer box, or ``None`` when no
      sample in the batch has a box; rows of samples without a box are all False and
      ``has_answer_box`` marks which rows are real.
    - ``n_skipped``: samples the workers skipped (corrupt, unreadable) since the previous batch.
    - ``view_of`` / ``view_index``: (B,) long, with ``data.views=anyres`` only (else ``None``):
      each row is one view (LLaVA-NeXT's base view 0, then its crops), of sample ``view_of`` of the
      reader batch; text, source and answer boxes are per view, keys are ``<key>/v<j>``.
    - ``cls_attention``: (B, N) float32, the frozen encoder's CLS->patch attention (head mean) at
      block ``data.cls_attention_layer``, or ``None`` when that is unset (the default). Prefix
      keys are dropped and not renormalised, so rows sum to <= 1. Used by the ``cls_attention``
      baseline (``selectors/baselines.py``).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    image: torch.Tensor
    prompt: list[str]
    target: list[str]
    source: list[str]
    keys: list[str]
    answer_tokens: Optional[torch.Tensor] = None
    has_answer_box: Optional[torch.Tensor] = None
    n_skipped: int = 0
    cls_attention: Optional[torch.Tensor] = None
    view_of: Optional[torch.Tensor] = None
    view_index: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def image_groups(self) -> list[torch.Tensor]:
        """With anyres views: the rows of each image, grouped by view count, as ``(G, V)`` index
        tensors (one row per image, its views in order); without views, one ``(B, 1)`` group."""
        if self.view_of is None:
            return [torch.arange(len(self)).unsqueeze(1)]
        rows: dict[int, list[int]] = {}
        for row, image in enumerate(self.view_of.tolist()):
            rows.setdefault(image, []).append(row)
        by_count: dict[int, list[list[int]]] = {}
        for image_rows in rows.values():
            by_count.setdefault(len(image_rows), []).append(image_rows)
        return [torch.tensor(groups) for _, groups in sorted(by_count.items())]

    def head(self, n: int) -> "FeatureBatch":
        """The first ``n`` samples (for panels and quick looks)."""
        def cut(x):
            return None if x is None else x[:n]

        return FeatureBatch(self.features[:n], self.grid, self.image[:n], self.prompt[:n], self.target[:n],
                            self.source[:n], self.keys[:n], cut(self.answer_tokens), cut(self.has_answer_box), 0,
                            cls_attention=cut(self.cls_attention), view_of=cut(self.view_of),
                            view_index=cut(self.view_index))


def boxes_to_token_mask(
    boxes: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int], min_overlap: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map answer boxes in encoder-input pixels to the patch tokens they cover.

    ``boxes`` is (B, 4) ``[x0, y0, x1, y1]`` with NaN rows for samples without a box. A token
    counts as covered when its patch overlaps the box by at least ``min_overlap`` of the patch
    area; the patch under the box centre always counts, so tiny boxes cover at least one token.
    Returns ``(mask (B, N) bool, has_box (B,) bool)``.
    """
    h, w = grid
    H, W = input_size
    has_box = ~torch.isnan(boxes).any(dim=1)
    ph, pw = H / h, W / w
    ys = (torch.arange(h, dtype=torch.float32, device=boxes.device) * ph).view(1, h, 1)
    xs = (torch.arange(w, dtype=torch.float32, device=boxes.device) * pw).view(1, 1, w)
    b = torch.nan_to_num(boxes.float(), nan=0.0)
    x0, y0, x1, y1 = (b[:, i].view(-1, 1, 1) for i in range(4))
    overlap_y = (torch.minimum(ys + ph, y1) - torch.maximum(ys, y0)).clamp(min=0)  # (B, h, 1)
    overlap_x = (torch.minimum(xs + pw, x1) - torch.maximum(xs, x0)).clamp(min=0)  # (B, 1, w)
    covered = (overlap_y * overlap_x) >= min_overlap * ph * pw
    cy = ((y0 + y1) / 2 / ph).long().clamp(0, h - 1).view(-1)
    cx = ((x0 + x1) / 2 / pw).long().clamp(0, w - 1).view(-1)
    covered[torch.arange(len(b)), cy, cx] = True
    mask = covered.reshape(len(b), h * w) & has_box[:, None]
    return mask, has_box
