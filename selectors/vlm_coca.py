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

A CoCa *head* over another encoder's tokens (the corpus teacher, ``experiments/teacher.py``): a
CoCa whose attentional pooler, text tower and decoder were trained on a frozen encoder's tokens,
not on its own trunk's. Its weights file (safetensors) says so in its metadata
(:data:`HEAD_METADATA`: the open_clip model, the token width, the encoder's name, weights, layer,
norm and image size), so :func:`required_encoder` asks for *that* encoder and :func:`build` builds
the pooler at its width. ``selector.vlm.pretrained=corpus`` names the teacher of the run's own
encoder and corpus; ``make train`` and ``make eval`` resolve it to its file (building it once).
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
CORPUS_TEACHER = "corpus"  # selector.vlm.pretrained: the corpus teacher, resolved to a file before build
HEAD_METADATA = "tokensel.coca_head"  # safetensors metadata key of a CoCa head's weights file


def names_corpus_teacher(cfg: VLMConfig) -> bool:
    """Whether ``selector.vlm`` asks for the corpus teacher, which the run resolves to a file."""
    return cfg.backend == "coca" and cfg.pretrained == CORPUS_TEACHER


def head_metadata(pretrained: str) -> dict | None:
    """The :data:`HEAD_METADATA` record of a CoCa-head weights file, else None (any other file)."""
    if not pretrained.endswith(".safetensors") or not Path(pretrained).is_file():
        return None
    import json

    from safetensors import safe_open

    with safe_open(pretrained, framework="pt") as f:
        meta = (f.metadata() or {}).get(HEAD_METADATA)
    return json.loads(meta) if meta else None


def init_decoder_projection(model: nn.Module) -> None:
    """open_clip 3.3.0 never initialises the decoder's output projection (it is torch.empty, and
    MultimodalTransformer.init_parameters is not called): a random init gets all-equal logits and
    no gradient without this. Same init as that unused method."""
    decoder = model.text_decoder
    with torch.no_grad():
        nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)


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
    """The CoCa trunk's last block output, before ``ln_post`` (what the attentional pooler reads);
    for a CoCa head, the encoder it was trained on; for the corpus teacher, the run's own."""
    _model_config(cfg)
    if cfg.pretrained == CORPUS_TEACHER:
        return EncoderRequirement(name=None, layer=None, norm=None)
    meta = head_metadata(cfg.pretrained)
    if meta is not None:
        enc = meta["encoder"]
        return EncoderRequirement(name=enc["name"], layer=enc["layer"], norm=enc["norm"], weights=enc["weights"],
                                  image_size=enc["image_size"])
    return EncoderRequirement(name=f"open_clip:{cfg.model}", layer=-1, norm=False)


def create_head(model: str, width: int, pretrained: str | None = None) -> nn.Module:
    """The open_clip CoCa ``model`` with its attentional pooler reading ``width``-wide tokens."""
    import open_clip

    register_model_configs()
    vision = dict(open_clip.get_model_config(model)["vision_cfg"], width=int(width))
    return open_clip.create_model(model, pretrained=pretrained, vision_cfg=vision)


def build(cfg: VLMConfig) -> "CoCaVLM":
    import open_clip

    _model_config(cfg)
    pretrained = cfg.pretrained
    if pretrained == CORPUS_TEACHER:
        raise VLMError("selector.vlm.pretrained=corpus: the corpus teacher is resolved to its weights file by "
                       "make train / make eval (tokensel.experiments.teacher.ensure_teacher); pass that file here")
    if pretrained and looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise VLMError(f"selector.vlm.pretrained={pretrained!r}: no such weights file")
    meta = head_metadata(pretrained)
    if meta is not None and meta["open_clip_model"] != cfg.model:
        raise VLMError(f"selector.vlm.pretrained={pretrained!r} is a {meta['open_clip_model']} head, "
                       f"not {cfg.model}: set selector.vlm.model={meta['open_clip_model']}")
    try:
        with weights_download(f"selector.vlm {cfg.model}", pretrained):
            if meta is not None:
                model = create_head(cfg.model, meta["width"], pretrained)
            else:
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
        init_decoder_projection(model)
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

    def decoder_hidden(self, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
        """open_clip's ``MultimodalTransformer.forward`` up to its final norm, before the vocabulary
        projection: causal self-attention and cross-attention to ``image_embs``, block by block."""
        decoder = self.text_decoder
        mask = decoder.attn_mask[:text_embs.shape[1], :text_embs.shape[1]]
        if not decoder.batch_first:
            image_embs, text_embs = image_embs.permute(1, 0, 2), text_embs.permute(1, 0, 2)
        for block, cross in zip(decoder.resblocks, decoder.cross_attn):
            text_embs = cross(block(text_embs, attn_mask=mask), k_x=image_embs, v_x=image_embs)
        if not decoder.batch_first:
            text_embs = text_embs.permute(1, 0, 2)
        return decoder.ln_final(text_embs)

    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str], indices=None) -> NTPOutput:
        if tokens.shape[0] != len(target):  # CoCa's attentional pooler has no positions: indices do not matter
            raise ValueError(f"coca: {tokens.shape[0]} token rows for {len(target)} texts")
        inputs, labels = self.text_ids(prompt, target)
        inputs, labels = inputs.to(tokens.device), labels.to(tokens.device)
        image_embs = self.image_embs(tokens)
        _, text_embs = self.text(inputs)  # (B, L, W); CoCa's appended CLS is already dropped
        scored = labels != IGNORE
        # the decoder's vocabulary projection (most of its compute) only where a label is scored
        logits = self.decoder_hidden(image_embs, text_embs)[scored] @ self.text_decoder.text_projection
        picked = F.cross_entropy(logits.float(), labels[scored], reduction="none")
        nll = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(scored, picked)
        counts = scored.sum(1)
        sums = nll.sum(1)
        return NTPOutput(loss=sums.sum() / counts.sum().clamp_min(1), per_sample=sums / counts.clamp_min(1),
                         tokens=counts)
