"""Query-aware training-free baselines: ``cdpruner``.

A query-aware selector (``uses_instruction = True``) chooses per (image, instruction): it reads the
instruction's embedding from ``SelectionContext.instruction_embedding`` and compares it with
``SelectionContext.token_embedding`` (the image tokens in the same space). See ``SelectorNet``'s
docstring for what that means for caching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tokensel.common.errors import ConfigError
from tokensel.selectors.baselines import BASELINES, TrainingFreeSelector, rank_from_order
from tokensel.selectors.inference import ContextError, SelectionContext


def instruction_relevance(features: torch.Tensor, context: Optional[SelectionContext],
                          negate: bool = False, name: str = "cdpruner") -> torch.Tensor:
    """Relevance ``(B, N)`` of each token to the instruction (CDPruner, arXiv 2506.10967, Sec. 3.3):
    the cosine of ``context.token_embedding`` (or the features, when that is ``None``) with the
    instruction's embedding, averaged over its ``M`` segments, then min-max normalised per row to
    ``(0, 1]``: ``(r - min + eps) / (max - min + eps)``, ``eps = 1e-6``, so no token's weight is 0
    and a constant row gives all 1. ``negate``: use ``-cos`` (the official LLaVA code does, for
    CLIP's penultimate-layer tokens). Raises :class:`ContextError` without an instruction embedding."""
    B, N = features.shape[:2]
    query = None if context is None else context.instruction_embedding
    if query is None:
        raise ContextError(f"{name} is query-aware and needs the instruction's embedding "
                           "(SelectionContext.instruction_embedding); none was passed to select()")
    tokens = context.token_embedding if context.token_embedding is not None else features
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    tokens, query = tokens.to(dtype), query.to(tokens.device, dtype)
    query = query.unsqueeze(1) if query.dim() == 2 else query  # (B, M, D)
    if tokens.shape[:2] != (B, N) or query.shape[0] != B or query.shape[-1] != tokens.shape[-1]:
        raise ContextError(f"{name}: token embedding {tuple(tokens.shape)} and instruction embedding "
                           f"{tuple(query.shape)} do not fit features {tuple(features.shape)} (need (B, N, D) and (B, M, D))")
    cos = F.normalize(tokens, dim=-1) @ F.normalize(query, dim=-1).transpose(1, 2)  # (B, N, M)
    r = cos.mean(dim=-1) * (-1.0 if negate else 1.0)
    low, high = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
    return (r - low + 1e-6) / (high - low + 1e-6)


def greedy_map_dpp(kernel: torch.Tensor, k: int, fallback: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``L`` ``(B, N, N)`` (Chen et al., "Fast Greedy MAP
    Inference for Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018,
    Alg. 1): ``(B, k)`` positions in the order picked.

    Each step adds the item with the largest marginal gain ``d_i^2 = det(L_{S+i}) / det(L_S)``,
    kept up to date by an incremental Cholesky factor: with ``j`` picked,
    ``e_i = (L_ji - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``, ``d_i^2 <- d_i^2 - e_i^2``. Ties go to
    the lowest index. Once no item adds volume (every ``d_i^2`` at most ``tol = eps * N * max L_ii``,
    i.e. ``k`` exceeds the kernel's rank), the rest are taken by ``fallback`` (``(B, N)``, higher
    first; default the diagonal), so exactly ``k`` distinct items come back.
    """
    B, N, _ = kernel.shape
    rows = torch.arange(B, device=kernel.device)
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i^2
    tol = torch.finfo(kernel.dtype).eps * N * gain.amax(dim=-1, keepdim=True).clamp(min=0)
    rank = fallback if fallback is not None else gain.clone()
    rank = -1.0 - 1.0 / (1.0 + rank.to(kernel.dtype).clamp(min=0))  # in [-2, -1): below any real gain
    factors = torch.zeros(k, B, N, dtype=kernel.dtype, device=kernel.device)
    picked = torch.empty(B, k, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(B, N, dtype=torch.bool, device=kernel.device)
    for t in range(k):
        key = torch.where(gain > tol, gain, rank).masked_fill(taken, float("-inf"))
        j = key.argmax(dim=-1)
        picked[:, t] = j
        d2 = gain[rows, j]
        live = (d2 > tol[:, 0]).unsqueeze(-1)
        e = (kernel[rows, j] - torch.einsum("tb,tbn->bn", factors[:t, rows, j], factors[:t]))
        e = torch.where(live, e / d2.clamp(min=torch.finfo(kernel.dtype).tiny).sqrt().unsqueeze(-1), 0.0)
        factors[t] = e
        gain = gain - e * e
        taken[rows, j] = True
    return picked


@dataclass
class CDPrunerOptions:
    """``baselines.cdpruner.*``. ``theta``: the paper's relevance/diversity trade-off: ``None``
    weights the similarity by the relevance ``r`` itself (the official code), a value in
    ``[0, 1)`` by ``exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))`` (larger: relevance
    counts more). ``negate_relevance``: use ``-cos`` as the relevance (the official LLaVA code does;
    its authors see the sign flip only with LLaVA's CLIP tokens)."""

    theta: Optional[float] = None
    negate_relevance: bool = False

    def __post_init__(self):
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise ConfigError(f"baselines.cdpruner.theta={self.theta}: need 0 <= theta < 1 (or null)")


@BASELINES.register("cdpruner")
class CDPrunerSelector(TrainingFreeSelector):
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
    Token Pruning in MLLMs", arXiv 2506.10967, Sec. 3): a conditional DPP, greedy MAP inference.

    - Similarity ``S_ij = cos(x_i, x_j)`` of the features (the tokens being pruned).
    - Relevance ``r_i`` of each token to the instruction (:func:`instruction_relevance`), from
      ``context.instruction_embedding`` against ``context.token_embedding``.
    - Conditional kernel ``L = diag(r) S diag(r)`` (``theta`` set: ``diag(exp(alpha r))``), and the
      ``k`` tokens of :func:`greedy_map_dpp` on it; past the kernel's rank, the most relevant rest.

    Query-aware (``uses_instruction``): without an instruction embedding ``select`` raises
    :class:`~tokensel.selectors.inference.ContextError`. The relevance is normalised per row (the
    official code normalises over the whole batch), so a row selects the same alone or in a batch.
    """

    name = "cdpruner"
    uses_instruction = True
    Options = CDPrunerOptions

    def __init__(self, options: Optional[CDPrunerOptions] = None):
        super().__init__()
        self.options = options or CDPrunerOptions()

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(options)

    def positions(self, features, k, context):
        x = features.to(torch.promote_types(features.dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):  # the greedy's gains need float32 at least
            r = instruction_relevance(x, context, self.options.negate_relevance).to(x.dtype)
            if self.options.theta is not None:
                r = torch.exp(self.options.theta / (2 * (1 - self.options.theta)) * r)
            unit = F.normalize(x, dim=-1)
            kernel = r.unsqueeze(2) * (unit @ unit.transpose(1, 2)) * r.unsqueeze(1)
            return greedy_map_dpp(kernel, k, fallback=r)

    def ranking(self, features, context=None):
        """The greedy MAP pick order over all N tokens (nested: the first ``k`` picks are the
        selection at ``k``); the first pick ranks highest."""
        return rank_from_order(self.positions(features, features.shape[1], context))

    def extra_repr(self) -> str:
        theta = "None" if self.options.theta is None else f"{self.options.theta:.3g}"
        return f"name='cdpruner', theta={theta}, negate_relevance={self.options.negate_relevance}"

