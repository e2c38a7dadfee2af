"""Inference: keep the top-K tokens, in positional order. No Lightning needed.

Every selector (trained or training-free) answers the same call::

    indices, kept = selector.select(features, budget)   # (B, k) sorted by position, (B, k, C)

``budget`` is a token count (``int``) or a keep ratio (``float`` in (0, 1]).

A trained selector loads from its checkpoint in two lines::

    from tokensel.selectors.inference import load_selector
    selector = load_selector("runs/gumbel_ae/version_0/checkpoints/last.ckpt")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class BudgetError(ValueError):
    """A budget that cannot be met (0, negative, or more tokens than there are)."""


def resolve_budget(budget: int | float, num_tokens: int) -> int:
    """Tokens to keep: an ``int`` is a count in ``[1, N]``; a ``float`` is a ratio in ``(0, 1]``
    and rounds to the nearest count (at least 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget={budget!r}: expected a token count (int) or a keep ratio (float)")
    if isinstance(budget, int):
        if not 1 <= budget <= num_tokens:
            raise BudgetError(f"budget={budget}: need 1 <= k <= N={num_tokens}")
        return budget
    if not 0.0 < budget <= 1.0:
        raise BudgetError(f"keep ratio {budget}: need 0 < ratio <= 1")
    return max(1, min(num_tokens, round(budget * num_tokens)))


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores per row, sorted by position (ascending)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``features[b, indices[b]]`` for every row: ``(B, N, C), (B, k) -> (B, k, C)``."""
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


class SelectorNet(nn.Module):
    """Base of every selector network used at inference: subclasses implement :meth:`scores`."""

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-token scores ``(B, N)``; higher means keep."""
        raise NotImplementedError

    @torch.no_grad()
    def select(self, features: torch.Tensor, budget: int | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the top-``budget`` tokens: ``(indices (B, k) sorted by position, kept (B, k, C))``."""
        k = resolve_budget(budget, features.shape[1])
        indices = topk_positions(self.scores(features), k)
        return indices, gather_tokens(features, indices)


class CheckpointError(ValueError):
    """A checkpoint that is not a tokensel selector checkpoint, or does not fit the features."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "selector" not in hp or "dims" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a tokensel selector checkpoint (no selector/dims hyper-parameters)")
    return ckpt


def load_selector(path: str | Path, map_location: str | torch.device = "cpu") -> SelectorNet:
    """Rebuild a trained selector network from a training checkpoint, in eval mode.

    Only the selector network's weights are read; no Trainer, optimizer or encoder is built.
    The network keeps ``.config`` (its selector config) and ``.dims`` (the feature geometry it
    was trained on).
    """
    from tokensel.selectors.registry import get_entry  # the registry imports the objectives

    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    entry = get_entry(hp["selector"]["name"])
    module_cls = entry.module_cls
    config, dims = module_cls.parse_hparams(hp)
    net = module_cls.build_net(config, dims)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match {entry.name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.config, net.dims = config, dims
    return net.eval()
