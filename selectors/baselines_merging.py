"""Training-free baselines that merge tokens instead of keeping a subset: ``pool`` and ``visionzip``.

Both are :class:`~tokensel.selectors.inference.SelectorNet` s with ``merges = True``: ``select``
returns anchors (distinct input positions, sorted) and the merged tokens, and ``kept_share`` says
how much of each input token the kept tokens hold (see ``SelectorNet``'s docstring). Their rule is
:meth:`merge`, which returns the anchors and the weights ``(B, k', N)`` with ``kept = weights @ features``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tokensel.common.errors import ConfigError
from tokensel.selectors.baselines import (BASELINES, TrainingFreeSelector, band_centres, positive_grid, stable_topk,
                                         subgrid_shape)
from tokensel.selectors.budget import BudgetError, resolve_budget
from tokensel.selectors.inference import ContextError


def pool_cells(grid: tuple[int, int], rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rows x cols`` cells of ``pool`` on an ``(h, w)`` grid: ``(anchors (k',), weights (k', N))``
    with ``k' = rows * cols`` (at budget ``k``: ``(rows, cols) = subgrid_shape(grid, k)``). Cell ``(i, j)`` averages
    the tokens of row band ``[floor(i h / rows), ceil((i + 1) h / rows))`` and the column band
    likewise (``torch.nn.functional.adaptive_avg_pool2d``'s bins, which overlap by one token when
    ``rows`` does not divide ``h``); its anchor is the token at the band centres
    ``floor((i + 0.5) h / rows)``, ``floor((j + 0.5) w / cols)``: the token ``uniform`` keeps there.
    """
    h, w = grid

    def bins(m: int, size: int) -> torch.Tensor:  # (m, size): 1 / band length inside band i
        out = torch.zeros(m, size, dtype=torch.float64)
        for i in range(m):
            start, end = math.floor(i * size / m), math.ceil((i + 1) * size / m)
            out[i, start:end] = 1.0 / (end - start)
        return out

    weights = torch.einsum("ay,bx->abyx", bins(rows, h), bins(cols, w)).reshape(rows * cols, h * w)
    anchors = torch.tensor([r * w + c for r in band_centres(rows, h) for c in band_centres(cols, w)])
    return anchors, weights.float()


@BASELINES.register("pool")
class PoolSelector(TrainingFreeSelector):
    """Average pooling of the ``(h, w)`` token grid to the largest cell grid with **at most** ``k``
    cells (:func:`pool_cells`), about the grid's aspect ratio: the bands whose centre tokens
    ``uniform`` keeps, averaged instead of sampled. It returns pooled tokens, not a subset, and
    ``rows * cols <= k`` of them (24 x 24 at k = 128: 11 x 11 = 121; at k = 64: 8 x 8 = 64), never
    more than the budget. Cells are raster-ordered and named by their centre token. Across anyres
    views (``select_across``) the views are pooled as one grid stacked top to bottom,
    ``(V * h, w)``. A budget above the grid's token count is a one-line :class:`BudgetError`.
    """

    name = "pool"
    merges = True

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid = positive_grid(grid)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(grid)

    @torch.no_grad()
    def select(self, features, budget, *, context=None):
        h, w = self.grid
        if isinstance(budget, int) and not isinstance(budget, bool) and features.dim() == 3 \
                and budget > features.shape[1]:
            raise BudgetError(f"pool: budget={budget} is more cells than the {h}x{w} token grid has "
                              f"({features.shape[1]} tokens)")
        if features.dim() != 3 or features.shape[1] != h * w:
            return super().select(features, budget, context=context)
        B, N, C = features.shape  # the pooled tokens straight from adaptive_avg_pool2d (= weights @ features)
        rows, cols = subgrid_shape(self.grid, resolve_budget(budget, N))
        anchors, _ = self.cells(N, rows, cols, features.device)
        kept = F.adaptive_avg_pool2d(features.transpose(1, 2).reshape(B, C, h, w), (rows, cols))
        return anchors.expand(B, -1), kept.flatten(2).transpose(1, 2)

    def grid_of(self, num_tokens: int) -> tuple[int, int]:
        """The grid of ``num_tokens`` tokens: its own, or ``V`` views of it stacked (``select_across``)."""
        h, w = self.grid
        if num_tokens % (h * w):
            raise ValueError(f"pool selector built for grid {self.grid} ({h * w} tokens), got {num_tokens} tokens")
        return (num_tokens // w, w)

    def cells(self, num_tokens: int, rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.grid_of(num_tokens)
        if (grid, rows, cols) not in self._cache:
            self._cache[(grid, rows, cols)] = pool_cells(grid, rows, cols)
        anchors, weights = self._cache[(grid, rows, cols)]
        return anchors.to(device), weights.to(device)

    def merge(self, features, k, context):
        B, N, _ = features.shape
        anchors, weights = self.cells(N, *subgrid_shape(self.grid_of(N), k), features.device)
        return anchors.expand(B, -1), weights.expand(B, -1, -1)

    def kept_share(self, features, indices, context=None):
        """Every row's cells are the same: ``1 / |cell|`` summed over the cells that cover a token;
        the cell grid is read off the anchors (their distinct rows and columns)."""
        B, N, _ = features.shape
        w = self.grid[1]
        first = indices[0].long().cpu()
        rows, cols = len(set((first // w).tolist())), len(set((first % w).tolist()))
        anchors, weights = self.cells(N, rows, cols, indices.device)
        if rows * cols != indices.shape[1] or not torch.equal(anchors.expand(B, -1), indices.long()):
            raise ValueError("pool: these indices were not returned by select() on these features")
        return weights.sum(dim=0).expand(B, -1)

    def extra_repr(self) -> str:
        return f"name='pool', grid={self.grid}"


VISIONZIP_MERGES = ("target_plus_mean", "mean")


@dataclass
class VisionZipOptions:
    """``baselines.visionzip.*``. ``contextual_ratio``: the share of the budget given to contextual
    tokens, ``c = round(k * contextual_ratio)``, the rest dominant (VisionZip's LLaVA-1.5 splits,
    54 + 10 of 64, 108 + 20 of 128 and 162 + 30 of 192, are all 10/64). ``merge``: how a contextual
    group becomes one token, ``target_plus_mean`` (the official code: the target plus the mean of
    the tokens assigned to it) or ``mean`` (the mean of the target and its tokens)."""

    contextual_ratio: float = 10 / 64
    merge: str = "target_plus_mean"

    def __post_init__(self):
        if not 0.0 <= self.contextual_ratio < 1.0:
            raise ConfigError(f"baselines.visionzip.contextual_ratio={self.contextual_ratio}: need 0 <= ratio < 1")
        if self.merge not in VISIONZIP_MERGES:
            raise ConfigError(f"baselines.visionzip.merge={self.merge!r}: choose one of {', '.join(VISIONZIP_MERGES)}")


@BASELINES.register("visionzip")
class VisionZipSelector(TrainingFreeSelector):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models", CVPR 2025, arXiv 2412.04467, Sec. 3.2): dominant plus contextual tokens.

    With ``c = round(k * contextual_ratio)`` (at most ``k - 1``) and ``d = k - c``:

    1. **Dominant:** the ``d`` tokens with the highest CLS->patch attention (``context.cls_attention``,
       VisionZip's layer -2; ``data.cls_attention_layer``), kept as they are. VisionZip also keeps
       the CLS token itself; tokensel's features have no CLS token, so all ``d`` are patches.
    2. **Contextual:** of the ``R = N - d`` remaining tokens, in raster order, every
       ``max(1, R // c)``-th is a target (the first ``c``); every other remaining token joins the
       target it is most similar to (cosine), and each group becomes one token (``merge``).
       VisionZip measures that similarity on the attention keys of the same layer; the feature
       cache holds no keys, so the features stand in for them.

    Anchors: the dominant positions and the targets. Ties go to the lowest index.
    """

    name = "visionzip"
    merges = True
    needs_cls_attention = True
    Options = VisionZipOptions

    def __init__(self, options: Optional[VisionZipOptions] = None):
        super().__init__()
        self.options = options or VisionZipOptions()

    @classmethod
    def build(cls, grid, seed, options=None):
        return cls(options)

    def split(self, k: int) -> tuple[int, int]:
        """``(dominant, contextual)`` token counts at budget ``k``."""
        contextual = min(k - 1, round(k * self.options.contextual_ratio))
        return k - contextual, contextual

    def merge(self, features, k, context):
        B, N, _ = features.shape
        attention = context.cls_attention if context is not None else None
        if attention is None:
            raise ContextError("visionzip needs the CLS attention (set data.cls_attention_layer, e.g. -2); "
                               "no context.cls_attention was passed to select()")
        if tuple(attention.shape) != (B, N):
            raise ValueError(f"cls_attention has shape {tuple(attention.shape)}, expected (B, N) = {(B, N)}")
        d, c = self.split(k)
        device = features.device
        rows = torch.arange(B, device=device)[:, None]
        dominant = stable_topk(attention.to(device).float(), d)  # (B, d)
        weights = torch.zeros(B, k, N, dtype=torch.float32, device=device)
        weights[rows, torch.arange(d, device=device), dominant] = 1.0
        anchors = dominant
        if c:
            rest = torch.ones(B, N, dtype=torch.bool, device=device)
            rest[rows, dominant] = False
            remaining = torch.sort(torch.where(rest, torch.arange(N, device=device), N), dim=-1).values[:, :N - d]
            R = N - d
            local = torch.arange(0, R, max(1, R // c), device=device)[:c]
            is_target = torch.zeros(R, dtype=torch.bool, device=device)
            is_target[local] = True
            targets, others = remaining[:, is_target], remaining[:, ~is_target]  # (B, c), (B, R - c)
            unit = F.normalize(features.float(), dim=-1)
            sim = unit[rows, others] @ unit[rows, targets].transpose(1, 2)  # (B, R - c, c)
            group = F.one_hot(sim.argmax(dim=-1), c).float().transpose(1, 2)  # (B, c, R - c)
            size = group.sum(dim=-1, keepdim=True)  # (B, c, 1)
            if self.options.merge == "mean":
                member, own = group / (size + 1), 1.0 / (size[..., 0] + 1)
            else:
                member, own = group / size.clamp(min=1), torch.ones(B, c, device=device)
            ctx = torch.zeros(B, c, N, dtype=torch.float32, device=device)
            ctx.scatter_(2, others[:, None, :].expand(-1, c, -1), member)
            ctx[rows, torch.arange(c, device=device), targets] = own
            weights[:, d:] = ctx
            anchors = torch.cat([dominant, targets], dim=1)
        order = anchors.argsort(dim=-1)
        return anchors.gather(1, order), weights[rows, order]

    def extra_repr(self) -> str:
        return f"name='visionzip', contextual_ratio={self.options.contextual_ratio:.4g}, merge={self.options.merge!r}"
