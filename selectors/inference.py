"""Inference: keep the top-K tokens, in positional order. No Lightning needed.

Every selector, trained or training-free, is a :class:`SelectorNet` and answers one call::

    indices, kept = selector.select(features, budget, context=None)   # (B, k) sorted by position, (B, k, C)

``budget`` is a token count (``int``) or a keep ratio (``float`` in (0, 1]); see
:func:`~tokensel.selectors.budget.resolve_budget`. ``context`` is a :class:`SelectionContext`
holding whatever a selector needs beyond the features (today: the encoder's CLS attention, for
the ``cls_attention`` baseline); selectors that need nothing ignore it.

What an evaluation may ask of a selector beyond ``select`` is an optional method with a default
here, never a ``hasattr`` probe: :meth:`SelectorNet.image_from_kept` (image reconstruction from
the kept tokens, auto-encoders only), :attr:`SelectorNet.sampler_layers` (its own Transformer
layers, for FLOPs) and :attr:`SelectorNet.vlm_config` (the frozen VLM it was trained against).

A trained selector loads from its checkpoint with :func:`tokensel.selectors.catalog.load_selector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tokensel.common.checkpoint_files import load_plain
from tokensel.common.errors import CheckpointError
from tokensel.selectors.budget import Budget, resolve_budget


@dataclass
class SelectionContext:
    """What a selector may need beyond the patch features; every field is optional.

    - ``cls_attention``: ``(B, N)`` the frozen encoder's CLS->patch attention
      (``FeatureBatch.cls_attention``, filled when ``data.cls_attention_layer`` is set).
    """

    cls_attention: Optional[torch.Tensor] = None


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores per row, sorted by position (ascending)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``features[b, indices[b]]`` for every row: ``(B, N, C), (B, k) -> (B, k, C)``."""
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


class SelectorNet(nn.Module):
    """Base of every selector. Subclasses implement :meth:`scores` (a top-K rule) or
    :meth:`positions` (any other rule, e.g. greedy diversity). A trained selector sets ``dims``,
    the feature geometry it was trained on, and :meth:`select` holds features to it; a
    training-free one leaves it None and takes any geometry."""

    needs_cls_attention: bool = False
    dims: Optional[Any] = None  # FeatureDims of a trained selector

    def check_features(self, n: int, width: int) -> None:
        """One line when ``n`` tokens of ``width`` are not what a trained selector was trained on."""
        dims = self.dims
        if dims is not None and (n, width) != (dims.num_tokens, dims.dim):
            name = getattr(getattr(self, "config", None), "name", type(self).__name__)
            h, w = dims.grid
            raise CheckpointError(f"{name} was trained on {dims.num_tokens} tokens ({h}x{w}) of width {dims.dim}, "
                                  f"got {n} tokens of width {width}")

    def for_grid(self, grid: tuple[int, int]) -> "SelectorNet":
        """The selector for features on an ``(h, w)`` token grid (a VLM's images may each have
        their own): itself, unless its rule depends on the grid (``uniform``)."""
        return self

    def scores(self, features: torch.Tensor, context: Optional[SelectionContext] = None) -> torch.Tensor:
        """Per-token scores ``(B, N)``; higher means keep."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token scores; use select()")

    def positions(self, features: torch.Tensor, k: int, context: Optional[SelectionContext]) -> torch.Tensor:
        """``(B, k)`` distinct positions to keep, in any order. Default: the top-k :meth:`scores`."""
        return self.scores(features, context).topk(k, dim=-1).indices

    @torch.no_grad()
    def select(self, features: torch.Tensor, budget: Budget, *,
               context: Optional[SelectionContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``budget`` tokens: ``(indices (B, k) long, sorted by position, kept (B, k, C))``."""
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, C), got shape {tuple(features.shape)}")
        self.check_features(features.shape[1], features.shape[2])
        k = resolve_budget(budget, features.shape[1])
        indices = self.positions(features, k, context).long().sort(dim=-1).values
        return indices, gather_tokens(features, indices)

    @torch.no_grad()
    def select_across(self, views: torch.Tensor, budget: Budget, *,
                      context: Optional[SelectionContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``budget`` of all ``V * N`` tokens of each image's ``V`` views, chosen jointly
        (LLaVA-NeXT's anyres views with ``data.view_selection=across``): ``(G, V, N, C)`` →
        ``(indices (G, k) into the view-major V * N tokens, sorted, kept (G, k, C))``; ``budget``
        counts against ``V * N``. A top-K selector scores every view as it was trained, one view at
        a time (``context`` rows are views), and keeps the best ``k`` over all of them; any other
        rule chooses among the flattened tokens (:meth:`positions_across`)."""
        if views.dim() != 4:
            raise ValueError(f"views must be (G, V, N, C), got shape {tuple(views.shape)}")
        G, V, N, C = views.shape
        self.check_features(N, C)
        k = resolve_budget(budget, V * N)
        flat = views.reshape(G, V * N, C)
        if type(self).positions is SelectorNet.positions:
            indices = self.scores(views.reshape(G * V, N, C), context).reshape(G, V * N).topk(k, dim=-1).indices
        else:
            indices = self.positions_across(views, k, context)
        indices = indices.long().sort(dim=-1).values
        return indices, gather_tokens(flat, indices)

    def positions_across(self, views: torch.Tensor, k: int, context: Optional[SelectionContext]) -> torch.Tensor:
        """``(G, k)`` positions among the flattened ``V * N`` tokens (a rule that is not a top-K)."""
        G, V, N, C = views.shape
        return self.positions(views.reshape(G, V * N, C), k, context)

    # ---- optional: what an evaluation may ask beyond select() -----------------------------------
    def image_from_kept(self, features: torch.Tensor, keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The image ``(B, 3, S, S)`` in [0, 1] reconstructed from the kept tokens (``keep`` a
        ``(B, N)`` bool mask), for selectors that reconstruct; None for the others."""
        return None

    @property
    def sampler_layers(self) -> int:
        """Transformer layers the selector runs on every token at inference (0: none), for FLOPs."""
        return 0

    @property
    def vlm_config(self) -> Optional[Any]:
        """The ``selector.vlm`` config of the frozen VLM this selector was trained against, if any."""
        return None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A selector checkpoint, read with ``weights_only=True`` (no pickled objects run)."""
    ckpt = load_plain(path, map_location)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "selector" not in hp or "dims" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a tokensel selector checkpoint (no selector/dims hyper-parameters)")
    return ckpt
