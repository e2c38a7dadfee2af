"""``open_clip:<model>``: any open_clip model with a ViT visual tower (e.g. ``open_clip:ViT-L-14-336``).
tokensel's own configs (``common/model_configs/``, e.g. ``open_clip:coca_tiny``) resolve too.

Weights (``encoder.pretrained``): ``""`` random init, a local file, or an open_clip tag
(``openai``, ``laion2b_s32b_b82k``, ...). The language tower is dropped after building; where a
query-aware selector needs it, :func:`build_open_clip_text_tower` builds the same model again and
keeps it (:class:`OpenClipTextTower`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokensel.common.attention import ClsRow, cls_softmax, fused_qk, split_heads
from tokensel.common.hub import looks_like_path, weights_download
from tokensel.common.open_clip_configs import register_model_configs
from tokensel.datamodules.encoders.base import Backbone, EncoderError, first_line, hub_tag_error, no_cls_token, pick_block
from tokensel.datamodules.samples import Preprocess


class OpenClipViT(Backbone):
    """An open_clip model's ViT visual tower (``model.visual``); the geometry is read off it."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        visual = model.visual
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.dim = int(visual.transformer.width)
        self.depth = len(visual.transformer.resblocks)

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        return self.model.visual.forward_intermediates(
            pixels, indices=[layer], normalize_intermediates=norm, output_fmt="NLC", intermediates_only=True,
        )["image_intermediates"][0]

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        """open_clip ``ResidualAttentionBlock.attn`` (``nn.MultiheadAttention``, input ``ln_1(x)``,
        ``(L, B, C)`` unless ``batch_first``) or ``CustomResidualAttentionBlock.attn`` (open_clip's
        ``Attention``, batch-first, optional ``ln_q``/``ln_k``; scaled-cosine attention included)."""
        visual = self.model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise EncoderError(f"cls_attention not supported for {name}: its visual tower has no transformer.resblocks")
        if getattr(visual, "class_embedding", None) is None:
            raise no_cls_token(name)
        attn = getattr(pick_block(name, list(blocks), layer), "attn", None)
        prefix = 1  # forward_intermediates drops one class token
        if isinstance(attn, nn.MultiheadAttention):
            return attn, _multihead_cls_row(attn, prefix)
        if attn is not None and hasattr(attn, "in_proj_weight") and hasattr(attn, "ln_q"):
            return attn, _custom_cls_row(attn, prefix)
        raise EncoderError(f"cls_attention not supported for {name}: its blocks' attention is neither "
                           "nn.MultiheadAttention nor open_clip's Attention")


def _multihead_cls_row(attn: nn.MultiheadAttention, prefix: int) -> ClsRow:
    dim, heads = attn.embed_dim, attn.num_heads
    if attn._qkv_same_embed_dim:
        wq, wk = attn.in_proj_weight[:dim], attn.in_proj_weight[dim:2 * dim]
    else:
        wq, wk = attn.q_proj_weight, attn.k_proj_weight
    b = attn.in_proj_bias
    bq, bk = (None, None) if b is None else (b[:dim], b[dim:2 * dim])
    scale = float(attn.head_dim) ** -0.5

    def cls_row(x: torch.Tensor) -> torch.Tensor:
        if not attn.batch_first:
            x = x.transpose(0, 1)
        q, k = split_heads(F.linear(x[:, :1], wq, bq), heads), split_heads(F.linear(x, wk, bk), heads)
        return cls_softmax(q, k, scale, prefix)

    return cls_row


def _custom_cls_row(attn: nn.Module, prefix: int) -> ClsRow:
    heads = int(attn.num_heads)

    def cls_row(x: torch.Tensor) -> torch.Tensor:
        q, k = fused_qk(x, attn.in_proj_weight, attn.in_proj_bias, x.shape[-1], heads)
        if attn.logit_scale is not None:  # scaled cosine attention
            scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp().float().view(1, heads, 1, 1)
            return cls_softmax(F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), 1.0, prefix)
        return cls_softmax(attn.ln_q(q), attn.ln_k(k), float(attn.scale), prefix)

    return cls_row


def create_open_clip(model_name: str, pretrained: str, image_size: Optional[int]) -> nn.Module:
    """The whole open_clip model (both towers), or a one-line :class:`EncoderError`."""
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise EncoderError(f"encoder.name='open_clip:{model_name}': open_clip has no such model")
    kwargs = {"force_image_size": image_size} if image_size else {}
    try:
        with weights_download(f"encoder open_clip:{model_name}", pretrained):
            model = open_clip.create_model(model_name, pretrained=pretrained or None, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained and not looks_like_path(pretrained):
            raise hub_tag_error(f"open_clip:{model_name}", pretrained, err) from None
        raise EncoderError(f"encoder open_clip:{model_name} with pretrained={pretrained!r}: {first_line(err)}") from None
    if not hasattr(model.visual, "forward_intermediates") or not hasattr(model.visual, "grid_size"):
        raise EncoderError(f"encoder.name='open_clip:{model_name}': visual tower is not a ViT with patch tokens")
    return model


def build_open_clip(model_name: str, pretrained: str, image_size: Optional[int]) -> OpenClipViT:
    model = create_open_clip(model_name, pretrained, image_size)
    visual = model.visual
    for attr in ("transformer", "token_embedding", "ln_final", "text", "text_decoder"):  # the language tower
        if hasattr(model, attr):
            setattr(model, attr, None)
    pc = visual.preprocess_cfg
    H, W = pc["size"] if isinstance(pc["size"], (tuple, list)) else (pc["size"], pc["size"])
    preprocess = Preprocess((int(H), int(W)), tuple(pc["mean"]), tuple(pc["std"]), pc.get("interpolation", "bicubic"))
    return OpenClipViT(model, preprocess)


class OpenClipTextTower(nn.Module):
    """The language side of an open_clip model (CLIP or CoCa) for query-aware selection: the
    instruction's embedding (:meth:`embed_text`) and the encoder's patch tokens mapped into the same
    space (:meth:`embed_tokens`), so that their cosine is the tokens' relevance to the instruction.

    Patch tokens to the joint space (CDPruner, arXiv 2506.10967, applies the image head to LLaVA's
    penultimate-layer tokens the same way):

    - CLIP (no attentional pooler): ``ln_post`` (unless ``encoder.norm`` applied it already),
      then ``proj``;
    - CoCa (attentional pooler): each token alone through the pooler (a single key, so every query
      returns its value projection), then ``ln_post`` and ``proj``: the contrastive embedding an
      image made of that one token would have.
    """

    def __init__(self, model: nn.Module, tokenizer, features_normed: bool):
        super().__init__()
        self.model, self.tokenizer, self.features_normed = model, tokenizer, features_normed
        visual = model.visual
        self.pooler = getattr(visual, "attn_pool", None)
        if self.pooler is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
            raise EncoderError("open_clip model with parallel/cascade attentional pooling: no per-token image "
                               "embedding for query-aware selectors")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "OpenClipTextTower":
        return super().train(False)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """``(B, D)`` the text tower's (contrastive) embedding of each text."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()

    @torch.no_grad()
    def embed_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` patch features as the feature source gives them -> ``(B, N, D)``."""
        visual = self.model.visual
        x = features.to(next(self.model.parameters()).dtype)
        if self.pooler is not None:
            attn = self.pooler.attn
            width = attn.embed_dim
            if attn._qkv_same_embed_dim:
                w_v = attn.in_proj_weight[2 * width:]
            else:
                w_v = attn.v_proj_weight
            b_v = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
            x = attn.out_proj(F.linear(self.pooler.ln_k(x), w_v, b_v))
            x = visual.ln_post(x)
        elif not self.features_normed:
            x = visual.ln_post(x)
        return (x @ visual.proj).float()


def build_open_clip_text_tower(model_name: str, pretrained: str, image_size: Optional[int],
                               features_normed: bool) -> OpenClipTextTower:
    """The text tower of ``open_clip:<model_name>`` with these weights (see :class:`OpenClipTextTower`)."""
    import open_clip

    model = create_open_clip(model_name, pretrained, image_size)
    return OpenClipTextTower(model, open_clip.get_tokenizer(model_name), features_normed)
