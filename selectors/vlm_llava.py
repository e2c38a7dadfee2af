"""``llava`` backend: a Hugging Face LLaVA (``LlavaForConditionalGeneration``) as the frozen VLM.

Wiring (AutoSelect, arXiv 2603.07135, Sec. 1: the selector sits after the vision encoder, before the projector)::

    tokens (B, n, C)              the encoder ``hf_llava:<model>``: the LLaVA's own vision tower at
         |                        its ``vision_feature_layer``, CLS dropped (what the projector reads)
    multi_modal_projector         frozen -> (B, n, H) image embeddings
    LLaVA-1.5 conversation        [BOS] "USER: <image>\\n{prompt} ASSISTANT: {target}" [EOS], with the
         |                        one <image> placeholder replaced by the n image embeddings
    language model + lm_head      frozen; NLL of the target tokens and EOS only

Choices:

- The conversation is LLaVA-1.5's (``USER: <image>\\n{prompt} ASSISTANT: {answer}</s>``) for every
  LLaVA, whatever its own chat template; the prompt is used verbatim (no "Answer the question
  using a single word or phrase." suffix).
- An empty prompt (COCO captions) becomes :data:`CAPTION_INSTRUCTION`, LLaVA-1.5's own
  instruction for short (COCO-style) captions.
- Text is tokenized as one string with offsets, so the ids are exactly what LLaVA's processor
  would give; tokens are then classified as prompt / target by their character spans.
- Truncation: prompt + target tokens must fit ``min(max_text_tokens, max_position_embeddings -
  n - template tokens - 1)``. The prompt loses its *start* first; if the target alone is too long
  its *end* is cut too, and then there is no EOS label (the text does not end there).
- Image embeddings are placed as one contiguous block, positions 0..L-1 are sequential (compact
  ids for any n, the LLaVA-codebase default), and batches are right-padded with an attention mask.
- ``vision_feature_select_strategy="full"`` with a CLIP tower would also give the CLS token to the
  projector; the shared encoder always drops it, so such models see patch tokens only (a warning).
- Loading: the whole ``LlavaForConditionalGeneration`` is loaded (in ``precision``), then only
  the projector, the language model and ``lm_head`` are kept; the vision tower is released.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokensel.common.hub import hf_model_is_local, hf_source_error, hub_download, llava_feature_layer, load_llava_config
from tokensel.selectors.vlm import EncoderRequirement, FrozenVLM, NTPOutput, VLMConfig, VLMError

log = logging.getLogger("tokensel.vlm.llava")
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
USER, ASSISTANT = "USER: ", " ASSISTANT:"
# The same conversation as a chat template, for a LLaVA trained on it (make vlm): generation then
# prompts exactly as training did ("USER: <image>\n{text} ASSISTANT:").
LLAVA15_CHAT_TEMPLATE = ("{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
                         "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                         "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _source(name: str) -> str:
    return str(Path(name).expanduser()) if hf_model_is_local(name) else name


def _quiet_hub(name: str, what: str):
    return hub_download(None if hf_model_is_local(name) else f"selector.vlm {name}: fetching the {what} from the hub")


def _config(cfg: VLMConfig):
    try:
        with _quiet_hub(cfg.model, "config"):
            return load_llava_config(cfg.model)
    except (OSError, ValueError, KeyError) as err:
        raise VLMError(hf_source_error(f"selector.vlm.model={cfg.model!r}", cfg.model, err)) from None


def required_encoder(cfg: VLMConfig) -> EncoderRequirement:
    """The LLaVA's own vision tower at its ``vision_feature_layer``, without a final norm."""
    config = _config(cfg)
    try:
        layer = llava_feature_layer(config)
    except ValueError as err:
        raise VLMError(f"selector.vlm.model={cfg.model!r}: {err}") from None
    return EncoderRequirement(name=f"hf_llava:{cfg.model}", layer=layer, norm=False)


def build(cfg: VLMConfig) -> "LlavaVLM":
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    if cfg.pretrained:
        raise VLMError(f"selector.vlm.pretrained={cfg.pretrained!r}: unused by the llava backend (the weights come "
                       "from selector.vlm.model); leave it empty")
    config = _config(cfg)
    if config.vision_feature_select_strategy == "full" and "clip" in str(config.vision_config.model_type):
        log.warning("%s uses vision_feature_select_strategy='full': its projector also saw the CLS token, "
                    "which the shared encoder drops", cfg.model)
    try:
        with _quiet_hub(cfg.model, "model"):
            tokenizer = AutoTokenizer.from_pretrained(_source(cfg.model))
            model = LlavaForConditionalGeneration.from_pretrained(_source(cfg.model), dtype=cfg.dtype)
    except (OSError, ValueError, KeyError) as err:
        raise VLMError(hf_source_error(f"selector.vlm.model={cfg.model!r}", cfg.model, err)) from None
    try:
        return LlavaVLM(model, tokenizer, cfg.max_text_tokens)
    except ValueError as err:
        raise VLMError(f"selector.vlm.model={cfg.model!r}: {err}") from None


class LlavaVLM(FrozenVLM):
    """Projector + language model + ``lm_head`` of a LLaVA (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, max_text_tokens: int):
        super().__init__()
        config = model.config
        self.projector = model.model.multi_modal_projector
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        # `model` (and with it the vision tower) is not kept.
        self.tokenizer = tokenizer
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
        self.width = int(config.vision_config.hidden_size)
        self.max_positions = getattr(config.text_config, "max_position_embeddings", None)
        self.max_text_tokens = int(max_text_tokens)
        self.dtype = self.projector.linear_1.weight.dtype

    # ---- text ----------------------------------------------------------------------------------
    def conversation(self, prompt: str, target: str, n: int) -> tuple[list[int], list[bool]]:
        """Token ids of the LLaVA-1.5 conversation for one sample, with one image placeholder, and
        which of them are labels (the target's tokens and the EOS), after truncation."""
        instruction = prompt.strip() or CAPTION_INSTRUCTION
        target = target.strip()
        head = f"{USER}{self.image_token}\n"
        text = head + instruction + ASSISTANT + (f" {target}" if target else "")
        p0, p1 = len(head), len(head) + len(instruction)
        t0 = p1 + len(ASSISTANT) + 1
        try:
            enc = self.tokenizer(text, return_offsets_mapping=True)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"llava: the tokenizer must be a fast one (character offsets): {err}") from None
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
            raise ValueError(f"llava: expected one {self.image_token!r} in the conversation, got {ids.count(self.image_token_id)}")
        n_prompt, n_target = kinds.count("prompt"), kinds.count("target")
        budget = self.max_text_tokens
        if self.max_positions:
            fixed = len(ids) - n_prompt - n_target - 1 + n + 1  # template, image embeddings, EOS
            budget = min(budget, int(self.max_positions) - fixed)
            if budget < 1:
                raise ValueError(f"llava: {n} image tokens leave no room for text in {self.max_positions} positions")
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

    # ---- loss ----------------------------------------------------------------------------------
    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str]) -> NTPOutput:
        if tokens.dim() != 3 or tokens.shape[-1] != self.width or tokens.shape[1] < 1:
            raise ValueError(f"llava: expected tokens (B, n>=1, {self.width}), got {tuple(tokens.shape)}")
        if not tokens.shape[0] == len(prompt) == len(target):
            raise ValueError(f"llava: {tokens.shape[0]} token rows for {len(prompt)} prompts and {len(target)} targets")
        B, n, _ = tokens.shape
        device = tokens.device
        image = self.projector(tokens.to(self.dtype))  # (B, n, H)
        embed = self.language_model.get_input_embeddings()
        rows, label_pos, label_ids, seqs = [], [], [], []
        for b in range(B):
            ids, is_label = self.conversation(prompt[b], target[b], n)
            at = ids.index(self.image_token_id)
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
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        rows_t = torch.tensor(rows, device=device)
        logits = self.lm_head(hidden[rows_t, torch.tensor(label_pos, device=device)]).float()  # only label positions
        nll = F.cross_entropy(logits, torch.tensor(label_ids, device=device), reduction="none")
        sums = torch.zeros(B, device=device, dtype=nll.dtype).index_add(0, rows_t, nll)
        counts = torch.bincount(rows_t, minlength=B)
        return NTPOutput(loss=sums.sum() / counts.sum().clamp_min(1), per_sample=sums / counts.clamp_min(1),
                         tokens=counts)
