"""LLaVA-NeXT (``model_type: llava_next``, ``LlavaNextForConditionalGeneration``).

Anyres views: the base view and the crops of the best ``image_grid_pinpoints`` resolution, V views
of N tokens per image, each through the same tower and feature layer as LLaVA-1.5
(``vlms/llava.py``). ``view_selection`` chooses how a budget applies: ``per_view`` keeps K of
each view's N tokens (the Gumbel paper selects per crop, and counts the 2,880 = 5 x 576 tokens of
the views, arXiv 2503.16660 Sec. 5 Table 1); ``across`` keeps K of the image's V * N tokens, chosen
jointly (``SelectorNet.select_across``). The kept tokens follow in view-major positional order.
NeXT's own layout (crops unpadded, then an ``image_newline`` after each row) is defined on a full
grid only, so a pruned prompt has neither; the full-token row is the model's own image path,
layout included (its logits equal the model's forward, tested).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokensel.vlms.base import Candidates, register_family
from tokensel.vlms.llava import LlavaFamily


@register_family
class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT: V anyres views of N tokens per image (see the module docstring)."""

    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"
    anyres = True

    def view_counts(self, batch) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in batch["image_sizes"]]

    def candidates(self, batch, features: bool = True, cls_attention: bool = False) -> Candidates:
        counts = self.view_counts(batch)
        out = Candidates(None, [self.grid] * len(counts), [v * self.tokens_per_view for v in counts])
        if not features:  # the full-token row runs the model's own image path
            return out
        space: list = [None] * len(counts)
        tokens: list = [None] * len(counts)
        attention: list = [None] * len(counts)
        pixels = batch["pixel_values"]
        for v in sorted(set(counts)):  # images with the same view count go through the tower together
            rows = [i for i, c in enumerate(counts) if c == v]
            x, t, a = self.view_candidates(pixels[rows, :v], cls_attention)
            for j, i in enumerate(rows):
                space[i], tokens[i], attention[i] = x[j], t[j], None if a is None else a[j]
        out.features, out.tokens = space, tokens
        out.cls_attention = attention if cls_attention else None
        return out

    def image_embeddings(self, batch, candidates: Candidates, kept: Optional[list[torch.Tensor]]) -> list[torch.Tensor]:
        if kept is not None:
            return self.kept_embeddings(candidates, kept)
        native = self.model.model.get_image_features(
            pixel_values=batch["pixel_values"].to(self.model.dtype), image_sizes=batch["image_sizes"],
            vision_feature_layer=self.layer, vision_feature_select_strategy=self.strategy).pooler_output
        return list(native)
