"""What Qwen2.5-VL and Qwen3-VL share: selection after the patch merger, 3-D M-RoPE positions.

How the field prunes Qwen-VL, and so what this does:

- **Candidates** are the merger's output tokens, per image, at the image's own grid: each covers a
  ``merge x merge`` group of ViT patches and is already an LLM embedding (pruning inside the ViT
  would break the merger; there is no CLS token). The processor gives every image its own grid
  (``image_grid_thw``), so images in one batch may have different token counts; a selector runs on
  the images of each grid together (``VLMFamily.select``).
- **Positions**: the full prompt's M-RoPE index (``get_rope_index``: text in 1-D, image token
  (r, c) at (t, a + r, a + c), text after the image from a + max(h, w)). ``positions="original"``
  (the default) gives each kept token its own id, ``position_ids[:, :, kept]`` of the full prompt,
  and the text around the image keeps its ids, so decoding continues after the unpruned length
  (UniPruneBench, NVIDIA TensorRT-Edge-LLM). ``positions="compact"`` numbers the pruned prompt as
  text: one id per token on all three axes, so the image's 2-D layout is dropped and decoding
  continues after the pruned length.
- **The splice** is the model's own forward, given the pruned ``input_ids`` (K placeholders per
  image), those ``position_ids`` and the kept tokens as ``mm_encoder_outputs`` (Qwen3-VL: with its
  DeepStack features compacted with the same keep list). ``generate`` extends the ids by one per step.
- **Resolution**: ``image_size`` (pixels, a multiple of ``patch * merge``) squashes every image to
  that square and sets the processor's ``min_pixels = max_pixels`` to its area, so every image has
  one grid (what a trained selector and the feature cache need). Without it, each image keeps the
  processor's own grid; an image with a side below ``patch * merge`` pixels is refused in one line.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from torch import nn

from tokensel.common.errors import ConfigError, VLMError
from tokensel.vlms.base import NO_CLS, Candidates, PrunedPrompt, VLMFamily, image_run, left_pad
from tokensel.vlms.sources import CandidateEncoder, PIL_RESAMPLE, PixelSpec, fetching, load_into, processor_config, read_tensors

VISUAL_PREFIXES = ("model.visual.", "visual.")  # transformers 5 saves, then the hub checkpoints' names


def pixel_limits(cfg: dict) -> tuple[Optional[int], Optional[int]]:
    """``(min_pixels, max_pixels)`` of a Qwen image processor config (either spelling)."""
    size = cfg.get("size") or {}
    return (cfg.get("min_pixels") or size.get("shortest_edge"), cfg.get("max_pixels") or size.get("longest_edge"))


class QwenFamily(VLMFamily):
    """Qwen-VL (see the module docstring). Subclasses name the model and its vision class."""

    feature_spaces = ("projector",)  # the merger's output: Qwen's projector
    mrope = True
    variable_resolution = True
    vision_class: ClassVar[str] = ""  # module:class of the vision model, built from the vision config

    def __init__(self, model, processor, **options):
        super().__init__(model, processor, **options)
        vision = model.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.factor = int(vision.patch_size) * self.merge
        if self.image_size is not None:
            check_side(self.image_size, self.factor, "image_size")

    # ---- the image side ------------------------------------------------------------------------
    def encode(self, images, questions):
        from PIL import Image

        images = list(images)
        for image in images:
            if min(image.size) < self.factor:
                raise VLMError(f"an image of {image.size[0]}x{image.size[1]} px: {self.name} needs both sides "
                               f">= {self.factor} px (one merged token is {self.factor} x {self.factor} px)")
        kwargs = {}
        if self.image_size is not None:
            side = self.image_size
            images = [image.convert("RGB").resize((side, side), Image.BICUBIC) for image in images]
            kwargs["images_kwargs"] = {"size": {"shortest_edge": side * side, "longest_edge": side * side}}
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        try:
            batch = self.processor(images=images, text=self.prompts(questions), return_tensors="pt", padding=True,
                                   **kwargs)
        except ValueError as err:  # e.g. an aspect ratio beyond the processor's 200
            raise VLMError(f"{self.name} processor: {str(err).splitlines()[0]}") from None
        return batch.to(self.model.device)

    def image_outputs(self, batch):
        return self.model.model.get_image_features(batch["pixel_values"].to(self.model.dtype), batch["image_grid_thw"])

    @torch.no_grad()
    def candidates(self, batch, features: bool = True, cls_attention: bool = False) -> Candidates:
        if cls_attention:
            raise VLMError(f"{self.name}: {NO_CLS}")
        out = self.image_outputs(batch)
        tokens = list(out.pooler_output)
        grids = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in batch["image_grid_thw"].tolist()]
        return Candidates([t.float().unsqueeze(0) for t in tokens], grids, [len(t) for t in tokens], tokens,
                          self.image_extras(out))

    def image_extras(self, out) -> dict:
        return {}

    def image_encoder_output(self, tokens: list[torch.Tensor], candidates: Candidates,
                             kept: Optional[list[torch.Tensor]]):
        """What ``mm_encoder_outputs["image"]`` holds for the kept tokens of each image."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=tuple(tokens))

    def candidate_geometry(self) -> tuple[Optional[int], int]:
        n = (self.image_size // self.factor) ** 2 if self.image_size else None
        return n, int(self.model.config.text_config.hidden_size)

    def fixed_grid(self) -> Optional[tuple[int, int]]:
        return (self.image_size // self.factor,) * 2 if self.image_size else None

    def fixed_size_hint(self, grid: tuple[int, int]) -> str:
        if grid[0] != grid[1]:
            return ""
        return f"set image_size={grid[0] * self.factor} (a fixed {grid[0]}x{grid[1]} grid)"

    # ---- the prompt side -----------------------------------------------------------------------
    def splice(self, batch, candidates: Candidates, kept: Optional[list[torch.Tensor]]) -> PrunedPrompt:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rope, _ = self.model.model.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                                  attention_mask=mask)
        rows, positions, tokens = [], [], []
        for i in range(len(ids)):
            real = mask[i].bool()
            row, row_positions = ids[i][real], rope[:, i][:, real]
            slots = image_run(row, self.image_token_id)
            if len(slots) != candidates.counts[i]:
                raise VLMError(f"{len(slots)} image placeholders for {candidates.counts[i]} image tokens")
            chosen = torch.arange(len(slots), device=row.device) if kept is None else kept[i].to(row.device)
            keep = torch.ones(len(row), dtype=torch.bool, device=row.device)
            keep[slots] = False
            keep[slots[0] + chosen] = True
            rows.append(row[keep])
            positions.append(row_positions[:, keep])
            tokens.append(candidates.tokens[i][chosen])
        ids, mask = left_pad(rows, self.pad_token_id)
        if self.positions == "compact":
            position_ids = (mask.cumsum(1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1).contiguous()
        else:
            width = ids.shape[1]
            position_ids = torch.stack([torch.cat([p.new_zeros(3, width - p.shape[1]), p], 1) for p in positions], 1)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
                  "mm_encoder_outputs": {"image": self.image_encoder_output(tokens, candidates, kept)}}
        return PrunedPrompt(inputs, [len(t) for t in tokens], list(candidates.counts), kept)

    # ---- training ------------------------------------------------------------------------------
    @classmethod
    def training_encoder(cls, name: str, config, image_size: Optional[int]) -> dict:
        """The merger's tokens at one fixed side (``image_size``, else the processor's own)."""
        vision = config.vision_config
        factor = int(vision.patch_size) * int(vision.spatial_merge_size)
        with fetching(name, "processor config", "selector.vlm"):
            limits = pixel_limits(processor_config(name))
        return {"layer": -1, "norm": False, "image_size": fixed_side(config.model_type, factor, image_size, limits,
                                                                     "image_size")}

    def ntp_head(self, max_text_tokens: int):
        """The loss on tokens of one fixed-resolution grid (``image_size``, else the processor's own)."""
        from tokensel.vlms.ntp import QwenNTP

        side = fixed_side(self.name, self.factor, self.image_size, processor_limits(self.processor), "image_size")
        return QwenNTP(self.model, self.processor.tokenizer, max_text_tokens, (side // self.factor,) * 2)

    @classmethod
    def feature_source(cls, name: str, config, image_size: Optional[int]) -> "QwenVisual":
        """Only the vision model (ViT and merger) of the Qwen-VL ``name``, at one fixed resolution."""
        import importlib

        label = f"encoder.name='hf:{name}'"
        vision = config.vision_config
        factor = int(vision.patch_size) * int(vision.spatial_merge_size)
        with fetching(name, "vision model", "encoder"):
            cfg = processor_config(name)
            side = fixed_side(config.model_type, factor, image_size, pixel_limits(cfg), "encoder.image_size")
            state = read_tensors(name, VISUAL_PREFIXES)
        module, _, cls_name = cls.vision_class.rpartition(".")
        visual = getattr(importlib.import_module(module), cls_name)._from_config(vision)
        load_into(visual, state, label)
        resample = cfg.get("resample", 3)
        pixels = PixelSpec((side, side), tuple(cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                           tuple(cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                           PIL_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic")
        return QwenVisual(visual, pixels, int(config.text_config.hidden_size))


def processor_limits(processor) -> tuple[Optional[int], Optional[int]]:
    images = processor.image_processor
    size = getattr(images, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return get("shortest_edge"), get("longest_edge")


def check_side(side: int, factor: int, key: str) -> int:
    if side < factor or side % factor:
        raise ConfigError(f"{key}={side}: must be a multiple of {factor} (patch x merge) pixels")
    return side


def fixed_side(name: str, factor: int, image_size: Optional[int], limits: tuple, key: str) -> int:
    """The one input side of a fixed-resolution run: ``image_size``, else the processor's own when
    its ``min_pixels = max_pixels`` is a square of a multiple of ``factor``; otherwise one line."""
    if image_size:
        return check_side(int(image_size), factor, key)
    low, high = limits
    side = math.isqrt(int(high)) if low and high and low == high else None
    if side is None or side * side != int(high) or side % factor:
        raise ConfigError(f"{key} is not set and {name} gives each image its own grid (min_pixels={low}, "
                          f"max_pixels={high}): set {key} to one side, a multiple of {factor} px, to train and cache "
                          "at a fixed resolution (variable resolution is not supported in training)")
    return side


class QwenVisual(CandidateEncoder):
    """A Qwen-VL vision model at one fixed square resolution: pixels ``(B, 3, S, S)`` (resized and
    normalised by the data pipeline) are cut into the processor's patches (each frame repeated
    ``temporal_patch_size`` times, ``merge x merge`` groups contiguous), run through the ViT and
    the merger, and returned as ``(B, (S / (patch * merge))^2, D)`` in raster order. Only the
    merger's output is served: ``layer`` is -1 (or 0) and ``norm`` is false."""

    has_norm = False
    layer_help = "outputs (the merger's tokens: -1)"

    def __init__(self, visual: nn.Module, pixels: PixelSpec, dim: int):
        super().__init__(visual)
        config = visual.config
        self.pixels = pixels
        self.patch, self.merge = int(config.patch_size), int(config.spatial_merge_size)
        self.temporal = int(config.temporal_patch_size)
        side = pixels.size[0] // (self.patch * self.merge)
        self.grid = (side, side)
        self.dim = dim
        self.depth = 1

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B * h * w, 3 * T * P * P)`` in the order of Qwen's image processor."""
        B, C, H, W = pixels.shape
        P, m, T = self.patch, self.merge, self.temporal
        x = pixels.reshape(B, C, H // P // m, m, P, W // P // m, m, P).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, T, -1, -1)
        return x.reshape(B * (H // P) * (W // P), C * T * P * P)

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        B, _, H, W = pixels.shape
        grid = torch.tensor([[1, H // self.patch, W // self.patch]] * B, device=pixels.device)
        out = self.tower(self.patchify(pixels), grid_thw=grid).pooler_output
        return out.reshape(B, -1, out.shape[-1])
