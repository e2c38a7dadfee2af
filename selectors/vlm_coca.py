"""``coca`` backend: open_clip CoCa as a frozen "VLM" giving a caption NTP loss (runs on CPU).

Wiring::

    patch tokens (B, n, C)        the encoder ``open_clip:<model>`` at layer -1, norm=False: the
         |                        visual trunk's last block output *before* ln_post, CLS dropped
    visual.attn_pool              frozen attentional pooler: Q learned queries cross-attend to the n tokens
    visual.ln_post                frozen
    drop query 0                  (pool_type 'tok'/'avg': query 0 is the contrastive embedding)
         |                        -> image_embs (B, Q-1, D)
    text tower + text_decoder     frozen; causal text, cross-attention to image_embs -> logits
    NLL of the target tokens      + the end-of-text token; the prompt is context only

Notes:

- CoCa's pooler was trained on the whole trunk output, CLS token included; the shared encoder
  drops CLS, so here the pooler attends over patch tokens only (any ``n >= 1`` works, it is
  cross-attention). Tokens a selector zeroed still get attention (``ln_k(0)`` is not "absent"):
  gather the kept tokens instead of masking them.
- The visual trunk (patch embedding, transformer) is dropped after building: the shared
  datamodule's encoder runs it, once.
- Text: ``[SOT] + prompt + target + [EOT]`` with open_clip's BPE tokenizer (offline). The prompt
  and the target are tokenized separately; CLIP's BPE works word by word, so this equals
  tokenizing ``prompt + " " + target``. Loss positions: the target's tokens and the EOT.
  Like open_clip's ``CoCaLoss`` (``ignore_index=pad_id=0``), the token id 0 (a "!" inside a word,
  e.g. in "wow!!") is never a label: CoCa was never trained to predict it, and its text tower
  masks it as padding.
- Truncation: prompt + target (BPE tokens, without SOT/EOT) must fit
  ``budget = min(max_text_tokens, context_length - 2)`` (74 for CoCa's 76-token context). Longer
  texts lose the prompt's *start* first (the words next to the target are kept); if the target
  alone is longer than the budget, its *end* is cut too, and then there is no EOT label (the text
  does not end there).
- ``NTPOutput.loss`` = sum of the target tokens' NLL / number of target tokens in the batch, so
  padding and the batch's text lengths do not change a sample's weight per token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokensel.common.hub import looks_like_path, weights_download
from tokensel.common.open_clip_configs import register_model_configs
from tokensel.selectors.vlm import EncoderRequirement, FrozenVLM, NTPOutput, VLMConfig, VLMError

log = logging.getLogger("tokensel.vlm.coca")
IGNORE = -100


def _model_config(cfg: VLMConfig) -> dict:
    """open_clip's config for ``cfg.model``; a one-line VLMError if it is not a CoCa."""
    import open_clip

    register_model_configs()
    if cfg.model not in open_clip.list_models():
        raise VLMError(f"selector.vlm.model={cfg.model!r}: open_clip has no such model "
                       "(the coca backend needs a CoCa, e.g. coca_ViT-B-32, coca_ViT-L-14 or coca_tiny)")
    model_cfg = open_clip.get_model_config(cfg.model)
    vision = model_cfg.get("vision_cfg", {})
    if "multimodal_cfg" not in model_cfg or vision.get("attentional_pool") is not True:
        raise VLMError(f"selector.vlm.model={cfg.model!r}: not a CoCa model (needs a multimodal text decoder "
                       "and a visual attentional pooler)")
    if vision.get("timm_model_name"):
        raise VLMError(f"selector.vlm.model={cfg.model!r}: CoCa with a timm visual trunk is not supported")
    return model_cfg


def required_encoder(cfg: VLMConfig) -> EncoderRequirement:
    """The CoCa trunk's last block output, before ``ln_post`` (what the attentional pooler reads)."""
    _model_config(cfg)
    return EncoderRequirement(name=f"open_clip:{cfg.model}", layer=-1, norm=False)


def build(cfg: VLMConfig) -> "CoCaVLM":
    import open_clip

    _model_config(cfg)
    pretrained = cfg.pretrained
    if pretrained and looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise VLMError(f"selector.vlm.pretrained={pretrained!r}: no such weights file")
    try:
        with weights_download(f"selector.vlm {cfg.model}", pretrained):
            model = open_clip.create_model(cfg.model, pretrained=pretrained or None)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained and not looks_like_path(pretrained):
            log.debug("hub download for %s:%s failed: %s", cfg.model, pretrained, err)
            raise VLMError(
                f"selector.vlm.pretrained={pretrained!r}: could not fetch {cfg.model} weights for this tag from the hub "
                f"(no network, or no such tag: {type(err).__name__}); download them elsewhere and pass "
                "selector.vlm.pretrained=/path/to/weights"
            ) from None
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise VLMError(f"selector.vlm.model={cfg.model!r} with pretrained={pretrained!r}: {first}") from None
    if not pretrained:
        # open_clip 3.3.0 never initialises the decoder's output projection (it is torch.empty, and
        # MultimodalTransformer.init_parameters is not called): a random init gets all-equal logits
        # and no gradient without this. Same init as that unused method.
        decoder = model.text_decoder
        with torch.no_grad():
            nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    if not all(hasattr(tokenizer, a) for a in ("encode", "sot_token_id", "eot_token_id")):
        raise VLMError(f"selector.vlm.model={cfg.model!r}: only open_clip's BPE tokenizer is supported "
                       f"(got {type(tokenizer).__name__})")
    return CoCaVLM(model, tokenizer, cfg.max_text_tokens, cfg.dtype)


class CoCaVLM(FrozenVLM):
    """The parts of an open_clip CoCa the caption loss needs (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, max_text_tokens: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        visual = model.visual
        if getattr(visual, "attn_pool", None) is None or getattr(visual, "attn_pool_contrastive", None) is not None:
            raise VLMError("coca: needs open_clip's standard CoCa pooler (attentional_pool=true)")
        self.attn_pool = visual.attn_pool
        self.ln_post = visual.ln_post
        self.pool_type = visual.pool_type
        self.text = model.text
        self.text_decoder = model.text_decoder
        self.tokenizer = tokenizer
        self.pad_id = int(getattr(model, "pad_id", 0))
        self.width = int(self.attn_pool.attn.kdim)  # the encoder tokens' width C
        # inputs are SOT + prompt + target (the EOT is only a label): at most context_length tokens
        self.context_length = min(int(self.text.context_length), int(self.text_decoder.context_length))
        self.budget = min(int(max_text_tokens), self.context_length - 2)
        self.dtype = dtype
        self.to(dtype)
        # The visual trunk (conv1, transformer, ...) is not kept: `model` is dropped with it.

    # ---- text ----------------------------------------------------------------------------------
    def _bpe(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text)) if text and text.strip() else []

    def text_ids(self, prompt: list[str], target: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both (B, L) long: ``inputs`` = SOT + prompt + target (padded with
        pad_id), ``labels`` = the next token at target positions (incl. EOT), IGNORE elsewhere."""
        if len(prompt) != len(target):
            raise ValueError(f"coca: {len(prompt)} prompts for {len(target)} targets")
        rows_in, rows_lab = [], []
        for p_text, t_text in zip(prompt, target):
            p, t = self._bpe(p_text), self._bpe(t_text)
            eos = True
            if len(p) + len(t) > self.budget:
                keep = max(0, self.budget - len(t))
                p = p[len(p) - keep:]  # the prompt's start goes first
                if len(t) > self.budget:
                    t, eos = t[:self.budget], False  # then the target's end; no EOT label then
            seq = [self.tokenizer.sot_token_id] + p + t + ([self.tokenizer.eot_token_id] if eos else [])
            inputs, labels = seq[:-1], seq[1:]
            labels = [IGNORE] * len(p) + [x if x != self.pad_id else IGNORE for x in labels[len(p):]]
            rows_in.append(inputs)
            rows_lab.append(labels)
        length = max(len(r) for r in rows_in)
        inputs = torch.full((len(rows_in), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows_in), length), IGNORE, dtype=torch.long)
        for i, (r_in, r_lab) in enumerate(zip(rows_in, rows_lab)):
            inputs[i, :len(r_in)] = torch.tensor(r_in)
            labels[i, :len(r_lab)] = torch.tensor(r_lab)
        return inputs, labels

    # ---- image ---------------------------------------------------------------------------------
    def image_embs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, C) trunk tokens -> (B, Q-1, D) what the text decoder cross-attends to."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.width or tokens.shape[1] < 1:
            raise ValueError(f"coca: expected tokens (B, n>=1, {self.width}), got {tuple(tokens.shape)}")
        x = self.ln_post(self.attn_pool(tokens.to(self.dtype)))
        if self.pool_type in ("tok", "avg"):
            x = x[:, 1:]  # query 0 is the contrastive (pooled) embedding, not an image token
        return x

    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str]) -> NTPOutput:
        if tokens.shape[0] != len(target):
            raise ValueError(f"coca: {tokens.shape[0]} token rows for {len(target)} texts")
        inputs, labels = self.text_ids(prompt, target)
        inputs, labels = inputs.to(tokens.device), labels.to(tokens.device)
        image_embs = self.image_embs(tokens)
        _, text_embs = self.text(inputs)  # (B, L, W); CoCa's appended CLS is already dropped
        logits = self.text_decoder(image_embs, text_embs)  # (B, L, vocab)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        counts = (labels != IGNORE).sum(1)
        sums = nll.sum(1)
        return NTPOutput(loss=sums.sum() / counts.sum().clamp_min(1), per_sample=sums / counts.clamp_min(1),
                         tokens=counts)
