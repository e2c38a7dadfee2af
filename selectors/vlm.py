"""Frozen VLM heads: the next-token-prediction (NTP) loss of a frozen vision-language model,
given visual tokens that a selector gated or kept.

A backend is a :class:`FrozenVLM` that consumes the shared datamodule's patch features (in the
encoder's feature space, before any projector) and returns the NTP loss of the text. It never
runs the vision encoder itself: it *declares* the encoder it needs
(:func:`required_encoder`), and the run config is checked against it before anything is built.

Backends (``selector.vlm.backend``):

- ``coca``: open_clip CoCa. Tokens → frozen attentional pooler + ``ln_post`` → frozen multimodal
  text decoder → caption/answer NTP loss (``selectors/vlm_coca.py``).
- ``hf`` (``llava`` is its older name): any VLM family of ``vlms/`` (LLaVA, LLaVA-NeXT, Qwen2.5-VL,
  Qwen3-VL). Tokens in the family's candidate space → (LLaVA's frozen projector) → frozen LLM
  with the prompt → answer/caption NTP loss (``selectors/vlm_hf.py``, ``vlms/ntp.py``).

This module is the interface; ``selectors/vlm_backends.py`` picks a backend by name.

Frozen means: every parameter has ``requires_grad=False``, the module stays in eval mode, it is
never in the optimizer or a checkpoint, and gradients still flow *through* it to its input tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from tokensel.common.errors import ConfigError, VLMError
from tokensel.common.precision import check_precision
from tokensel.vlms import encoder_model
from tokensel.vlms.ntp import NTPOutput

__all__ = ["EncoderRequirement", "FrozenVLM", "NTPOutput", "VLMConfig", "VLMError"]


@dataclass
class VLMConfig:
    """``selector.vlm.*``."""

    backend: str = "coca"  # "coca" | "hf" ("llava" is the older name of hf)
    # coca: an open_clip CoCa model name; hf: a local folder or a hub id of any VLM family (vlms/)
    model: str = "coca_ViT-B-32"
    # coca: "" random init, a local weights file, an open_clip tag, or "corpus" (the corpus
    # teacher: a CoCa head trained once on the run's encoder and corpus, experiments/teacher.py); hf: unused
    pretrained: str = ""
    max_text_tokens: int = 64  # prompt + target tokens; longer texts are truncated from the prompt's start
    precision: str = "32"  # "32" | "bf16" | "16": the frozen VLM's dtype
    init_seed: int = 0  # random initialisation, when no weights are given
    # hf with a Qwen-VL: the fixed input side (pixels; the run's encoder.image_size must match).
    # None: the processor's own, when its min_pixels = max_pixels
    image_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_precision("selector.vlm.precision", self.precision)  # now, before any model is built
        if self.max_text_tokens < 1:
            raise ConfigError(f"selector.vlm.max_text_tokens={self.max_text_tokens}: must be at least 1")

    @property
    def dtype(self) -> torch.dtype:
        return check_precision("selector.vlm.precision", self.precision)


@dataclass(frozen=True)
class EncoderRequirement:
    """What a backend needs from ``encoder.*``: the name and the feature layer/normalisation.
    ``None`` asks for nothing (the corpus teacher is trained on whatever the run's encoder is)."""

    name: str | None
    layer: int | None
    norm: bool | None
    # a CoCa head's encoder: its weights identity (datamodules/feature_cache.weights_identity) and input size
    weights: str | None = None
    image_size: int | None = None

    def mismatch(self, name: str, layer: int, norm: bool, weights: str | None = None,
                 image_size: int | None = None) -> str | None:
        """A one-line reason when an encoder config does not fit, else None. ``weights`` and
        ``image_size`` are compared only when this requirement has them."""
        wanted = {"encoder.name": self.name, "encoder.layer": self.layer, "encoder.norm": self.norm,
                  "encoder.weights": self.weights, "encoder.image_size": self.image_size}
        got = {"encoder.name": name, "encoder.layer": layer, "encoder.norm": norm, "encoder.weights": weights,
               "encoder.image_size": image_size}
        same_hf = encoder_model(name) is not None and encoder_model(name) == encoder_model(self.name or "")
        bad = [k for k in wanted if wanted[k] is not None and wanted[k] != got[k]
               and not (k == "encoder.name" and same_hf)]  # hf:<m> and hf_llava:<m> are one encoder
        if not bad:
            return None
        return "; ".join(f"{k}={wanted[k]!r} (got {got[k]!r})" for k in bad)


class FrozenVLM(nn.Module):
    """Base of the backends. Subclasses implement :meth:`ntp_loss`."""

    def freeze(self) -> "FrozenVLM":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "FrozenVLM":
        return super().train(False)  # frozen means no dropout, whatever the caller asks

    def ntp_loss(self, tokens: torch.Tensor, prompt: list[str], target: list[str],
                 indices: Optional[torch.Tensor] = None) -> NTPOutput:
        """NTP loss of ``target`` given the visual ``tokens`` (B, n, C) and the text ``prompt``.

        ``n`` may be any count (all N gated tokens in training, K kept tokens at evaluation).
        ``indices`` (B, n): where kept tokens sit among the N, for a VLM whose positions depend on
        it (Qwen-VL's M-RoPE); others ignore it. The loss covers the target's tokens only (and the
        end-of-text token).
        """
        raise NotImplementedError
