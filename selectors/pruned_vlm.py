"""A Hugging Face LLaVA that answers from only K of its image tokens: generation-time pruning.

The selector sits where AutoSelect (arXiv 2603.07135, Sec. 1) and the Gumbel auto-encoder
(arXiv 2503.16660, Sec. 4) put it: after the vision tower's feature layer, before the projector.
For each image::

    pixels -> its views -> vision tower -> hidden_states[vision_feature_layer] (CLS dropped, as
    LLaVA's "default" strategy) -> select(features, budget) -> K tokens in positional order
           -> multi_modal_projector -> the K embeddings replace the image placeholders
    prompt (the processor's own chat template and image-token expansion) -> model.generate

Two model families, read from the folder's ``model_type``:

- ``llava`` (``LlavaForConditionalGeneration``, LLaVA-1.5): one view of N tokens per image.
- ``llava_next`` (``LlavaNextForConditionalGeneration``): LLaVA-NeXT's anyres views, the base
  view and the crops of the best grid resolution, V views of N tokens. ``view_selection``
  chooses how a budget applies: ``per_view`` keeps K of each view's N tokens (the Gumbel paper
  selects per crop, and counts the 2,880 = 5 x 576 tokens of the views, Sec. 5 Table 1);
  ``across`` keeps K of the image's V * N tokens, chosen jointly
  (:meth:`~tokensel.selectors.inference.SelectorNet.select_across`). The kept tokens follow in
  view-major positional order. LLaVA-NeXT's own layout (crops unpadded, then an
  ``image_newline`` after each row) is defined on a full grid only, so the pruned prompt has
  neither; the full-token reference (``selector=None``) is the model's own image path, layout
  included (tested against the model's forward).

Nothing of transformers is patched and no prompt layout is written here: the processor expands
each image into its placeholder tokens, and each row's run is replaced by that image's kept
tokens. Rows are left-padded again after the cut (images may keep different counts, e.g. NeXT
images with different view counts), so a row's answer does not depend on its batch (tested:
greedy answers at batch 1 and batch 4 are identical). ``feature_space="projector"`` selects among
the projected embeddings instead, as DivPrune (Alvar et al., CVPR 2025) is run by its authors.
"""

from __future__ import annotations

from dataclasses import dataclass
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
VIEW_SELECTIONS = ("per_view", "across")
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


@dataclass
class PrunedPrompt:
    """A batch of pruned prompts: ``inputs`` (``inputs_embeds``, ``attention_mask``) is what
    prefill and ``generate`` run on; per image, ``image_tokens`` is how many image embeddings its
    prompt holds and ``candidate_tokens`` how many tokens of its views the selector chose from
    (``V * N``)."""

    inputs: dict
    image_tokens: list[int]
    candidate_tokens: list[int]


class PrunedLlava:
    """``model`` (a ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``)
    and its ``processor``, answering from the ``budget`` image tokens that ``selector`` keeps (see
    the module docstring)."""

    def __init__(self, model, processor, selector: Optional[SelectorNet] = None, budget: Optional[Budget] = None,
                 feature_space: str = "vision", view_selection: str = "per_view"):
        if feature_space not in FEATURE_SPACES:
            raise ConfigError(f"feature_space={feature_space!r}: expected one of {', '.join(FEATURE_SPACES)}")
        if view_selection not in VIEW_SELECTIONS:
            raise ConfigError(f"view_selection={view_selection!r}: expected one of {', '.join(VIEW_SELECTIONS)}")
        if (selector is None) != (budget is None):
            raise ConfigError("a pruned VLM needs both a selector and a budget (or neither, for all tokens)")
        if selector is not None and selector.needs_cls_attention:
            raise ConfigError("the cls_attention baseline is not supported in the pruned VLM yet")
        if getattr(processor, "chat_template", None) is None:
            raise VLMError("the LLaVA's processor has no chat template; the pruned VLM uses the model's own prompt")
        config = model.config
        if config.model_type not in MODEL_CLASSES:
            raise VLMError(f"model_type={config.model_type!r}: the pruned VLM takes {', '.join(MODEL_CLASSES)}")
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.selector, self.budget = selector, budget
        self.feature_space, self.view_selection = feature_space, view_selection
        self.anyres = config.model_type == "llava_next"
        self.image_token_id = int(config.image_token_id)
        self.layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        if not isinstance(self.layer, int):
            raise VLMError(f"vision_feature_layer={self.layer!r}: only a single layer is supported")
        tower = config.vision_config
        self.tokens_per_view = (int(tower.image_size) // int(tower.patch_size)) ** 2

    @classmethod
    def from_pretrained(cls, name: str, selector: Optional[SelectorNet] = None, budget: Optional[Budget] = None,
                        precision: str = "32", feature_space: str = "vision",
                        view_selection: str = "per_view") -> "PrunedLlava":
        """A LLaVA or LLaVA-NeXT folder or hub id; a missing folder or an offline hub id is one line."""
        import transformers
        from transformers import AutoConfig, AutoProcessor

        dtype = check_precision("precision", precision)
        source = str(Path(name).expanduser()) if hf_model_is_local(name) else name
        announce = None if hf_model_is_local(name) else f"pruned VLM {name}: fetching the model from the hub"
        try:
            with hub_download(announce):
                model_type = AutoConfig.from_pretrained(source).model_type
                if model_type not in MODEL_CLASSES:
                    raise VLMError(f"model={name!r}: model_type {model_type!r} is not one of {', '.join(MODEL_CLASSES)}")
                processor = AutoProcessor.from_pretrained(source)
                model = getattr(transformers, MODEL_CLASSES[model_type]).from_pretrained(source, dtype=dtype)
        except VLMError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise VLMError(hf_source_error(f"model={name!r}", name, err)) from None
        return cls(model, processor, selector, budget, feature_space, view_selection)

    # ---- the image side ------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)``: what LLaVA's projector would receive for ``B`` views ``(B, 3, H, W)``
        (feature layer, CLS dropped)."""
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values.to(self.model.dtype), output_hidden_states=True).hidden_states[self.layer]
        return hidden[:, 1:] if self.strategy == "default" else hidden

    @torch.no_grad()
    def view_embeddings(self, views: torch.Tensor) -> torch.Tensor:
        """``(G, T, H)`` projected embeddings of the kept tokens of ``G`` images of ``V`` views each
        (``views`` is ``(G, V, 3, H, W)``), view-major and in positional order within a view; all
        ``V * N`` tokens without a selector."""
        G, V = views.shape[:2]
        features = self.image_features(views.flatten(0, 1))  # (G * V, N, C)
        project = self.model.model.multi_modal_projector
        if self.selector is None:
            projected = project(features)
            return projected.reshape(G, -1, projected.shape[-1])
        space = project(features).float() if self.feature_space == "projector" else features.float()
        if self.view_selection == "across" and V > 1:
            _, kept = self.selector.select_across(space.reshape(G, V, *space.shape[1:]), self.budget)
        else:
            _, kept = self.selector.select(space, self.budget)
        kept = kept.reshape(G, -1, kept.shape[-1]).to(features.dtype)
        return kept if self.feature_space == "projector" else project(kept)

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, K, H)`` for ``B`` single-view images ``(B, 3, H, W)`` (LLaVA-1.5)."""
        return self.view_embeddings(pixel_values.unsqueeze(1))

    def _per_image(self, batch) -> tuple[list[torch.Tensor], list[int]]:
        """Each image's embeddings ``(T_i, H)`` and its candidate count ``V_i * N``."""
        pixels = batch["pixel_values"]
        if not self.anyres:
            return list(self.image_embeddings(pixels)), [self.tokens_per_view] * len(pixels)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in batch["image_sizes"]]
        if self.selector is None:  # the model's own path: unpadded crops and image_newline
            native = self.model.model.get_image_features(
                pixel_values=pixels.to(self.model.dtype), image_sizes=batch["image_sizes"],
                vision_feature_layer=self.layer, vision_feature_select_strategy=self.strategy).pooler_output
            return list(native), [v * self.tokens_per_view for v in counts]
        out: list = [None] * len(counts)
        for v in sorted(set(counts)):  # images with the same view count are selected together
            rows = [i for i, c in enumerate(counts) if c == v]
            for i, emb in zip(rows, self.view_embeddings(pixels[rows, :v])):
                out[i] = emb
        return out, [v * self.tokens_per_view for v in counts]

    # ---- the prompt side -----------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its EOS id (what the cut rows are padded and decoded with)."""
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompts(self, questions: Sequence[str]) -> list[str]:
        """One user turn per question (an image, then the text), in the processor's chat template."""
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True) for q in questions]

    @torch.no_grad()
    def prune(self, images: Sequence, questions: Sequence[str]) -> PrunedPrompt:
        """The pruned prompts of a batch: each image's placeholder run cut to its kept tokens, the
        rows left-padded again, and the image embeddings scattered into the runs."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        batch = self.processor(images=list(images), text=self.prompts(questions), return_tensors="pt",
                               padding=True).to(self.model.device)
        embeddings, candidates = self._per_image(batch)
        pad = self.pad_token_id
        rows = []
        for ids, mask, emb in zip(batch["input_ids"], batch["attention_mask"], embeddings):
            ids = ids[mask.bool()]
            slots = (ids == self.image_token_id).nonzero().flatten()
            if len(slots) == 0 or int(slots[-1] - slots[0]) + 1 != len(slots):
                raise VLMError(f"expected one image per prompt, got {len(slots)} image tokens not in one run")
            run = torch.full((emb.shape[0],), self.image_token_id, dtype=ids.dtype, device=ids.device)
            rows.append(torch.cat([ids[:slots[0]], run, ids[slots[-1] + 1:]]))
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad), r]) for r in rows])
        mask = torch.stack([torch.cat([r.new_zeros(width - len(r)), r.new_ones(len(r))]) for r in rows])
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id) & mask.bool()
        embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), torch.cat(embeddings).to(embeds.dtype))
        return PrunedPrompt({"inputs_embeds": embeds, "attention_mask": mask},
                            [int(e.shape[0]) for e in embeddings], candidates)

    def prefill_inputs(self, images: Sequence, questions: Sequence[str]) -> dict:
        """``inputs_embeds`` and ``attention_mask`` of the pruned prompts (what prefill runs on)."""
        return self.prune(images, questions).inputs

    @torch.no_grad()
    def answer(self, prompt: PrunedPrompt, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers to an already pruned batch (so a timed prefill and generation share it)."""
        out = self.model.generate(**prompt.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_token_id)
        return [text.strip() for text in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, images: Sequence, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per (image, question)."""
        return self.answer(self.prune(images, questions), max_new_tokens)
