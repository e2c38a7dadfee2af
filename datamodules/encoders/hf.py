"""``hf:<folder or hub id>``: the candidate tokens of any registered VLM family as features
(``hf:llava-hf/llava-1.5-7b-hf``, ``hf:Qwen/Qwen2.5-VL-7B-Instruct``, or a local folder), so a
selector trains on exactly the tokens it will prune. ``hf_llava:`` is the older spelling.

The family (``vlms/``, picked by the folder's ``model_type``) reads only the checkpoint's vision
weights and says how pixels become its candidates; this file makes that a :class:`Backbone`:
LLaVA's tower at any hidden-state layer (its ``vision_feature_layer`` is what the projector
receives), Qwen-VL's merger output at one fixed resolution (``encoder.image_size``, or the
processor's when ``min_pixels = max_pixels``; variable resolution is refused in one line). The
weights come with the model, so ``encoder.pretrained`` stays empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tokensel.common.errors import TokenselError
from tokensel.common.hub import hf_model_is_local, hf_source_error
from tokensel.datamodules.encoders.base import Backbone, ClsRow, EncoderError, cls_softmax, no_cls_token, pick_block, split_heads
from tokensel.datamodules.samples import Preprocess
from tokensel.vlms import family_of
from tokensel.vlms.sources import CandidateEncoder


class HFBackbone(Backbone):
    """A family's :class:`~tokensel.vlms.sources.CandidateEncoder` as an encoder backbone."""

    def __init__(self, source: CandidateEncoder):
        super().__init__()
        self.source = source
        self.model = source.tower
        self.preprocess = Preprocess(*(getattr(source.pixels, f) for f in ("size", "mean", "std", "interpolation")))
        self.grid = source.grid
        self.dim = source.dim
        self.depth = source.depth
        self.layer_help = source.layer_help

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        if norm and not self.source.has_norm:
            raise EncoderError("encoder.norm=true: this model's candidates have no final norm to apply; "
                               "set encoder.norm=false")
        return self.source.tokens(pixels, layer, norm)

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        """transformers ``CLIPEncoderLayer.self_attn`` (``q_proj``/``k_proj``, input ``layer_norm1(x)``).
        ``layer`` indexes ``encoder.layers``, so a negative ``layer`` is the block whose output is
        ``hidden_states[layer]`` (VisionZip's ``attentions[-2]``)."""
        vision = getattr(self.model, "vision_model", self.model)  # transformers 5 flattened CLIPVisionModel
        layers = getattr(getattr(vision, "encoder", None), "layers", None)
        embeddings = getattr(vision, "embeddings", None)
        if layers is None or embeddings is None:
            raise no_cls_token(name, " (e.g. Qwen-VL's merged tokens)") if embeddings is None else EncoderError(
                f"cls_attention not supported for {name}: its tower has no vision_model.encoder.layers")
        if getattr(embeddings, "class_embedding", None) is None:
            raise no_cls_token(name, " (e.g. SigLIP)")
        attn = getattr(pick_block(name, list(layers), layer), "self_attn", None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
            raise EncoderError(f"cls_attention not supported for {name}: its layers' self_attn has no q_proj/k_proj")
        heads = int(attn.num_heads)

        def cls_row(x: torch.Tensor) -> torch.Tensor:
            q, k = split_heads(attn.q_proj(x[:, :1]), heads), split_heads(attn.k_proj(x), heads)
            return cls_softmax(q, k, float(attn.scale), 1)

        return attn, cls_row


def build_hf(model_name: str, pretrained: str, image_size: Optional[int], library: str = "hf") -> HFBackbone:
    """The candidates of the VLM ``model_name`` (a local folder or a hub id), its family picked by
    the config's ``model_type``."""
    name = f"{library}:{model_name}"
    if pretrained:
        raise EncoderError(f"encoder.pretrained={pretrained!r}: {name} takes its weights from the model folder "
                           "or hub repo; leave encoder.pretrained empty")
    if hf_model_is_local(model_name) and not Path(model_name).expanduser().is_dir():
        raise EncoderError(f"encoder.name={name!r}: no such local folder")
    try:
        family, config = family_of(model_name, "encoder.name")
        source = family.feature_source(model_name, config, image_size)
    except TokenselError as err:
        raise EncoderError(str(err).replace(f"encoder.name={model_name!r}", f"encoder.name={name!r}")) from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise EncoderError(hf_source_error(f"encoder.name={name!r}", model_name, err)) from None
    return HFBackbone(source)


def build_hf_llava(model_name: str, pretrained: str, image_size: Optional[int]) -> HFBackbone:
    """``hf_llava:<model>``, the older spelling of ``hf:<model>``."""
    return build_hf(model_name, pretrained, image_size, library="hf_llava")
