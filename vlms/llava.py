"""LLaVA-1.5 (``model_type: llava``, ``LlavaForConditionalGeneration``).

The selector sits where AutoSelect (arXiv 2603.07135, Sec. 1) and the Gumbel auto-encoder
(arXiv 2503.16660, Sec. 4) put it: after the vision tower's feature layer, before the projector::

    pixels -> vision tower -> hidden_states[vision_feature_layer] (CLS dropped, LLaVA's "default"
    strategy) -> select(features, budget) -> K tokens in positional order -> multi_modal_projector
    -> the K embeddings replace the image's placeholders in the processor's own prompt -> generate

``feature_space="projector"`` selects among the projected embeddings instead, as DivPrune (Alvar
et al., CVPR 2025) is run by its authors. A selector that reads the tower's CLS attention
(``cls_attention``, ``visionzip``) gets the CLS->patch attention of the block whose output is the
feature layer, as VisionZip reads ``attentions[-2]`` beside ``hidden_states[-2]`` (arXiv 2412.04467,
Sec. 3.1); it is read from the same tower pass (:func:`tower_cls_attention_site`).

Positions are 1-D: the pruned prompt is cut, left-padded again, and numbered one position per
token as ``generate`` numbers any left-padded prompt, so a row's answer does not depend on its batch.

Also here: :class:`LlavaTower`, the training feature source (``encoder.name=hf:<llava>``; only the
checkpoint's vision-tower tensors are read), and :func:`assemble_llava`, the LLaVA built from a
vision tower and a causal LM (``make vlm``).
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

from tokensel.common.attention import ClsRow, capture_cls_row, cls_softmax, split_heads
from tokensel.common.errors import VLMError
from tokensel.vlms.base import Candidates, PrunedPrompt, VLMFamily, image_run, left_pad, register_family
from tokensel.vlms.sources import (CandidateEncoder, PIL_RESAMPLE, PixelSpec, fetching, load_into, processor_config,
                                   read_tensors)

log = logging.getLogger("tokensel.vlms")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-1.5's conversation as a chat template (a model trained on it, make vlm's, then prompts exactly
# as it was trained: "USER: <image>\n{text} ASSISTANT:").
LLAVA15_CHAT_TEMPLATE = ("{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
                         "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                         "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def feature_layer(config) -> int:
    """LLaVA's ``vision_feature_layer`` (an index into the tower's ``hidden_states``)."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise VLMError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    return layer


def feature_block(layer: int) -> int:
    """The tower block (an index into its blocks) whose output is ``hidden_states[layer]``."""
    if layer == 0:
        raise VLMError("vision_feature_layer=0 is the embeddings, which no attention block produces: "
                       "it has no CLS attention")
    return layer if layer < 0 else layer - 1


def tower_cls_attention_site(tower: nn.Module, block: int, patches: int) -> tuple[nn.Module, ClsRow]:
    """Block ``block`` (an index into the blocks) of a transformers ViT with a CLS token, and the map
    from its attention's input to the CLS->patch attention ``(B, patches)`` (head mean, the
    ``L - patches`` prefix keys dropped). CLIP-style blocks (``self_attn``: ``q_proj``, ``k_proj``,
    ``num_heads``, ``scale``) and DINOv2-style ones (``attention``: ``q_proj``, ``k_proj``,
    ``num_attention_heads``, ``scaling``); the attention's input is the block's normed hidden state."""
    vision = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
    embeddings = getattr(vision, "embeddings", None)
    if getattr(embeddings, "class_embedding", None) is None and getattr(embeddings, "cls_token", None) is None:
        raise VLMError(f"its vision tower ({type(vision).__name__}) has no CLS token, so it has no CLS attention")
    encoder = getattr(vision, "encoder", None)
    blocks = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    if blocks is None:
        raise VLMError(f"its vision tower ({type(vision).__name__}) has no encoder.layers to read attention from")
    if not -len(blocks) <= block < len(blocks):
        raise VLMError(f"block {block}: the vision tower has {len(blocks)} blocks")
    attn = getattr(blocks[block], "self_attn", None) or getattr(blocks[block], "attention", None)
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None)
    if heads is None or scale is None or not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
        raise VLMError(f"its vision tower ({type(vision).__name__}) has attention without q_proj/k_proj")

    def cls_row(x: torch.Tensor) -> torch.Tensor:
        q, k = split_heads(attn.q_proj(x[:, :1]), int(heads)), split_heads(attn.k_proj(x), int(heads))
        return cls_softmax(q, k, float(scale), x.shape[1] - patches)

    return attn, cls_row


@register_family
class LlavaFamily(VLMFamily):
    """LLaVA-1.5: one view of N tokens per image (see the module docstring)."""

    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    feature_spaces = ("vision", "projector")
    cls_attention = True

    def __init__(self, model, processor, **options):
        super().__init__(model, processor, **options)
        config = model.config
        self.layer = feature_layer(config)
        self.strategy = config.vision_feature_select_strategy
        tower = config.vision_config
        side = int(tower.image_size) // int(tower.patch_size)
        self.grid = (side, side)
        self.tokens_per_view = side * side

    # ---- the image side ------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)``: what the projector receives for ``B`` views ``(B, 3, H, W)`` (feature
        layer, CLS dropped)."""
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values.to(self.model.dtype), output_hidden_states=True).hidden_states[self.layer]
        return hidden[:, 1:] if self.strategy == "default" else hidden

    def image_features_with_cls_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`image_features` and, from the same pass, the CLS->patch attention ``(B, N)`` of
        the block whose output they are (see the module docstring)."""
        if self.strategy != "default":
            raise VLMError(f"vision_feature_select_strategy={self.strategy!r}: the CLS token is a candidate, "
                           "so a CLS-attention selector has no CLS query to read")
        tower = self.model.model.vision_tower
        module, cls_row = tower_cls_attention_site(tower, feature_block(self.layer), self.tokens_per_view)
        return capture_cls_row(module, cls_row, lambda: self.image_features(pixel_values), f"{self.name} vision tower")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def view_candidates(self, views: torch.Tensor, cls_attention: bool = False) -> tuple:
        """``(space (G, V, N, C) float32, tokens (G, V * N, D), CLS attention (G, V, N) or None)``
        for ``G`` images of ``V`` views."""
        G, V = views.shape[:2]
        if cls_attention:
            features, attention = self.image_features_with_cls_attention(views.flatten(0, 1))  # (G * V, N, C)
            attention = attention.reshape(G, V, -1)
        else:
            features, attention = self.image_features(views.flatten(0, 1)), None
        if self.feature_space == "projector":
            features = self.project(features)
        space = features.float().reshape(G, V, *features.shape[1:])
        return space, features.reshape(G, -1, features.shape[-1]), attention

    def candidates(self, batch, features: bool = True, cls_attention: bool = False) -> Candidates:
        space, tokens, attention = self.view_candidates(batch["pixel_values"].unsqueeze(1), cls_attention)
        n = len(tokens)
        return Candidates(list(space), [self.grid] * n, [self.tokens_per_view] * n, list(tokens),
                          cls_attention=None if attention is None else list(attention))

    def candidate_geometry(self) -> tuple[Optional[int], int]:
        config = self.model.config
        width = config.text_config.hidden_size if self.feature_space == "projector" else config.vision_config.hidden_size
        return self.tokens_per_view, int(width)

    def fixed_grid(self) -> Optional[tuple[int, int]]:
        return self.grid

    def token_embeddings(self, candidates: Candidates) -> list[torch.Tensor]:
        return self.kept_embeddings(candidates, None)

    def kept_embeddings(self, candidates: Candidates, kept: Optional[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each image's ``(T_i, H)`` embeddings: the kept tokens (all without ``kept``), projected."""
        chosen = candidates.tokens if kept is None else [t[k] for t, k in zip(candidates.tokens, kept)]
        if self.feature_space == "projector":
            return chosen
        sizes = [len(c) for c in chosen]
        return list(self.project(torch.cat(chosen)).split(sizes))

    # ---- the prompt side -----------------------------------------------------------------------
    def splice(self, batch, candidates: Candidates, kept: Optional[list[torch.Tensor]]) -> PrunedPrompt:
        embeddings = self.image_embeddings(batch, candidates, kept)
        rows = []
        for ids, mask, emb in zip(batch["input_ids"], batch["attention_mask"], embeddings):
            ids = ids[mask.bool()]
            slots = image_run(ids, self.image_token_id)
            run = torch.full((emb.shape[0],), self.image_token_id, dtype=ids.dtype, device=ids.device)
            rows.append(torch.cat([ids[:slots[0]], run, ids[slots[-1] + 1:]]))
        ids, mask = left_pad(rows, self.pad_token_id)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id) & mask.bool()
        embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), torch.cat(embeddings).to(embeds.dtype))
        return PrunedPrompt({"inputs_embeds": embeds, "attention_mask": mask}, [int(e.shape[0]) for e in embeddings],
                            list(candidates.counts), kept)

    def image_embeddings(self, batch, candidates: Candidates, kept) -> list[torch.Tensor]:
        """What each image's placeholder run becomes."""
        return self.kept_embeddings(candidates, kept)

    # ---- training ------------------------------------------------------------------------------
    @classmethod
    def training_encoder(cls, name: str, config, image_size: Optional[int]) -> dict:
        """The tower at ``vision_feature_layer``, without a final norm."""
        if image_size is not None:
            raise VLMError(f"image_size={image_size}: {config.model_type} has one input size; leave it unset")
        if config.vision_feature_select_strategy == "full" and "clip" in str(config.vision_config.model_type):
            log.warning("%s uses vision_feature_select_strategy='full': its projector also saw the CLS token, "
                        "which the training encoder drops", name)
        return {"layer": feature_layer(config), "norm": False, "image_size": None}

    def ntp_head(self, max_text_tokens: int):
        from tokensel.vlms.ntp import LlavaNTP

        return LlavaNTP(self.model, self.processor.tokenizer, max_text_tokens)

    @classmethod
    def feature_source(cls, name: str, config, image_size: Optional[int]) -> "LlavaTower":
        """Only the vision tower of the LLaVA ``name``: ``AutoModel.from_config`` builds it as LLaVA
        does, and only the checkpoint's ``vision_tower.*`` tensors are read into it."""
        from transformers import AutoModel

        label = f"encoder.name='hf:{name}'"
        with fetching(name, "vision tower", "encoder"):
            state = read_tensors(name, ("model.vision_tower.", "vision_tower."))
            pixels = tower_pixels(name, config.vision_config)
        tower = load_into(AutoModel.from_config(config.vision_config), state, label)
        native = int(config.vision_config.image_size)
        side = int(image_size) if image_size else native
        if side != native:
            log.warning("%s: encoder.image_size=%d differs from the tower's %d: position embeddings are interpolated, "
                        "so the features are not the ones LLaVA was trained on", label, side, native)
        elif pixels.size != (native, native):
            log.warning("%s: the preprocessor's size %s differs from the tower's image_size %d: using %d",
                        label, pixels.size, native, native)
        return LlavaTower(tower, PixelSpec((side, side), pixels.mean, pixels.std, pixels.interpolation),
                          interpolate=side != native)


def tower_pixels(name: str, vision_config) -> PixelSpec:
    """The CLIP image processor's final size, mean and std from the folder's preprocessor config
    when there is one, else the CLIP defaults at the vision config's image size."""
    size = int(vision_config.image_size)
    cfg = processor_config(name)
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
    return PixelSpec(hw, mean, std, PIL_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic")


class LlavaTower(CandidateEncoder):
    """A LLaVA's vision tower (a transformers vision model, e.g. ``CLIPVisionModel``) returning
    ``hidden_states[layer]`` without its prefix (CLS) token: at LLaVA's ``vision_feature_layer``
    these are exactly what its projector receives. ``norm`` applies ``post_layernorm`` (LLaVA
    does not); ``interpolate``: the input size differs from the tower's."""

    def __init__(self, tower: nn.Module, pixels: PixelSpec, interpolate: bool = False):
        super().__init__(tower)
        self.pixels = pixels
        self.interpolate = interpolate
        patch = int(tower.config.patch_size)
        self.grid = (pixels.size[0] // patch, pixels.size[1] // patch)
        self.dim = int(tower.config.hidden_size)
        self.depth = int(tower.config.num_hidden_layers) + 1  # hidden states: embeddings + every block

    def vision(self) -> nn.Module:
        return getattr(self.tower, "vision_model", self.tower)  # transformers 5 flattened CLIPVisionModel

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states[layer]
        if norm:
            hidden = self.vision().post_layernorm(hidden)
        prefix = hidden.shape[1] - self.grid[0] * self.grid[1]  # 1 (CLS) for CLIP, 0 for SigLIP
        return hidden[:, prefix:]

    def cls_attention_site(self, layer: int) -> tuple[nn.Module, ClsRow]:
        return tower_cls_attention_site(self.tower, layer, self.grid[0] * self.grid[1])


def assemble_llava(tower: nn.Module, lm: nn.Module, tokenizer, image_processor, vision_feature_layer: int = -2,
                   seed: int = 0, chat_template: str = LLAVA15_CHAT_TEMPLATE) -> LlavaFamily:
    """A LLaVA-1.5 from a transformers vision ``tower``, a ``LlamaForCausalLM``-style ``lm`` with its
    ``tokenizer`` (all copied, not modified) and an image processor: an ``<image>`` token is added
    (its embedding row is the mean of the others), the projector (a two-layer GELU MLP) is freshly
    initialised from ``seed``, and the chat template is LLaVA-1.5's conversation."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = {k: v for k, v in lm.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    text_config = AutoConfig.for_model(text.pop("model_type"), **{**text, "vocab_size": len(tokenizer)})
    vision = tower.config
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_id,
                         image_seq_length=grid * grid, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer,
                         multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    state = dict(lm.model.state_dict())
    old = state["embed_tokens.weight"]
    new_rows = old.mean(0, keepdim=True).expand(len(tokenizer) - old.shape[0], -1)
    state["embed_tokens.weight"] = torch.cat([old, new_rows])
    model.model.language_model.load_state_dict(state)
    if not text_config.tie_word_embeddings:
        head = lm.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand_as(new_rows)]))
    elif model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    model.generation_config = copy.deepcopy(lm.generation_config)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=chat_template)
    return LlavaFamily(model, processor)
