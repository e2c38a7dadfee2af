"""``hf`` backend (``llava`` is its older name): any VLM family of ``vlms/`` as the frozen VLM.

Wiring (AutoSelect, arXiv 2603.07135, Sec. 1: the selector sits where the VLM's image tokens are
chosen)::

    tokens (B, n, C)              the encoder ``hf:<model>``: the family's candidates (LLaVA: its
         |                        tower at ``vision_feature_layer``, CLS dropped; Qwen-VL: the
         |                        merger's tokens at one fixed resolution)
    (LLaVA: multi_modal_projector) frozen -> (B, n, H) image embeddings
    the family's conversation     one user turn: the image, the prompt; the assistant's target, EOS
    language model + lm_head      frozen; NLL of the target tokens and EOS only (``vlms/ntp.py``)

Loading: the whole model is loaded (in ``precision``), then only what the loss needs is kept
(LLaVA: projector, language model, ``lm_head``; Qwen-VL: language model, ``lm_head``); the
vision side is released. ``selector.vlm.image_size`` fixes a Qwen-VL's resolution (the run's
``encoder.image_size`` must be the same); a LLaVA has one.
"""

from __future__ import annotations

import torch

from tokensel.common.errors import TokenselError
from tokensel.selectors.vlm import EncoderRequirement, FrozenVLM, NTPOutput, VLMConfig, VLMError
from tokensel.vlms import check_vlm, family_of, open_vlm


KEY = "selector.vlm.model"


def _vlm_error(cfg: VLMConfig, err: Exception) -> VLMError:
    """A family's one line about ``image_size``, said of ``selector.vlm.image_size``."""
    return VLMError(f"{KEY}={cfg.model!r}: {str(err).replace('image_size', 'selector.vlm.image_size')}")


def required_encoder(cfg: VLMConfig) -> EncoderRequirement:
    """The family's own candidates, as ``hf:<model>`` (``hf_llava:<model>`` for the ``llava`` name)."""
    family, config = family_of(cfg.model, KEY)
    try:
        need = family.training_encoder(cfg.model, config, cfg.image_size)
    except TokenselError as err:
        raise _vlm_error(cfg, err) from None
    library = "hf_llava" if cfg.backend == "llava" else "hf"
    return EncoderRequirement(name=f"{library}:{cfg.model}", layer=need["layer"], norm=need["norm"],
                              image_size=need["image_size"])


def build(cfg: VLMConfig) -> "HFVLM":
    if cfg.pretrained:
        raise VLMError(f"selector.vlm.pretrained={cfg.pretrained!r}: unused by the {cfg.backend} backend (the weights "
                       "come from selector.vlm.model); leave it empty")
    family = check_vlm(cfg.model, KEY)
    options = {"image_size": cfg.image_size} if family.variable_resolution else {}
    vlm = open_vlm(cfg.model, precision=cfg.precision, label=KEY, **options)
    try:
        return HFVLM(vlm.ntp_head(cfg.max_text_tokens))
    except TokenselError as err:
        raise _vlm_error(cfg, err) from None
    except ValueError as err:
        raise VLMError(f"{KEY}={cfg.model!r}: {err}") from None


class HFVLM(FrozenVLM):
    """A family's NTP head (``vlms/ntp.py``) as the frozen VLM of an objective."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str], indices=None) -> NTPOutput:
        return self.head.ntp_loss(tokens, prompt, target, indices)
