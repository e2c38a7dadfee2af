"""Qwen2.5-VL (``model_type: qwen2_5_vl``, ``Qwen2_5_VLForConditionalGeneration``): a windowed ViT
(14 px patches), a 2 x 2 patch merger into the LLM width, and M-RoPE; everything it shares with
Qwen3-VL is in ``vlms/qwen.py``."""

from __future__ import annotations

from tokensel.vlms.base import register_family
from tokensel.vlms.qwen import QwenFamily


@register_family
class Qwen25VLFamily(QwenFamily):
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    vision_class = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"
