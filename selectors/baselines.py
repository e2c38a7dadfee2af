"""Training-free token selectors: the baselines every trained selector is compared with.

They are :class:`~tokensel.selectors.inference.SelectorNet` s with no weights and answer the same
call as a trained selector::

    indices, kept = selector.select(features, budget, context=SelectionContext(cls_attention=...))

========================  ===============================================================================
name                      rule
========================  ===============================================================================
``random``                k uniform random tokens, from the selector's own seeded generator
``uniform``               a spatially even 2-D sub-grid of the (h, w) token grid (rule in :class:`UniformSelector`)
``l2norm``                the k tokens with the largest feature L2 norm (PACT's ``prune_with_norm``)
``divprune``              greedy max-min diversity on cosine distance (DivPrune, Alvar et al., CVPR 2025)
``cls_attention``         top-k by the frozen encoder's CLS->patch attention (EViT, Liang et al., ICLR 2022;
                          VisionZip's dominant tokens, Yang et al., CVPR 2025; FasterVLM). Needs
                          ``data.cls_attention_layer`` so that ``FeatureBatch.cls_attention`` is filled.
``dart``                  pivot tokens, then the tokens least duplicated with them (DART, arXiv 2502.11494)
``pool``                  average pooling to the largest cell grid with at most k cells (merging;
                          ``baselines_merging.py``)
``visionzip``             dominant tokens by CLS attention plus contextual tokens merged by similarity
                          (VisionZip, arXiv 2412.04467, Sec. 3; merging; ``baselines_merging.py``)
``cdpruner``              conditional DPP over similarity weighted by instruction relevance, greedy MAP
                          (CDPruner, arXiv 2506.10967; query-aware; ``baselines_query.py``)
========================  ===============================================================================

Build one by name with :func:`build_baseline`; ``BASELINES`` is their registry (complete once
``selectors/catalog.py`` is imported). A rule with choices the papers leave open has an
``Options`` dataclass: its config keys, ``baselines.<name>.<key>=value`` on the ``make eval``
command line. The rules are re-derived from the papers' formulas; no code was copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tokensel.common.errors import ConfigError
from tokensel.common.registry import Registry
from tokensel.selectors.inference import SelectorNet

BASELINES: Registry[type] = Registry("baseline")


class TrainingFreeSelector(SelectorNet):
    """Base of the training-free selectors: no weights, nothing to train. A subclass is built
    from the token grid, a seed and its options (:meth:`build`); most need none of them."""

    name: str = ""
    Options: Optional[type] = None  # a dataclass of config keys (baselines.<name>.<key>), or None

    @classmethod
    def build(cls, grid: tuple[int, int], seed: int, options: Any = None) -> "TrainingFreeSelector":
        return cls()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


@BASELINES.register("random")
class RandomSelector(TrainingFreeSelector):
    """``k`` tokens uniformly at random, without replacement, per sample.

    Draws come from a private ``torch.Generator`` seeded with ``seed`` (on the CPU, then moved to
    the features' device), so the same seed and the same sequence of calls give the same indices
    on any device, whatever the global RNG does. :meth:`reset` restarts the sequence.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator()
        self.reset()

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def scores(self, features, context=None):
        B, N, _ = features.shape
        return torch.rand(B, N, generator=self.generator).to(features.device)

    def extra_repr(self) -> str:
        return f"name='random', seed={self.seed}"


def subgrid_shape(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols <= k``: about ``sqrt(k h / w) x sqrt(k w / h)``, the
    grid's aspect ratio (step 1 of :class:`UniformSelector`; the cell grid of ``pool``)."""
    h, w = grid
    if not 1 <= k <= h * w:
        raise ValueError(f"k={k}: need 1 <= k <= {h * w} for grid {grid}")
    rows = max(1, min(h, k, math.floor(math.sqrt(k * h / w))))
    cols = max(1, min(w, k // rows))
    return max(1, min(h, k // cols)), cols


def band_centres(m: int, size: int) -> list[int]:
    """The centres ``floor((i + 0.5) size / m)`` of ``m`` equal bands of ``[0, size)``."""
    return [math.floor((i + 0.5) * size / m) for i in range(m)]


def uniform_grid_positions(grid: tuple[int, int], k: int) -> list[int]:
    """``k`` raster positions spread evenly over an ``(h, w)`` grid (see :class:`UniformSelector`)."""
    h, w = grid
    n = h * w
    # 1. The largest sub-grid of about sqrt(k h / w) rows x sqrt(k w / h) cols with rows * cols <= k.
    rows, cols = subgrid_shape(grid, k)
    chosen = [r * w + c for r in band_centres(rows, h) for c in band_centres(cols, w)]
    # 2. Fill up to k with an even stride over the remaining tokens (raster order).
    need = k - len(chosen)
    if need:
        taken = set(chosen)
        rest = [p for p in range(n) if p not in taken]
        chosen += [rest[math.floor((j + 0.5) * len(rest) / need)] for j in range(need)]
    return sorted(chosen)


@BASELINES.register("uniform")
class UniformSelector(TrainingFreeSelector):
    """A spatially even grid of ``k`` tokens over the ``(h, w)`` token grid (raster order).

    Rule (deterministic, the same for every sample):

    1. ``rows = floor(sqrt(k·h/w))`` clipped to ``[1, min(h, k)]``, ``cols = min(w, k // rows)``,
       then ``rows = min(h, k // cols)``: the sub-grid with about the grid's aspect ratio and
       ``rows·cols <= k``. Its coordinates are the centres of equal bands,
       ``floor((i + 0.5)·h / rows)`` and ``floor((j + 0.5)·w / cols)``.
    2. The remaining ``k − rows·cols`` tokens are taken from the tokens not yet chosen, in raster
       order, at an even stride: element ``floor((j + 0.5)·R / m)`` of those ``R`` tokens for
       ``j < m = k − rows·cols``.

    So ``k = N`` keeps every token, ``k = 1`` keeps the centre token, and ``k = 4`` on a 4x4 grid
    keeps one token per 2x2 quadrant. Always exactly ``k`` distinct positions.
    """

    name = "uniform"

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid = positive_grid(grid)
        self._cache: dict[int, torch.Tensor] = {}

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(grid)

    def for_grid(self, grid: tuple[int, int]) -> "UniformSelector":
        return self if tuple(grid) == self.grid else UniformSelector(grid)

    def positions(self, features, k, context):
        B, N, _ = features.shape
        if N != self.grid[0] * self.grid[1]:
            raise ValueError(f"uniform selector built for grid {self.grid} ({self.grid[0] * self.grid[1]} tokens), "
                             f"got {N} tokens")
        if k not in self._cache:
            self._cache[k] = torch.tensor(uniform_grid_positions(self.grid, k), dtype=torch.long)
        return self._cache[k].to(features.device).unsqueeze(0).expand(B, k)

    def positions_across(self, views, k, context):
        """Across anyres views: the even grid over the views stacked top to bottom, ``(V * h, w)``."""
        G, V, N, _ = views.shape
        grid = (V * self.grid[0], self.grid[1])
        return torch.tensor(uniform_grid_positions(grid, k), dtype=torch.long, device=views.device).expand(G, k)

    def extra_repr(self) -> str:
        return f"name='uniform', grid={self.grid}"


@BASELINES.register("l2norm")
class L2NormSelector(TrainingFreeSelector):
    """The ``k`` tokens with the largest feature L2 norm (PACT's ``prune_with_norm`` baseline)."""

    name = "l2norm"

    def scores(self, features, context=None):
        return features.float().norm(dim=-1)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``D = 1 − cos(x_i, x_j)``, ``(B, N, C) -> (B, N, N)``, in float32 (float64 stays float64)."""
    x = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    return 1.0 - x @ x.transpose(1, 2)


@BASELINES.register("divprune")
class DivPruneSelector(TrainingFreeSelector):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025): greedy max–min diversity on the cosine distance ``D = 1 − cos``.

    - First pick: the token whose nearest neighbour is farthest, ``argmax_i min_{j≠i} D[i, j]``.
    - Then repeatedly the token farthest from the selected set, ``argmax_i min_{s∈S} D[s, i]``.

    Batched over B. A running ``min_dist`` (B, N) is updated with one row of ``D`` per step, so
    the greedy is O(kN) after the O(N²C) distance matrix (the reference recomputes the min over
    S every step, O(k²N)). Picked tokens are set to −inf so they are never re-picked; ties go to
    the lowest index (``argmax`` returns the first maximum). Memory: the (B, N, N) matrix.
    """

    name = "divprune"

    def positions(self, features, k, context):
        B, N, _ = features.shape
        if k == N:
            return torch.arange(N, device=features.device).expand(B, N)
        return self.greedy_order(features, k)

    def ranking(self, features, context=None):
        """The greedy pick order over all N tokens: the first pick ranks highest."""
        return rank_from_order(self.greedy_order(features, features.shape[1]))

    @staticmethod
    def greedy_order(features: torch.Tensor, k: int) -> torch.Tensor:
        """``(B, k)`` the first ``k`` greedy max-min picks, in pick order."""
        B, N, _ = features.shape
        D = cosine_distance(features)
        rows = torch.arange(B, device=features.device)
        eye = torch.eye(N, dtype=torch.bool, device=features.device)
        nearest = D.masked_fill(eye, float("inf")).amin(dim=-1)  # (B, N): distance to the nearest other token
        pick = nearest.argmax(dim=-1)  # (B,)
        chosen = torch.empty(B, k, dtype=torch.long, device=features.device)
        chosen[:, 0] = pick
        min_dist = D[rows, pick].clone()  # (B, N): distance of every token to the selected set
        min_dist[rows, pick] = float("-inf")
        for t in range(1, k):
            pick = min_dist.argmax(dim=-1)
            chosen[:, t] = pick
            min_dist = torch.minimum(min_dist, D[rows, pick])  # picked ones stay -inf
            min_dist[rows, pick] = float("-inf")
        return chosen


@BASELINES.register("cls_attention")
class CLSAttentionSelector(TrainingFreeSelector):
    """Top-k by the frozen encoder's CLS->patch attention (head mean) at one block: the EViT
    rule (Liang et al., "Not All Patches are What You Need", ICLR 2022) applied once, as
    FasterVLM does, and VisionZip's dominant tokens (Yang et al., CVPR 2025) without the CLS
    token and contextual merging. Needs ``cls_attention`` (B, N), i.e. ``batch.cls_attention``
    from a datamodule with ``data.cls_attention_layer`` set (e.g. -2, VisionZip's layer), passed
    as ``context=SelectionContext(cls_attention=batch.cls_attention)``."""

    name = "cls_attention"
    needs_cls_attention = True

    def scores(self, features, context=None):
        cls_attention = context.cls_attention if context is not None else None
        if cls_attention is None:
            raise ValueError("cls_attention selector needs data.cls_attention_layer set "
                             "(no context.cls_attention was passed to select())")
        if tuple(cls_attention.shape) != tuple(features.shape[:2]):
            raise ValueError(f"cls_attention has shape {tuple(cls_attention.shape)}, "
                             f"expected (B, N) = {tuple(features.shape[:2])}")
        return cls_attention.to(features.device).float()


@dataclass
class DARTOptions:
    """``baselines.dart.*``. ``pivots``: pivot tokens per image (DART's LLaVA-1.5 setting is 4 image
    + 4 instruction pivots inside the LLM; before the LLM all 8 come from the image). ``pivot_norm``:
    the ``p`` of the L_p norm that ranks pivot candidates (DART's default: the L1 norm of the keys;
    here of the features)."""

    pivots: int = 8
    pivot_norm: int = 1

    def __post_init__(self):
        if self.pivots < 1:
            raise ConfigError(f"baselines.dart.pivots={self.pivots}: need at least 1 pivot")
        if self.pivot_norm < 1:
            raise ConfigError(f"baselines.dart.pivot_norm={self.pivot_norm}: need p >= 1")


@BASELINES.register("dart")
class DARTSelector(TrainingFreeSelector):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", arXiv 2502.11494, Sec. 3): keep tokens by least duplication.

    1. Pivots: the ``P = min(pivots, k)`` tokens with the largest L_p feature norm, in descending
       norm order (DART ranks the keys of LLM layer 2 by their L1 norm; before the LLM, the
       features stand in for the keys).
    2. The other ``k - P`` places are shared among the pivots, ``(k - P) // P`` each and one more
       for the first ``(k - P) % P`` (DART floors the share and keeps fewer than ``k``; here the
       budget is met exactly). For each pivot in turn, the candidates with the **lowest** cosine
       similarity to it (the least duplicates of it) are kept and leave the candidate pool.

    Ties go to the lowest index. Instruction pivots (DART's text pivots) need the LLM's hidden
    states and are not used here. DART has no :meth:`ranking`: the shares per pivot depend on
    ``k``, so its kept set at ``k`` is not a prefix of one order.
    """

    name = "dart"
    Options = DARTOptions

    def __init__(self, options: Optional[DARTOptions] = None):
        super().__init__()
        self.options = options or DARTOptions()

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(options)

    def positions(self, features, k, context):
        B, N, _ = features.shape
        x = features.to(torch.promote_types(features.dtype, torch.float32))
        P = min(self.options.pivots, k)
        norms = x.norm(p=self.options.pivot_norm, dim=-1)
        pivots = stable_topk(norms, P)  # (B, P), descending norm
        unit = F.normalize(x, dim=-1)
        rows = torch.arange(B, device=x.device)
        free = torch.ones(B, N, dtype=torch.bool, device=x.device)
        free[rows[:, None], pivots] = False
        chosen = [pivots]
        rest = k - P
        sims = unit @ unit[rows[:, None], pivots].transpose(1, 2)  # (B, N, P): cosine to each pivot
        for p in range(P):
            take = rest // P + (1 if p < rest % P else 0)
            if not take:
                continue
            sim = sims[..., p]
            picked = stable_topk((-sim).masked_fill(~free, float("-inf")), take)  # least similar, free only
            free[rows[:, None], picked] = False
            chosen.append(picked)
        return torch.cat(chosen, dim=1)

    def extra_repr(self) -> str:
        return f"name='dart', pivots={self.options.pivots}, pivot_norm={self.options.pivot_norm}"


def rank_from_order(order: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` ranks from a full pick order ``(B, N)``: the first pick scores N, the last 1."""
    B, N = order.shape
    rank = torch.empty(B, N, dtype=torch.float32, device=order.device)
    return rank.scatter_(1, order, torch.arange(N, 0, -1, dtype=torch.float32, device=order.device).expand(B, N))


def positive_grid(grid) -> tuple[int, int]:
    """``(h, w)`` as ints; a grid without positive sides is a ValueError naming it."""
    h, w = (int(g) for g in grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid={grid}: need positive (h, w)")
    return h, w


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` largest values per row, ties broken by the lowest index (so a
    row gives the same answer alone or in any batch)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def build_baseline(name: str, grid: tuple[int, int], seed: int = 0, options: Any = None) -> TrainingFreeSelector:
    """The training-free selector ``name`` for features on an ``(h, w)`` grid (in eval mode);
    ``options``: its ``Options`` dataclass (None: the defaults)."""
    cls = BASELINES.get(name)
    if options is not None and (cls.Options is None or not isinstance(options, cls.Options)):
        raise ConfigError(f"baselines.{name}: takes {'no options' if cls.Options is None else cls.Options.__name__}, "
                          f"got {type(options).__name__}")
    return cls.build(tuple(grid), seed, options).eval()
