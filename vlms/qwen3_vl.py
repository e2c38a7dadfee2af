"""Qwen3-VL (``model_type: qwen3_vl``, ``Qwen3VLForConditionalGeneration``): 16 px patches, a 2 x 2
merger, M-RoPE, and DeepStack: the outputs of a few early ViT blocks, merged like the final one, are
added to the hidden states of the first LLM layers at the image tokens. A pruned prompt keeps the
DeepStack features of exactly the kept tokens (the same keep list, as TensorRT-Edge-LLM and
OpenVINO GenAI's CDPruner port do). Everything else is ``vlms/qwen.py``."""

from __future__ import annotations

from typing import Optional

import torch

from tokensel.vlms.base import Candidates, register_family
from tokensel.vlms.qwen import QwenFamily


@register_family
class Qwen3VLFamily(QwenFamily):
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    vision_class = "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel"

    def image_extras(self, out) -> dict:
        """Per image, its DeepStack features: one ``(N, D)`` tensor per injected LLM layer."""
        per_layer = [list(layer) for layer in out.deepstack_features]
        return {"deepstack": [list(image) for image in zip(*per_layer)]}

    def image_encoder_output(self, tokens: list[torch.Tensor], candidates: Candidates,
                             kept: Optional[list[torch.Tensor]]):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        deepstack = candidates.extras["deepstack"]
        if kept is not None:
            deepstack = [[layer[k.to(layer.device)] for layer in image] for image, k in zip(deepstack, kept)]
        per_layer = [tuple(layers) for layers in zip(*deepstack)]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(tokens), deepstack_features=per_layer)
