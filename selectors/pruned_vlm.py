"""A Hugging Face LLaVA that answers from only K of its image tokens: generation-time pruning.

The selector sits where AutoSelect (arXiv 2603.07135, Sec. 1) and the Gumbel auto-encoder
(arXiv 2503.16660, Sec. 4) put it: after the vision tower's feature layer, before the projector.
For each image::

    pixels -> vision tower -> hidden_states[vision_feature_layer] (CLS dropped, as LLaVA's
    "default" strategy) -> select(features, budget) -> K tokens in positional order
           -> multi_modal_projector -> the K embeddings replace the image placeholders
    prompt (the processor's own chat template and image-token expansion) -> model.generate

Nothing of transformers is patched and no prompt layout is written here: the processor expands
each image into its placeholder tokens, and those runs are shortened to K. Batches are left-padded
(the processor's tokenizer pads on the left), so a row's answer does not depend on its batch
(tested: greedy answers at batch 1 and batch 4 are identical). ``feature_space="projector"``
selects among the projected embeddings instead, as DivPrune (Alvar et al., CVPR 2025) is run by
its authors. ``selector=None`` is the full-token reference.

Scope today: ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout, one image per prompt). LLaVA-NeXT's
anyres views are not handled yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from tokensel.common.errors import ConfigError
from tokensel.common.hub import hf_model_is_local, hf_source_error, hub_download
from tokensel.common.precision import check_precision
from tokensel.selectors.budget import Budget
from tokensel.selectors.inference import SelectorNet
from tokensel.selectors.vlm import VLMError

FEATURE_SPACES = ("vision", "projector")


class PrunedLlava:
    """``model`` (a ``LlavaForConditionalGeneration``) and its ``processor``, answering from the
    ``budget`` image tokens that ``selector`` keeps (see the module docstring)."""

    def __init__(self, model, processor, selector: Optional[SelectorNet] = None, budget: Optional[Budget] = None,
                 feature_space: str = "vision"):
        if feature_space not in FEATURE_SPACES:
            raise ConfigError(f"feature_space={feature_space!r}: expected one of {', '.join(FEATURE_SPACES)}")
        if (selector is None) != (budget is None):
            raise ConfigError("a pruned VLM needs both a selector and a budget (or neither, for all tokens)")
        if selector is not None and selector.needs_cls_attention:
            raise ConfigError("the cls_attention baseline is not supported in the pruned VLM yet")
        if getattr(processor, "chat_template", None) is None:
            raise VLMError("the LLaVA's processor has no chat template; the pruned VLM uses the model's own prompt")
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.selector, self.budget, self.feature_space = selector, budget, feature_space
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        if not isinstance(self.layer, int):
            raise VLMError(f"vision_feature_layer={self.layer!r}: only a single layer is supported")

    @classmethod
    def from_pretrained(cls, name: str, selector: Optional[SelectorNet] = None, budget: Optional[Budget] = None,
                        precision: str = "32", feature_space: str = "vision") -> "PrunedLlava":
        """A LLaVA folder or hub id; a missing folder or an offline hub id is one line."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        dtype = check_precision("precision", precision)
        source = str(Path(name).expanduser()) if hf_model_is_local(name) else name
        announce = None if hf_model_is_local(name) else f"pruned VLM {name}: fetching the model from the hub"
        try:
            with hub_download(announce):
                processor = AutoProcessor.from_pretrained(source)
                model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise VLMError(hf_source_error(f"model={name!r}", name, err)) from None
        return cls(model, processor, selector, budget, feature_space)

    # ---- the image side ------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)``: what LLaVA's projector would receive (feature layer, CLS dropped)."""
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values.to(self.model.dtype), output_hidden_states=True).hidden_states[self.layer]
        return hidden[:, 1:] if self.strategy == "default" else hidden

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, K, H)`` projected embeddings of the kept tokens, in positional order (all N without a selector)."""
        features = self.image_features(pixel_values)
        project = self.model.model.multi_modal_projector
        if self.selector is None:
            return project(features)
        if self.feature_space == "projector":
            return self.selector.select(project(features).float(), self.budget)[1].to(features.dtype)
        _, kept = self.selector.select(features.float(), self.budget)
        return project(kept.to(features.dtype))

    # ---- the prompt side -----------------------------------------------------------------------
    def prompts(self, questions: Sequence[str]) -> list[str]:
        """One user turn per question (an image, then the text), in the processor's chat template."""
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True) for q in questions]

    @torch.no_grad()
    def prefill_inputs(self, images: Sequence, questions: Sequence[str]) -> dict:
        """``inputs_embeds`` and ``attention_mask`` of the pruned prompts (what prefill runs on)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        batch = self.processor(images=list(images), text=self.prompts(questions), return_tensors="pt",
                               padding=True).to(self.model.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image = self.image_embeddings(batch["pixel_values"])  # (B, K, H)
        is_image = ids == self.image_token_id
        per_row = is_image.sum(1)
        if not bool((per_row == per_row[0]).all()) or int(per_row[0]) < image.shape[1]:
            raise VLMError(f"expected one image of the same size per prompt, got {per_row.tolist()} image tokens")
        # Keep the first K placeholders of each row's run: every row loses the same count, so the
        # left padding stays aligned.
        keep = ~is_image | (is_image.long().cumsum(1) <= image.shape[1])
        ids = ids[keep].view(len(ids), -1)
        mask = mask[keep].view(len(ids), -1)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": mask}

    @torch.no_grad()
    def generate(self, images: Sequence, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per (image, question)."""
        inputs = self.prefill_inputs(images, questions)
        tokenizer = self.processor.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
