"""Inference: keep the top-K tokens, in positional order. No Lightning needed.

Every selector, trained or training-free, is a :class:`SelectorNet` and answers one call::

    indices, kept = selector.select(features, budget, context=None)   # (B, k) sorted by position, (B, k, C)

``budget`` is a token count (``int``) or a keep ratio (``float`` in (0, 1]); see
:func:`~tokensel.selectors.budget.resolve_budget`. ``context`` is a :class:`SelectionContext`
holding whatever a selector needs beyond the features (the encoder's CLS attention, the
instruction); selectors that need nothing ignore it.

What an evaluation may ask of a selector beyond ``select`` is an optional method with a default
here, never a ``hasattr`` probe: :meth:`SelectorNet.kept_share` (how much of each input token the
kept tokens hold, for recall and coverage), :meth:`SelectorNet.image_from_kept` (image
reconstruction from the kept tokens, auto-encoders only), :attr:`SelectorNet.sampler_layers` (its
own Transformer layers, for FLOPs), :attr:`SelectorNet.vlm_config` (the frozen VLM it was trained
against), and the diagnostics of why a selector wins or loses (``selectors/diagnostics.py``):
:meth:`SelectorNet.ranking` (the order in which it keeps tokens, for the evidence AUROC),
:meth:`SelectorNet.objective_loss` (its own training loss on *any* kept set, so that "did not
learn its objective" and "learned something other than the answer evidence" can be told apart)
and :attr:`SelectorNet.trained_budget` (the keep ratio it was trained for, if any).

A trained selector loads from its checkpoint with :func:`tokensel.selectors.catalog.load_selector`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tokensel.common.checkpoint_files import load_plain
from tokensel.common.errors import CheckpointError, TokenselError
from tokensel.common.selection import SelectionContext
from tokensel.datamodules.batch import FeatureBatch
from tokensel.selectors.budget import Budget, resolve_budget
from tokensel.selectors.pretrained import PretrainedMixin


class ContextError(TokenselError):
    """A selector called without what it needs in its :class:`SelectionContext` (e.g. a query-aware
    selector without the instruction's embedding): one line naming the missing field."""


def context_across(context: Optional[SelectionContext], G: int, V: int) -> Optional[SelectionContext]:
    """A per-view context (rows ``G * V``, image-major) made per image, for a rule that chooses
    among an image's flattened ``V * N`` tokens: CLS attention and token embeddings are
    concatenated over the views; the instruction (the same for every view of an image) is the
    first view's."""
    if context is None:
        return None

    def flat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.reshape(G, V * x.shape[1], *x.shape[2:])

    def first(x):
        return None if x is None else x[::V]

    return SelectionContext(cls_attention=flat(context.cls_attention), instruction=first(context.instruction),
                            instruction_embedding=first(context.instruction_embedding),
                            token_embedding=flat(context.token_embedding))


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores per row, sorted by position (ascending)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``features[b, indices[b]]`` for every row: ``(B, N, C), (B, k) -> (B, k, C)``."""
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


class SelectorNet(nn.Module, PretrainedMixin):
    """Base of every selector. Subclasses implement :meth:`scores` (a top-K rule),
    :meth:`positions` (any other subset rule, e.g. greedy diversity) or, with ``merges = True``,
    :meth:`merge` (a rule whose kept tokens are averages of input tokens, e.g. pooling). A trained
    one sets ``dims``, the feature geometry it was trained on, which :meth:`select` holds features
    to (a training-free one leaves it None and takes any geometry), and saves and loads as a folder or hub repo (``save_pretrained``, ``from_pretrained``,
    ``push_to_hub``; ``pretrained.py``).

    **What "kept" means.** A subset selector returns ``kept = features[indices]``: token ``j`` of
    ``kept`` *is* input token ``indices[j]``. A merging selector (``merges = True``: ``pool``,
    ``visionzip``) returns new tokens, each a weighted average of input tokens; ``indices[j]``
    then names output token ``j`` by its anchor, a distinct input position (the centre token of a
    pooled cell; the dominant token, or the target a contextual group merges into), still sorted
    by position, so a pruned VLM can give it that token's position. A merging selector may return
    fewer than ``k`` tokens (``pool`` keeps the largest cell grid with at most ``k`` cells).
    :meth:`kept_share` says how much of each input token the kept tokens hold, which makes evidence
    recall and coverage well defined for both kinds (``selectors/metrics.py``).

    **Query-aware selectors.** ``uses_instruction = True`` declares a selector whose choice depends
    on ``context.instruction`` / ``context.instruction_embedding`` (``cdpruner``; a trained
    selector may declare it too). Its selection belongs to an (image, instruction) pair, not to an
    image: it is recomputed for every question and must never be cached per image. The feature
    cache (``datamodules/feature_cache.py``) stores encoder features, never selections, so every
    selector, query-aware or not, selects afresh from cached features and the batch's
    instruction. An evaluation that cannot supply the instruction reports such a selector as
    ``n/a`` rather than running it without one; ``select`` without it raises :class:`ContextError`.
    """

    needs_cls_attention: bool = False
    uses_instruction: bool = False
    merges: bool = False
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

    def merge(self, features: torch.Tensor, k: int,
              context: Optional[SelectionContext]) -> tuple[torch.Tensor, torch.Tensor]:
        """A merging rule (``merges = True``): ``(anchors (B, k'), weights (B, k', N))`` with
        ``k' <= k`` distinct anchor positions, sorted, and non-negative weights, so that
        ``kept = weights @ features``."""
        raise NotImplementedError(f"{type(self).__name__} is not a merging selector")

    @torch.no_grad()
    def select(self, features: torch.Tensor, budget: Budget, *,
               context: Optional[SelectionContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``budget`` tokens: ``(indices (B, k) long, sorted by position, kept (B, k, C))``
        (a merging selector: anchors and merged tokens, see the class docstring)."""
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, C), got shape {tuple(features.shape)}")
        self.check_features(features.shape[1], features.shape[2])
        k = resolve_budget(budget, features.shape[1])
        if self.merges:
            anchors, weights = self.merge(features, k, context)
            return anchors.long(), (weights.to(features.dtype) @ features)
        indices = self.positions(features, k, context).long().sort(dim=-1).values
        return indices, gather_tokens(features, indices)

    def kept_share(self, features: torch.Tensor, indices: torch.Tensor,
                   context: Optional[SelectionContext] = None) -> torch.Tensor:
        """``(B, N)`` float: how much of each input token the kept tokens hold, for the ``indices``
        that :meth:`select` returned on these ``features``. A subset selector: 1 for a kept token,
        0 for a dropped one. A merging selector: ``sum_j w[j, i]`` over its kept tokens ``j``,
        with each token's weights normalised to sum to 1 (a token averaged into a cell of 9 holds
        1/9 of one kept token). Either way it sums to the number of kept tokens."""
        B, N = features.shape[:2]
        if not self.merges:
            share = torch.zeros(B, N, dtype=torch.float32, device=indices.device)
            return share.scatter_(1, indices.long(), 1.0)
        anchors, weights = self.merge(features, indices.shape[1], context)
        if not torch.equal(anchors.long(), indices.long().to(anchors.device)):
            raise ValueError(f"{type(self).__name__}: these indices were not returned by select() on these features")
        weights = weights.float()
        return (weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-12)).sum(dim=1)

    @torch.no_grad()
    def select_across(self, views: torch.Tensor, budget: Budget, *,
                      context: Optional[SelectionContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``budget`` of all ``V * N`` tokens of each image's ``V`` views, chosen jointly
        (LLaVA-NeXT's anyres views with ``data.view_selection=across``): ``(G, V, N, C)`` →
        ``(indices (G, k) into the view-major V * N tokens, sorted, kept (G, k, C))``; ``budget``
        counts against ``V * N``. A top-K selector scores every view as it was trained, one view at
        a time (``context`` rows are views), and keeps the best ``k`` over all of them; any other
        rule chooses among the flattened tokens (:meth:`positions_across`, or :meth:`merge` on the
        flattened tokens for a merging selector), with the context made per image
        (:func:`context_across`)."""
        if views.dim() != 4:
            raise ValueError(f"views must be (G, V, N, C), got shape {tuple(views.shape)}")
        G, V, N, C = views.shape
        self.check_features(N, C)
        k = resolve_budget(budget, V * N)
        flat = views.reshape(G, V * N, C)
        if self.merges:
            anchors, weights = self.merge(flat, k, context_across(context, G, V))
            return anchors.long(), weights.to(flat.dtype) @ flat
        if type(self).positions is SelectorNet.positions:
            indices = self.scores(views.reshape(G * V, N, C), context).reshape(G, V * N).topk(k, dim=-1).indices
        else:
            indices = self.positions_across(views, k, context)
        indices = indices.long().sort(dim=-1).values
        return indices, gather_tokens(flat, indices)

    def positions_across(self, views: torch.Tensor, k: int, context: Optional[SelectionContext]) -> torch.Tensor:
        """``(G, k)`` positions among the flattened ``V * N`` tokens (a rule that is not a top-K)."""
        G, V, N, C = views.shape
        return self.positions(views.reshape(G, V * N, C), k, context_across(context, G, V))

    def kept_share_across(self, views: torch.Tensor, indices: torch.Tensor,
                          context: Optional[SelectionContext] = None) -> torch.Tensor:
        """:meth:`kept_share` for :meth:`select_across`: ``(G, V * N)`` over the flattened views."""
        G, V, N, C = views.shape
        return self.kept_share(views.reshape(G, V * N, C), indices, context_across(context, G, V))

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

    def ranking(self, features: torch.Tensor, context: Optional[SelectionContext] = None) -> Optional[torch.Tensor]:
        """``(B, N)`` the order in which this selector keeps tokens, higher first, or None when it has
        no order (an even grid). A top-K selector ranks by its :meth:`scores`; a rule that is not a
        top-K overrides this (DivPrune: its greedy pick order)."""
        if type(self).scores is SelectorNet.scores:
            return None
        return self.scores(features, context)

    def objective_loss(self, batch: FeatureBatch, keep: torch.Tensor, vlm: Optional[nn.Module] = None
                       ) -> Optional[torch.Tensor]:
        """Per-sample loss ``(B,)`` of this selector's own training objective when only the tokens
        of ``keep`` (a ``(B, N)`` bool mask) are kept; lower is better; NaN for a sample the
        objective cannot score (vp_noise: empty text). ``vlm`` is the frozen VLM an objective
        needs (built by the caller from :attr:`vlm_config`). None for selectors with no objective
        (the training-free baselines), or when the objective needs a VLM and none is given."""
        return None

    @property
    def trained_budget(self) -> Optional[float]:
        """The keep ratio this selector's objective trained it for, or None when it was not
        trained for one (an auto-encoder with the paper's wide band, a baseline)."""
        return None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A selector checkpoint, read with ``weights_only=True`` (no pickled objects run)."""
    ckpt = load_plain(path, map_location)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "selector" not in hp or "dims" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a tokensel selector checkpoint (no selector/dims hyper-parameters)")
    return ckpt
