"""The next-token (NTP) loss of a family's language model, given gated or kept image tokens.

What vp_noise trains against (AutoSelect, arXiv 2603.07135; DiffPrune, arXiv 2605.28051 Eq. 2)
and what ``make eval``'s ``ntp_increase`` measures: the mean NLL of a target text (a caption, or an
answer given its question) when the image is a set of ``n`` tokens in the family's candidate space
(all N gated tokens in training, K kept tokens at evaluation). Only the language model (and
LLaVA's projector) is kept; the vision tower is released.

Choices, for every family:

- One user turn: the image, then the prompt, then the assistant's target and EOS, in the family's
  chat format (:class:`ChatFormat`: LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT: {target}``
  for every LLaVA, whatever its own template; Qwen's ``<|im_start|>`` turns). The prompt is used
  verbatim; an empty prompt (COCO captions) becomes :data:`CAPTION_INSTRUCTION`, LLaVA-1.5's
  instruction for short captions.
- Text is tokenized as one string with offsets, so the ids are what the processor would give;
  tokens are then classified as prompt / target by their character spans. Labels: the target's
  tokens and the EOS.
- Truncation: prompt + target tokens must fit ``min(max_text_tokens, max_position_embeddings -
  n - template tokens - 1)``. The prompt loses its *start* first; if the target alone is too long
  its *end* is cut too, and then there is no EOS label (the text does not end there).
- Image tokens are one contiguous block; batches are right-padded with an attention mask.
  Positions: LLaVA numbers every token in 1-D (compact ids for any n, the LLaVA-codebase default).
  Qwen-VL uses 3-D M-RoPE: N tokens on the image's grid, or ``indices`` (B, n) into that grid for
  kept tokens (their original ids), else n tokens at consecutive ids on all three axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."


@dataclass
class NTPOutput:
    """``loss``: mean NLL over all target tokens of the batch (the training loss);
    ``per_sample``: (B,) mean NLL per sample; ``tokens``: (B,) target tokens per sample."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class ChatFormat:
    """One training conversation: ``user + <image> + after_image + prompt + assistant + target_sep + target``."""

    user: str
    after_image: str
    assistant: str
    target_sep: str


LLAVA15_CHAT = ChatFormat("USER: ", "\n", " ASSISTANT:", " ")
QWEN_CHAT = ChatFormat("<|im_start|>user\n<|vision_start|>", "<|vision_end|>", "<|im_end|>\n<|im_start|>assistant\n", "")


class NTPHead(nn.Module):
    """The language model and ``lm_head`` of a VLM, scoring a target after ``n`` image tokens.
    Subclasses say how tokens become embeddings (:meth:`image_embeddings`) and where they sit
    (:meth:`position_ids`)."""

    chat: ChatFormat = LLAVA15_CHAT

    def __init__(self, model: nn.Module, tokenizer, width: int, max_text_tokens: int):
        super().__init__()
        config = model.config
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        self.name = config.model_type
        self.image_token_id = int(config.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if not isinstance(self.image_token, str) or tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ValueError(f"the tokenizer has no image token with the config's image_token_id={self.image_token_id}")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.text_config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ValueError("neither the tokenizer nor the text config has an EOS token")
        self.eos_id = int(eos)
        self.special_ids = set(tokenizer.all_special_ids) - {self.image_token_id}
        self.width = int(width)
        self.max_positions = getattr(config.text_config, "max_position_embeddings", None)
        self.max_text_tokens = int(max_text_tokens)
        self.dtype = self.language_model.get_input_embeddings().weight.dtype

    # ---- text ----------------------------------------------------------------------------------
    def conversation(self, prompt: str, target: str, n: int) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation for one sample, with one image placeholder, and which of
        them are labels (the target's tokens and the EOS), after truncation."""
        chat = self.chat
        instruction = prompt.strip() or CAPTION_INSTRUCTION
        target = target.strip()
        head = f"{chat.user}{self.image_token}{chat.after_image}"
        text = head + instruction + chat.assistant + (f"{chat.target_sep}{target}" if target else "")
        p0, p1 = len(head), len(head) + len(instruction)
        t0 = p1 + len(chat.assistant) + len(chat.target_sep)
        try:
            enc = self.tokenizer(text, return_offsets_mapping=True)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"{self.name}: the tokenizer must be a fast one (character offsets): {err}") from None
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if ids and ids[-1] == self.eos_id and tuple(offsets[-1]) == (0, 0):
            ids, offsets = ids[:-1], offsets[:-1]  # a tokenizer that appends EOS itself: we add it below
        kinds = []
        for tid, (s, e) in zip(ids, offsets):
            if tid in self.special_ids or tid == self.image_token_id or e <= s:
                kinds.append("template")
            elif target and e > t0:
                kinds.append("target")
            elif s < p1 and e > p0:
                kinds.append("prompt")
            else:
                kinds.append("template")
        if ids.count(self.image_token_id) != 1:
            raise ValueError(f"{self.name}: expected one {self.image_token!r} in the conversation, "
                             f"got {ids.count(self.image_token_id)}")
        n_prompt, n_target = kinds.count("prompt"), kinds.count("target")
        budget = self.max_text_tokens
        if self.max_positions:
            fixed = len(ids) - n_prompt - n_target - 1 + n + 1  # template, image embeddings, EOS
            budget = min(budget, int(self.max_positions) - fixed)
            if budget < 1:
                raise ValueError(f"{self.name}: {n} image tokens leave no room for text in {self.max_positions} positions")
        eos = True
        drop_prompt, keep_target = 0, n_target
        if n_prompt + n_target > budget:
            drop_prompt = n_prompt - max(0, budget - n_target)  # the prompt's start goes first
            if n_target > budget:
                keep_target, eos = budget, False  # then the target's end; no EOS label then
        out_ids, out_label = [], []
        seen_prompt = seen_target = 0
        for tid, kind in zip(ids, kinds):
            if kind == "prompt":
                seen_prompt += 1
                if seen_prompt <= drop_prompt:
                    continue
            if kind == "target":
                seen_target += 1
                if seen_target > keep_target:
                    continue
            out_ids.append(tid)
            out_label.append(kind == "target")
        if eos:
            out_ids.append(self.eos_id)
            out_label.append(True)
        return out_ids, out_label

    # ---- what a family says --------------------------------------------------------------------
    def image_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, C)`` candidates -> ``(B, n, H)`` language-model embeddings."""
        return tokens.to(self.dtype)

    def position_ids(self, at: list[int], lengths: list[int], n: int, indices: Optional[torch.Tensor],
                     device) -> Optional[torch.Tensor]:
        """Position ids of the right-padded batch (row b: its image at ``at[b]``), or None for the
        language model's own 1-D numbering."""
        return None

    # ---- loss ----------------------------------------------------------------------------------
    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str],
                 indices: Optional[torch.Tensor] = None) -> NTPOutput:
        if tokens.dim() != 3 or tokens.shape[-1] != self.width or tokens.shape[1] < 1:
            raise ValueError(f"{self.name}: expected tokens (B, n>=1, {self.width}), got {tuple(tokens.shape)}")
        if not tokens.shape[0] == len(prompt) == len(target):
            raise ValueError(f"{self.name}: {tokens.shape[0]} token rows for {len(prompt)} prompts and {len(target)} targets")
        B, n, _ = tokens.shape
        device = tokens.device
        image = self.image_embeddings(tokens)  # (B, n, H)
        embed = self.language_model.get_input_embeddings()
        rows, label_pos, label_ids, seqs, ats = [], [], [], [], []
        for b in range(B):
            ids, is_label = self.conversation(prompt[b], target[b], n)
            at = ids.index(self.image_token_id)
            ats.append(at)
            ids_t = torch.tensor(ids, device=device)
            seqs.append(torch.cat([embed(ids_t[:at]), image[b], embed(ids_t[at + 1:])], 0))
            for j, lab in enumerate(is_label):  # token j of `ids` sits at position j (+ n - 1 after the image)
                if lab:
                    pos = j if j < at else j + n - 1
                    rows.append(b)
                    label_pos.append(pos - 1)  # predicted from the previous position
                    label_ids.append(ids[j])
        lengths = [s.shape[0] for s in seqs]
        embeds = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # right padding with zeros
        mask = (torch.arange(embeds.shape[1], device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
        kwargs = {}
        positions = self.position_ids(ats, lengths, n, indices, device)
        if positions is not None:
            kwargs["position_ids"] = positions
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state
        rows_t = torch.tensor(rows, device=device)
        logits = self.lm_head(hidden[rows_t, torch.tensor(label_pos, device=device)]).float()  # only label positions
        nll = F.cross_entropy(logits, torch.tensor(label_ids, device=device), reduction="none")
        sums = torch.zeros(B, device=device, dtype=nll.dtype).index_add(0, rows_t, nll)
        counts = torch.bincount(rows_t, minlength=B)
        return NTPOutput(loss=sums.sum() / counts.sum().clamp_min(1), per_sample=sums / counts.clamp_min(1),
                         tokens=counts)


class LlavaNTP(NTPHead):
    """Projector + language model + ``lm_head`` of a LLaVA (or LLaVA-NeXT, one view at a time):
    tokens are the tower's features at its ``vision_feature_layer``; positions are 1-D."""

    def __init__(self, model: nn.Module, tokenizer, max_text_tokens: int):
        super().__init__(model, tokenizer, model.config.vision_config.hidden_size, max_text_tokens)
        self.projector = model.model.multi_modal_projector
        self.dtype = self.projector.linear_1.weight.dtype

    def image_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(tokens.to(self.dtype))


class QwenNTP(NTPHead):
    """Language model + ``lm_head`` of a Qwen-VL: tokens are the merger's output (already LLM
    embeddings) of an image on ``grid``; positions are 3-D M-RoPE ids as Qwen's ``get_rope_index``
    gives them (text before the image at 0..a-1; image token (r, c) at (a, a + r, a + c); the text
    after it from a + max(h, w)). DeepStack inputs (Qwen3-VL) are not part of the candidates, so
    this loss runs the language model without them."""

    chat = QWEN_CHAT

    def __init__(self, model: nn.Module, tokenizer, max_text_tokens: int, grid: tuple[int, int]):
        super().__init__(model, tokenizer, model.config.text_config.hidden_size, max_text_tokens)
        self.grid = (int(grid[0]), int(grid[1]))

    def position_ids(self, at, lengths, n, indices, device) -> torch.Tensor:
        h, w = self.grid
        if indices is None and n == h * w:
            indices = torch.arange(n, device=device).expand(len(at), n)
        out = torch.zeros(3, len(at), max(lengths), dtype=torch.long, device=device)
        for b, (a, length) in enumerate(zip(at, lengths)):
            if indices is None:  # compact: n consecutive ids on every axis
                image = torch.arange(a, a + n, device=device).expand(3, n)
                after = a + n
            else:
                idx = indices[b].to(device)
                image = torch.stack([torch.full_like(idx, a), a + idx // w, a + idx % w])
                after = a + max(h, w)
            out[:, b, :a] = torch.arange(a, device=device)
            out[:, b, a:a + n] = image
            out[:, b, a + n:length] = torch.arange(after, after + length - a - n, device=device)
        return out
