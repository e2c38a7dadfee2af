"""Frozen VLM backends by name (``selector.vlm.backend``): ``coca`` and ``hf`` (any VLM family of
``vlms/``; ``llava`` is its older name).

Each backend module (``vlm_coca.py``, ``vlm_hf.py``) provides ``required_encoder(cfg)`` (cheap:
reads configs, builds no model) and ``build(cfg)``; this is the one table that names them.
"""

from __future__ import annotations

import torch

from tokensel.common.registry import Registry
from tokensel.selectors import vlm_coca, vlm_hf
from tokensel.selectors.vlm import EncoderRequirement, FrozenVLM, VLMConfig

VLM_BACKENDS = Registry("VLM backend")
VLM_BACKENDS.register("coca", vlm_coca)
VLM_BACKENDS.register("hf", vlm_hf)
VLM_BACKENDS.register("llava", vlm_hf)


def required_encoder(cfg: VLMConfig) -> EncoderRequirement:
    """The encoder ``cfg``'s backend needs (``encoder.name``, layer, norm)."""
    return VLM_BACKENDS.get(cfg.backend, "selector.vlm.backend").required_encoder(cfg)


def build_vlm(cfg: VLMConfig) -> FrozenVLM:
    """Build the frozen VLM head of ``cfg`` (without its vision encoder).

    Random initialisation (no weights given) is drawn from ``cfg.init_seed`` alone, so a random
    VLM is the same network in training, evaluation and every DDP rank.
    """
    backend = VLM_BACKENDS.get(cfg.backend, "selector.vlm.backend")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        vlm = backend.build(cfg)
    return vlm.freeze()
