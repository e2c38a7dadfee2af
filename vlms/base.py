"""The VLM-family interface: one small class per Hugging Face ``model_type``, picked by name.

A family wraps a transformers vision-language model and its processor, and answers what the rest
of tokensel asks of any VLM::

    vlm = open_vlm("llava-hf/llava-1.5-7b-hf")                     # vlms/__init__.py
    prompt = vlm.prune(images, questions, selector, budget)         # candidates -> select -> splice
    answers = vlm.answer(prompt, max_new_tokens=32)                 # the model's own generate

- :meth:`VLMFamily.candidates`: the image tokens a selector chooses from, per image and view, at
  the layer a selector sees, with each image's token grid (:class:`Candidates`);
- :meth:`VLMFamily.splice`: the kept tokens placed into the prompt's embeddings, with the family's
  positions and the attention mask, and the per-image counts (:class:`PrunedPrompt`);
- :meth:`VLMFamily.answer` / :meth:`VLMFamily.generate_ids`: the model's own ``generate`` on a
  pruned prompt, the caller's generation kwargs passed through (greedy by default);
- :meth:`VLMFamily.ntp_head`: the next-token loss of a text given gated or kept tokens
  (``vlms/ntp.py``; the ``hf`` VLM backend of vp_noise and ``make eval``'s ``ntp_increase``);
- :meth:`VLMFamily.feature_source`: the candidates computed from pixels at one fixed resolution,
  for training on exactly the tokens a selector will prune (``encoder.name=hf:<model>``).

Selector and budget are arguments of :meth:`VLMFamily.prune`, never state. A selector is a
tokensel ``SelectorNet`` (``select``, ``select_across``, ``for_grid``), passed in by the caller:
nothing here imports one. Families register themselves in :data:`FAMILIES` under their
``model_type``; the one-line errors name the value at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch

from tokensel.common.errors import ConfigError, VLMError
from tokensel.common.registry import Registry
from tokensel.common.selection import SelectionContext

VIEW_SELECTIONS = ("per_view", "across")
POSITIONS = ("original", "compact")
FAMILIES: Registry[type] = Registry("VLM family (Hugging Face model_type)")
NO_CLS = ("its candidates are merged patch tokens with no CLS token, so there is no CLS attention to rank them by "
          "(use a selector that needs none, e.g. divprune or cdpruner)")


def register_family(cls: type) -> type:
    """Class decorator: register ``cls`` under each of its ``model_types``."""
    for model_type in cls.model_types:
        FAMILIES.register(model_type, cls)
    return cls


@dataclass
class Candidates:
    """What a selector chooses from, per image of a batch.

    - ``features``: ``(V, N, C)`` float32, the tokens in the selection space (V views of N tokens;
      V = 1 except for LLaVA-NeXT); None where the family's full-token row does not need them;
    - ``grids``: one view's token grid ``(h, w)``, ``h * w = N``;
    - ``counts``: ``V * N``, the candidate tokens of the image;
    - ``tokens``: ``(V * N, D)`` in the model's dtype, what the splice places (or projects) for a
      kept token, view-major;
    - ``extras``: per family (Qwen3-VL: the DeepStack features of each image);
    - ``cls_attention``: ``(V, N)`` float32, each view's CLS->patch attention at the feature layer,
      when asked for (families with ``cls_attention``).
    """

    features: Optional[list[torch.Tensor]]
    grids: list[tuple[int, int]]
    counts: list[int]
    tokens: Optional[list[torch.Tensor]] = None
    extras: dict = field(default_factory=dict)
    cls_attention: Optional[list[torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.counts)


@dataclass
class PrunedPrompt:
    """A batch of pruned prompts: ``inputs`` is what prefill and ``generate`` run on (left-padded,
    with its attention mask); per image, ``image_tokens`` is how many image tokens its prompt holds,
    ``candidate_tokens`` how many it was chosen from, and ``kept`` the chosen candidate indices
    (view-major, sorted; None for the full-token row)."""

    inputs: dict
    image_tokens: list[int]
    candidate_tokens: list[int]
    kept: Optional[list[torch.Tensor]] = None


class VLMFamily:
    """One model family (see the module docstring). Subclasses set the class attributes and
    implement :meth:`candidates`, :meth:`splice`, :meth:`candidate_geometry`, :meth:`fixed_grid`,
    :meth:`ntp_head`, :meth:`feature_source` and :meth:`training_encoder`.

    Options (checked by :meth:`check_options` before any model is loaded):

    - ``feature_space``: where a selector chooses (the family's ``feature_spaces``, first is the default);
    - ``view_selection``: ``per_view`` (a budget per view) or ``across`` (over an image's views);
    - ``positions``: ``original`` or ``compact`` position ids for families with 3-D M-RoPE;
      families with 1-D positions number the pruned prompt one position per token, and refuse ``compact``;
    - ``image_size``: a fixed input side in pixels, for families whose resolution varies by image.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""  # the transformers class that loads the whole model
    feature_spaces: ClassVar[tuple[str, ...]] = ("vision",)
    mrope: ClassVar[bool] = False  # 3-D M-RoPE positions: the positions option applies
    anyres: ClassVar[bool] = False  # several views per image (LLaVA-NeXT)
    variable_resolution: ClassVar[bool] = False  # the processor gives each image its own grid
    cls_attention: ClassVar[bool] = False  # the tower has a CLS token whose attention a selector may read

    def __init__(self, model, processor, feature_space: Optional[str] = None, view_selection: str = "per_view",
                 positions: str = "original", image_size: Optional[int] = None):
        self.feature_space, self.view_selection, self.positions, self.image_size = self.check_options(
            feature_space, view_selection, positions, image_size)
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.image_token_id = int(model.config.image_token_id)

    @property
    def name(self) -> str:
        return self.model_types[0]

    @classmethod
    def check_options(cls, feature_space: Optional[str] = None, view_selection: str = "per_view",
                      positions: str = "original", image_size: Optional[int] = None) -> tuple:
        """The options with defaults filled in; one line naming the first bad one."""
        name = cls.model_types[0]
        feature_space = feature_space or cls.feature_spaces[0]
        if feature_space not in cls.feature_spaces:
            raise ConfigError(f"feature_space={feature_space!r}: {name} selects in {', '.join(cls.feature_spaces)}")
        if view_selection not in VIEW_SELECTIONS:
            raise ConfigError(f"view_selection={view_selection!r}: expected one of {', '.join(VIEW_SELECTIONS)}")
        if positions not in POSITIONS:
            raise ConfigError(f"positions={positions!r}: expected one of {', '.join(POSITIONS)}")
        if positions == "compact" and not cls.mrope:
            raise ConfigError(f"positions='compact': {name} has 1-D positions (one per token of the pruned prompt); "
                              "original/compact choose among the 3-D M-RoPE ids of Qwen-VL families")
        if image_size is not None and not cls.variable_resolution:
            raise ConfigError(f"image_size={image_size}: {name} has one input size; the option fixes the resolution "
                              "of families whose images get their own grid (Qwen-VL)")
        return feature_space, view_selection, positions, image_size

    # ---- text ----------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its EOS id (what pruned rows are padded and decoded with)."""
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompts(self, questions: Sequence[str]) -> list[str]:
        """One user turn per question (an image, then the text), in the processor's chat template."""
        if getattr(self.processor, "chat_template", None) is None:
            raise VLMError(f"the {self.name} processor has no chat template; prompts use the model's own")
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True) for q in questions]

    def encode(self, images: Sequence, questions: Sequence[str]):
        """The processor's batch (left-padded prompts, pixels) on the model's device."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        return self.processor(images=list(images), text=self.prompts(questions), return_tensors="pt",
                              padding=True).to(self.model.device)

    # ---- what a family implements --------------------------------------------------------------
    def candidates(self, batch, features: bool = True, cls_attention: bool = False) -> Candidates:
        """The candidates of every image of ``batch``; with ``features=False`` only what the
        full-token row needs (a family may then skip the selection space); with ``cls_attention``
        also each view's CLS->patch attention (families whose ``cls_attention`` is True)."""
        raise NotImplementedError

    def splice(self, batch, candidates: Candidates, kept: Optional[list[torch.Tensor]]) -> PrunedPrompt:
        """The pruned prompts: each image's placeholder run cut to its ``kept`` candidates (all of
        them, in the model's own layout, for ``kept=None``), rows left-padded again."""
        raise NotImplementedError

    def ntp_head(self, max_text_tokens: int):
        """The frozen next-token-loss module of this model (``vlms/ntp.py``)."""
        raise NotImplementedError

    @classmethod
    def feature_source(cls, name: str, config, image_size: Optional[int]):
        """The candidates from pixels (a ``vlms/sources.CandidateEncoder``), reading only the vision
        weights of the folder or hub id ``name``."""
        raise NotImplementedError

    def candidate_geometry(self) -> tuple[Optional[int], int]:
        """``(N, C)`` of one view's candidates: N None when it varies by image."""
        raise NotImplementedError

    @classmethod
    def training_encoder(cls, name: str, config, image_size: Optional[int]) -> dict:
        """The ``encoder.*`` settings (``layer``, ``norm``, ``image_size``; None: any) under which
        ``hf:<name>`` serves exactly this model's candidates (read from configs only)."""
        raise NotImplementedError

    def fixed_grid(self) -> Optional[tuple[int, int]]:
        """The token grid of every view, or None when each image has its own."""
        raise NotImplementedError

    def fixed_size_hint(self, grid: tuple[int, int]) -> str:
        """How to make every image's grid ``grid`` (for the error below); empty when there is no way."""
        return ""

    def check_selector(self, selector: Any, label: str = "selector") -> None:
        """One line when a trained ``selector`` (one with ``dims``) was trained on features this
        model's candidates do not match (width, or token count); training-free ones take any."""
        dims = getattr(selector, "dims", None)
        if dims is None:
            return
        n, width = self.candidate_geometry()
        trained = f"{label} was trained on {dims.num_tokens} tokens ({dims.grid[0]}x{dims.grid[1]}) of width {dims.dim}"
        if dims.dim != width:
            raise VLMError(f"{trained}, but {self.name}'s candidates ({self.feature_space} space) are {width} wide")
        if n is None:
            raise VLMError(f"{trained}, but {self.name} gives each image its own grid; "
                           f"{self.fixed_size_hint(dims.grid) or 'fix its resolution'}")
        if n != dims.num_tokens:
            raise VLMError(f"{trained}, but {self.name} has {n} candidate tokens per view"
                           + (f"; {hint}" if (hint := self.fixed_size_hint(dims.grid)) else ""))

    @property
    def selection_grid(self) -> tuple[int, int]:
        """The grid a grid-aware baseline is built for: the fixed one, else (1, 1) (each image's own
        then reaches it through ``for_grid``)."""
        return self.fixed_grid() or (1, 1)

    def token_embeddings(self, candidates: Candidates) -> list[torch.Tensor]:
        """Each image's ``(V * N, D)`` candidates in the LLM's input space (what a query-aware
        selector compares with the question): ``candidates.tokens`` unless a family places
        them before projecting (LLaVA in the vision space overrides this)."""
        return candidates.tokens

    def question_embedding(self, questions: Sequence[str]) -> torch.Tensor:
        """``(B, D)`` float32: the mean of the LLM's input embeddings of each question's tokens (no
        chat template, no special tokens), the instruction a query-aware selector is conditioned on
        (CDPruner, arXiv 2506.10967, Sec. 3.3, with the VLM's own embedding as its text side)."""
        embed = self.model.get_input_embeddings()
        rows = []
        for question in questions:
            ids = self.processor.tokenizer(question or " ", add_special_tokens=False, return_tensors="pt").input_ids
            rows.append(embed(ids.to(embed.weight.device))[0].float().mean(dim=0))
        return torch.stack(rows)

    def selection_context(self, candidates: Candidates, questions: Sequence[str], instruction: bool = True) -> list:
        """Per image a ``SelectionContext`` with rows for its ``V`` views: with ``instruction``, the
        question (text and embedding, the same for every view) and the views' candidates in the
        LLM's input space; the views' CLS attention when the candidates carry it."""
        query = self.question_embedding(questions) if instruction else None
        embedded = self.token_embeddings(candidates) if instruction else [None] * len(candidates)
        attention = candidates.cls_attention or [None] * len(candidates)
        contexts = []
        for i, (x, tokens, cls) in enumerate(zip(candidates.features, embedded, attention)):
            V, N = x.shape[:2]
            cls = None if cls is None else cls.float()
            if instruction:
                contexts.append(SelectionContext(
                    instruction=[questions[i]] * V, instruction_embedding=query[i].expand(V, -1),
                    token_embedding=tokens.float().reshape(V, N, -1), cls_attention=cls))
            else:
                contexts.append(SelectionContext(cls_attention=cls))
        return contexts

    # ---- the pipeline --------------------------------------------------------------------------
    def select(self, candidates: Candidates, selector: Any, budget,
               contexts: Optional[list] = None) -> list[torch.Tensor]:
        """Per image the kept candidate indices (into its ``V * N`` tokens, view-major, sorted).
        Images with the same views and grid are selected together, in order of view count.
        ``contexts``: per image the ``SelectionContext`` of a query-aware selector."""
        groups: dict[tuple, list[int]] = {}
        for i, (x, grid) in enumerate(zip(candidates.features, candidates.grids)):
            groups.setdefault((x.shape[0], x.shape[1], tuple(grid)), []).append(i)
        kept: list = [None] * len(candidates)
        for key in sorted(groups):
            V, N, grid = key
            rows = groups[key]
            views = torch.stack([candidates.features[i] for i in rows])  # (G, V, N, C)
            chosen = selector.for_grid(grid)
            context = None if contexts is None else stack_contexts([contexts[i] for i in rows])
            if self.view_selection == "across" and V > 1:
                indices, _ = chosen.select_across(views, budget, context=context)
            else:
                indices, _ = chosen.select(views.flatten(0, 1), budget, context=context)  # (G * V, k)
                offsets = torch.arange(V, device=indices.device).unsqueeze(1) * N
                indices = (indices.reshape(len(rows), V, -1) + offsets).reshape(len(rows), -1)
            for i, row in zip(rows, indices):
                kept[i] = row
        return kept

    @torch.no_grad()
    def prune(self, images: Sequence, questions: Sequence[str], selector: Any = None, budget=None) -> PrunedPrompt:
        """The pruned prompts of a batch: ``budget`` tokens per image kept by ``selector``, or
        every token (the model's own path) when both are None."""
        if (selector is None) != (budget is None):
            raise ConfigError("a pruned VLM needs both a selector and a budget (or neither, for all tokens)")
        needs_cls = bool(getattr(selector, "needs_cls_attention", False))
        if needs_cls and not self.cls_attention:
            name = getattr(selector, "name", type(selector).__name__)
            raise ConfigError(f"selector {name} needs the vision tower's CLS attention: {self.name}: {NO_CLS}")
        uses_instruction = bool(getattr(selector, "uses_instruction", False))
        batch = self.encode(images, questions)
        candidates = self.candidates(batch, features=selector is not None, cls_attention=needs_cls)
        contexts = self.selection_context(candidates, questions, uses_instruction) \
            if uses_instruction or needs_cls else None
        kept = None if selector is None else self.select(candidates, selector, budget, contexts)
        return self.splice(batch, candidates, kept)

    @torch.no_grad()
    def generate_ids(self, prompt: PrunedPrompt, **generate_kwargs) -> torch.Tensor:
        """The new tokens ``(B, T)`` of the model's own ``generate`` on ``prompt``; greedy, 32
        tokens and the pad id unless ``generate_kwargs`` say otherwise."""
        kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": self.pad_token_id, **generate_kwargs}
        out = self.model.generate(**prompt.inputs, **kwargs)
        if "input_ids" in prompt.inputs:  # generate returns the prompt's ids too
            out = out[:, prompt.inputs["input_ids"].shape[1]:]
        return out

    def answer(self, prompt: PrunedPrompt, **generate_kwargs) -> list[str]:
        """Decoded answers to an already pruned batch (so a timed prefill and generation share it)."""
        out = self.generate_ids(prompt, **generate_kwargs)
        return [text.strip() for text in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, images: Sequence, questions: Sequence[str], selector: Any = None, budget=None,
                 **generate_kwargs) -> list[str]:
        """Answers, one per (image, question)."""
        return self.answer(self.prune(images, questions, selector, budget), **generate_kwargs)

    def continuation_inputs(self, prompt: PrunedPrompt, tokens: torch.Tensor, real: torch.Tensor) -> dict:
        """Model inputs for the pruned prompt followed by ``tokens`` ``(B, T)`` (right-padded,
        ``real`` marks them), numbered as ``generate`` would number them."""
        inputs = dict(prompt.inputs)
        mask = torch.cat([inputs["attention_mask"], real.to(inputs["attention_mask"].dtype)], 1)
        if "inputs_embeds" in inputs:
            embeds = self.model.get_input_embeddings()(tokens)
            inputs["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], embeds.to(inputs["inputs_embeds"].dtype)], 1)
        else:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens.to(inputs["input_ids"].dtype)], 1)
        if "position_ids" in inputs:
            last = inputs["position_ids"][..., -1:]
            steps = torch.arange(1, tokens.shape[1] + 1, device=last.device, dtype=last.dtype)
            inputs["position_ids"] = torch.cat([inputs["position_ids"], last + steps], -1)
        else:
            inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        inputs["attention_mask"] = mask
        return inputs


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, L), mask (B, L))`` of token rows left-padded with ``pad``."""
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([r.new_zeros(width - len(r)), r.new_ones(len(r))]) for r in rows])
    return ids, mask


def image_run(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The positions of a prompt's one run of image placeholders; one line if there is not exactly one."""
    slots = (ids == image_token_id).nonzero().flatten()
    if len(slots) == 0 or int(slots[-1] - slots[0]) + 1 != len(slots):
        raise VLMError(f"expected one image per prompt, got {len(slots)} image tokens not in one run")
    return slots


def stack_contexts(contexts: list) -> SelectionContext:
    """One ``SelectionContext`` whose rows are those of ``contexts``, in order (every field alike)."""
    def cat(name: str):
        parts = [getattr(c, name) for c in contexts]
        return None if parts[0] is None else torch.cat(parts)

    instruction = None if contexts[0].instruction is None else [t for c in contexts for t in c.instruction]
    return SelectionContext(cat("cls_attention"), instruction, cat("instruction_embedding"), cat("token_embedding"))
