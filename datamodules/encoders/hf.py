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

from tokensel.common.attention import ClsRow
from tokensel.common.errors import TokenselError, VLMError
from tokensel.common.hub import hf_model_is_local, hf_source_error
from tokensel.datamodules.encoders.base import Backbone, EncoderError
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
        """The family's tower block ``layer`` (an index into its blocks, so a negative ``layer`` is
        the block whose output is ``hidden_states[layer]``: VisionZip's ``attentions[-2]``)."""
        try:
            return self.source.cls_attention_site(layer)
        except VLMError as err:
            raise EncoderError(f"encoder {name}: {err}; unset data.cls_attention_layer or use a selector that "
                               "needs none") from None


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
