"""``hf_llava:<folder or hub id>``: the vision tower of a Hugging Face LLaVA, giving exactly the
features its projector receives (``hf_llava:llava-hf/llava-1.5-7b-hf``, or a local folder).

The weights come from the LLaVA itself, so ``encoder.pretrained`` stays empty. Only the
checkpoint's ``vision_tower.*`` tensors are read (the language model is never loaded), and the
preprocessing is the folder's CLIP image processor config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tokensel.common.hub import hf_fetch, hf_model_is_local, hf_source_error, hub_download, load_llava_config
from tokensel.datamodules.encoders.base import Backbone, ClsRow, EncoderError, cls_softmax, no_cls_token, pick_block, split_heads
from tokensel.datamodules.samples import Preprocess

log = logging.getLogger("tokensel.encoders")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


class HFVisionTower(Backbone):
    """A LLaVA's vision tower (a transformers vision model, e.g. ``CLIPVisionModel``) that returns
    ``hidden_states[layer]`` without its prefix (CLS) token: with LLaVA's ``vision_feature_layer``
    as ``layer`` and ``vision_feature_select_strategy="default"`` these are exactly the features
    LLaVA's multi-modal projector receives. ``layer`` indexes ``hidden_states`` as LLaVA does (0:
    the embeddings, -1: the last block, -2: the penultimate). ``norm`` applies ``post_layernorm``
    (LLaVA does not). ``interpolate``: the input size differs from the tower's, so position
    embeddings are interpolated."""

    layer_help = "hidden states (0 the embeddings, -1 the last block, -2 the penultimate as LLaVA uses)"

    def __init__(self, tower: nn.Module, preprocess: Preprocess, interpolate: bool = False):
        super().__init__()
        self.model = tower
        self.preprocess = preprocess
        self.interpolate = interpolate
        config = tower.config
        patch = int(config.patch_size)
        self.grid = (preprocess.size[0] // patch, preprocess.size[1] // patch)
        self.dim = int(config.hidden_size)
        self.depth = int(config.num_hidden_layers) + 1  # hidden states: embeddings + every block

    def _vision(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)  # transformers 5 flattened CLIPVisionModel

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        hidden = self.model(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states[layer]
        if norm:
            hidden = self._vision().post_layernorm(hidden)
        prefix = hidden.shape[1] - self.grid[0] * self.grid[1]  # 1 (CLS) for CLIP, 0 for SigLIP
        return hidden[:, prefix:]

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        """transformers ``CLIPEncoderLayer.self_attn`` (``q_proj``/``k_proj``, input ``layer_norm1(x)``).
        ``layer`` indexes ``encoder.layers``, so a negative ``layer`` is the block whose output is
        ``hidden_states[layer]`` (VisionZip's ``attentions[-2]``)."""
        vision = self._vision()
        layers = getattr(getattr(vision, "encoder", None), "layers", None)
        if layers is None:
            raise EncoderError(f"cls_attention not supported for {name}: its tower has no vision_model.encoder.layers")
        if getattr(vision.embeddings, "class_embedding", None) is None:
            raise no_cls_token(name, " (e.g. SigLIP)")
        attn = getattr(pick_block(name, list(layers), layer), "self_attn", None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
            raise EncoderError(f"cls_attention not supported for {name}: its layers' self_attn has no q_proj/k_proj")
        heads = int(attn.num_heads)

        def cls_row(x: torch.Tensor) -> torch.Tensor:
            q, k = split_heads(attn.q_proj(x[:, :1]), heads), split_heads(attn.k_proj(x), heads)
            return cls_softmax(q, k, float(attn.scale), 1)

        return attn, cls_row


def _llava_vision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Only the vision tower's tensors of a LLaVA checkpoint, with the ``vision_tower.`` prefix
    (``vision_tower.`` in llava-hf checkpoints, ``model.vision_tower.`` as transformers 5 saves
    them) stripped. Safetensors are read lazily, so the language model is never loaded."""
    from safetensors import safe_open

    def wanted(key: str) -> Optional[str]:
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    index = hf_fetch(name, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if wanted(k) is not None})
        files = [hf_fetch(name, shard) for shard in shards]
    else:
        single = hf_fetch(name, "model.safetensors", required=False)
        if single is None:
            raise FileNotFoundError("no model.safetensors or model.safetensors.index.json")
        files = [single]
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                short = wanted(key)
                if short is not None:
                    state[short] = f.get_tensor(key)
    if not state:
        raise ValueError("the checkpoint has no vision_tower.* weights")
    return state



def _llava_preprocess(name: str, vision_config) -> Preprocess:
    """The CLIP image processor's final size, mean and std, from the folder's preprocessor config
    when there is one, else the CLIP defaults at the vision config's image size."""
    size = int(vision_config.image_size)
    cfg: dict = {}
    for filename in ("preprocessor_config.json", "processor_config.json"):
        path = hf_fetch(name, filename, required=False)
        if path is not None:
            data = json.loads(path.read_text())
            cfg = data.get("image_processor", data)
            break
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
    sz = crop or cfg.get("size") or {}
    if isinstance(sz, int):
        hw = (sz, sz)
    elif "height" in sz and "width" in sz:
        hw = (int(sz["height"]), int(sz["width"]))
    elif "shortest_edge" in sz:
        hw = (int(sz["shortest_edge"]),) * 2
    else:
        hw = (size, size)
    mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    resample = cfg.get("resample", 3)
    interpolation = _PIL_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic"
    return Preprocess(hw, mean, std, interpolation)


def build_hf_llava(model_name: str, pretrained: str, image_size: Optional[int]) -> HFVisionTower:
    """Load only the vision tower of the LLaVA ``model_name`` (a local folder or a hub id): the
    ``LlavaConfig`` gives ``vision_config``, ``AutoModel.from_config`` builds the tower as LLaVA
    does, and only the checkpoint's ``vision_tower.*`` tensors are read into it."""
    from transformers import AutoModel

    name = f"hf_llava:{model_name}"
    if pretrained:
        raise EncoderError(f"encoder.pretrained={pretrained!r}: {name} takes its weights from the LLaVA folder "
                           "or hub repo; leave encoder.pretrained empty")
    if hf_model_is_local(model_name) and not Path(model_name).expanduser().is_dir():
        raise EncoderError(f"encoder.name={name!r}: no such local folder")
    announce = None if hf_model_is_local(model_name) else f"encoder {name}: fetching the vision tower from the hub"
    try:
        with hub_download(announce):  # a failure is reported once, below
            vision_config = load_llava_config(model_name).vision_config
            state = _llava_vision_state_dict(model_name)
            preprocess = _llava_preprocess(model_name, vision_config)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise EncoderError(hf_source_error(f"encoder.name={name!r}", model_name, err)) from None
    tower = AutoModel.from_config(vision_config)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise EncoderError(f"encoder.name={name!r}: the checkpoint's vision_tower does not fit its vision_config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    native = int(vision_config.image_size)
    side = int(image_size) if image_size else native
    if side != native:
        log.warning("%s: encoder.image_size=%d differs from the tower's %d: position embeddings are interpolated, "
                    "so the features are not the ones LLaVA was trained on", name, side, native)
        preprocess = Preprocess((side, side), preprocess.mean, preprocess.std, preprocess.interpolation)
    elif preprocess.size != (native, native):
        log.warning("%s: the preprocessor's size %s differs from the tower's image_size %d: using %d",
                    name, preprocess.size, native, native)
        preprocess = Preprocess((native, native), preprocess.mean, preprocess.std, preprocess.interpolation)
    return HFVisionTower(tower, preprocess, interpolate=side != native)
