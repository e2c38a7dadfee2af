"""The budget side of every selector: what a budget is, mask estimators, the kept proportion,
regularisers, the soft top-K and the VP noise gate.

- Budgets (the one place they are parsed and checked): :func:`check_budget`, :func:`parse_budgets`,
  :func:`resolve_budget`.
- Gumbel-softmax auto-encoder: *Adaptive Vision Token Selection for Multi-Modal Inference*
  (arXiv 2503.16660), Sec. 4 and App. B.1; equation numbers below are that paper's.
- Soft top-K and VP gate: AutoSelect, *The Model Knows Which Tokens Matter: Automatic Token
  Selection via Noise Gating* (arXiv 2603.07135), with the method details of DiffPrune (*Beyond
  Surrogate Gradients: Fully Differentiable Token Pruning for Vision-Language Models*, arXiv
  2605.28051, Sec. 4); the soft top-K in LapSum's closed form (arXiv 2503.06242).
"""

from __future__ import annotations

import math

import torch

from tokensel.common.errors import TokenselError

ESTIMATORS = ("gumbel", "straight_through")
REGULARISERS = ("maxmin", "plain")
KEEP_RATIO_REDUCTIONS = ("batch", "image")
Budget = int | float  # a token count K (int >= 1) or a keep ratio (float in (0, 1])


class BudgetError(TokenselError):
    """A budget that cannot be met (0, negative, a ratio above 1, or more tokens than there are)."""


def check_budget(value, where: str = "budget", text: str | None = None) -> Budget:
    """``value`` if it is a token count (int >= 1) or a keep ratio (float in (0, 1]); else a
    :class:`BudgetError` naming ``where`` and the value as the user wrote it (``text``)."""
    shown = repr(text if text is not None else value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{where}: {shown} is neither a keep ratio in (0, 1] nor a token count")
    if isinstance(value, float) and value > 1:
        raise BudgetError(f"{where}: {shown} is a ratio above 1; write token counts as integers")
    if value <= 0:
        raise BudgetError(f"{where}: {shown} must be positive")
    return value


def parse_budgets(text: str, where: str = "BUDGETS") -> list[Budget]:
    """``"0.1,0.25,64"`` -> ``[0.1, 0.25, 64]``: integers are counts, decimals are ratios."""
    budgets: list[Budget] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            value = int(item) if item.lstrip("-").isdigit() else float(item)
        except ValueError:
            raise BudgetError(f"{where}: {item!r} is neither a keep ratio nor a token count") from None
        budgets.append(check_budget(value, where, item))
    return budgets


def resolve_budget(budget: Budget, num_tokens: int) -> int:
    """Tokens to keep: an ``int`` is a count in ``[1, N]``; a ``float`` is a ratio in ``(0, 1]``
    and rounds to the nearest count (at least 1)."""
    check_budget(budget, f"budget={budget!r}")
    if isinstance(budget, int):
        if budget > num_tokens:
            raise BudgetError(f"budget={budget}: need 1 <= k <= N={num_tokens}")
        return budget
    return max(1, min(num_tokens, round(budget * num_tokens)))


def binary_keep_mask(logits: torch.Tensor, estimator: str, tau: float = 1.0, noise: bool = True) -> torch.Tensor:
    """A hard 0/1 keep mask ``(B, N)`` whose gradient flows through a softmax relaxation.

    ``logits`` is ``(B, N, 2)`` (drop, keep). Both estimators return
    ``y_hard - y_soft.detach() + y_soft`` (App. B.1); they differ only in ``y_soft``:

    - ``gumbel`` (Sec. 4.1.1): ``softmax((logits + g) / tau)`` with Gumbel noise ``g``, i.e. a
      Gumbel-softmax sample. ``noise=False`` (validation) drops ``g``.
    - ``straight_through``: ``softmax(logits / tau)``, never any noise.

    The paper does not give ``tau``; 1.0 is the default (``selector.tau``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}, expected one of {ESTIMATORS}")
    z = logits.float()
    if estimator == "gumbel" and noise:
        uniform = torch.rand_like(z).clamp_(1e-10, 1.0 - 1e-7)
        z = z - torch.log(-torch.log(uniform))
    y_soft = torch.softmax(z / tau, dim=-1)
    y_hard = torch.nn.functional.one_hot(y_soft.argmax(dim=-1), 2).to(y_soft.dtype)
    y = y_hard - y_soft.detach() + y_soft
    return y[..., 1]


def keep_ratio(mask: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """``L^pr`` (Eq. 7): the mean of the mask over tokens; averaged over the batch (a scalar), or
    one value per image ``(B,)`` with ``per_image=True``."""
    return mask.float().mean(dim=1) if per_image else mask.mean()


def budget_regulariser(l_pr: torch.Tensor, kind: str, p: float, q: float, alpha1: float, alpha2: float) -> torch.Tensor:
    """The budget term of Eq. 8.

    - ``maxmin`` (Eq. 4, 8): ``alpha1 * max(L_pr, p) - alpha2 * min(L_pr, q)``. Its gradient is
      ``alpha1`` above ``p`` (pushes the ratio down), ``-alpha2`` below ``q`` (pushes it up) and
      zero strictly inside ``(q, p)``.
    - ``plain`` (App. B.1): ``alpha1 * L_pr``, which always pushes the ratio down.

    ``l_pr`` may be one ratio per image ``(B,)``: the term is then taken per image and averaged.
    """
    if kind == "maxmin":
        return (alpha1 * torch.clamp(l_pr, min=p) - alpha2 * torch.clamp(l_pr, max=q)).mean()
    if kind == "plain":
        return (alpha1 * l_pr).mean()
    raise ValueError(f"regulariser={kind!r}, expected one of {REGULARISERS}")


def replace_dropped(features: torch.Tensor, mask: torch.Tensor, masked_embedding: torch.Tensor) -> torch.Tensor:
    """``F^pr`` (Eq. 5): kept tokens as they are, dropped ones replaced by the shared ``E_masked``.

    ``M * F + (1 - M) * E``, so with a straight-through mask the gradient reaches the mask.
    """
    m = mask.unsqueeze(-1).to(features.dtype)
    return m * features + (1.0 - m) * masked_embedding.to(features.dtype)


def _laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard Laplace CDF ``F`` (LapSum, arXiv 2503.06242), piecewise so ``exp`` never overflows."""
    half_tail = 0.5 * torch.exp(-x.abs())
    return torch.where(x <= 0, half_tail, 1.0 - half_tail)


def _lapsum_shift(zs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The shift ``b`` (B,) with ``sum_i F(z_i - b) = k`` per row, in closed form (LapSum).

    ``zs`` is ``(B, N)`` sorted ascending along rows. With ``m`` entries at or below ``b``,
    ``S(b) = (N - m) + ½ e^{-b} A_m - ½ e^{b} C_m`` where ``A_m = sum_{i<=m} e^{z_i}`` and
    ``C_m = sum_{i>m} e^{-z_i}``: a quadratic in ``e^{-b}``. ``m`` is read off ``S`` at the sorted
    breakpoints; everything stays in log space (``log A_m + log C_m <= 2 log N``), so no overflow.
    """
    n = zs.shape[-1]
    ninf = zs.new_full((zs.shape[0], 1), float("-inf"))
    log_a = torch.cat([ninf, torch.logcumsumexp(zs, dim=-1)], dim=-1)  # m = 0..N
    log_c = torch.cat([torch.logcumsumexp(-zs.flip(-1), dim=-1).flip(-1), ninf], dim=-1)
    j = torch.arange(1, n + 1, device=zs.device, dtype=zs.dtype)
    s_at = (n - j) + 0.5 * torch.exp(log_a[:, 1:] - zs) - 0.5 * torch.exp(log_c[:, 1:] + zs)  # S(z_(j))
    m = (s_at >= k.unsqueeze(-1)).sum(dim=-1, keepdim=True)
    la, lc = log_a.gather(-1, m).squeeze(-1), log_c.gather(-1, m).squeeze(-1)
    r = k - (n - m.squeeze(-1))
    log_r = r.abs().log()
    h = torch.logaddexp(log_r, 0.5 * torch.logaddexp(2.0 * log_r, la + lc))  # log(|r| + sqrt(r² + A C))
    return torch.where(r >= 0, la - h, h - lc)


class _SoftTopK(torch.autograd.Function):
    """LapSum forward in float64; the implicit-function VJP as backward (no autograd through the solver)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
        z = scores.double() / tau
        zs = z.sort(dim=-1).values
        # Centre each row on its (N - k)-th value, next to b, so that z - b keeps its precision at large |z|.
        pivot = zs.gather(-1, (z.shape[-1] - k.ceil().long()).unsqueeze(-1))
        x = (z - pivot) - _lapsum_shift(zs - pivot, k).unsqueeze(-1)
        ctx.save_for_backward(0.5 * torch.exp(-x.abs()))  # f_i = f(z_i - b)
        ctx.tau, ctx.dtype = tau, scores.dtype
        return _laplace_cdf(x).to(torch.promote_types(scores.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (f,) = ctx.saved_tensors
        g = grad.double()
        total = f.sum(-1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)  # all-zero f: zero gradient
        grad_z = f * (g - (f * g).sum(-1, keepdim=True) / total)
        return (grad_z / ctx.tau).to(ctx.dtype), None, None


def soft_topk(scores: torch.Tensor, k: int | torch.Tensor, tau: float) -> torch.Tensor:
    """Budgeted soft top-K ``alpha = Phi_K(scores / tau)`` (DiffPrune Sec. 4.2, Eq. 4, in LapSum form).

    ``alpha_i = F(z_i - b)``, ``z = scores / tau``, ``F`` the standard Laplace CDF and ``b`` the per-row
    shift with ``sum(alpha) = k``. ``scores`` is ``(B, N)``, finite; ``k`` an int or a ``(B,)`` tensor,
    ``0 < k < N``. Solved in float64; returned in float32 (float64 for float64 scores). The backward is
    the exact implicit-function VJP ``f * (g - sum(f g) / sum(f)) / tau``, ``f_i = ½ exp(-|z_i - b|)``.
    """
    if scores.dim() != 2:
        raise ValueError(f"soft_topk expects scores of shape (B, N), got {tuple(scores.shape)}")
    if not tau > 0:
        raise ValueError(f"soft_topk needs tau > 0, got tau={tau}")
    b, n = scores.shape
    if isinstance(k, torch.Tensor):
        k_rows = k.to(device=scores.device, dtype=torch.float64).expand(b)
        if not bool(((k_rows > 0) & (k_rows < n)).all()):
            raise ValueError(f"soft_topk needs 0 < k < N for every row, got k={k.tolist()} and N={n}")
    else:
        if not 0 < k < n:
            raise ValueError(f"soft_topk needs 0 < k < N, got k={k} and N={n}")
        k_rows = torch.full((b,), float(k), dtype=torch.float64, device=scores.device)
    return _SoftTopK.apply(scores, k_rows, float(tau))


def cosine_tau(step: int, start: float = 2.0, end: float = 0.1, steps: int = 2000) -> float:
    """Cosine-annealed temperature, held at ``end`` after ``steps`` (DiffPrune Sec. 4.2 and App. A:
    2.0 -> 0.1 over 2000 steps)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def vp_noise_gate(x: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor | None = None,
                  min_alpha: float = 1e-6) -> torch.Tensor:
    """VP noise gate (DiffPrune Sec. 4.3, Eq. 5; AutoSelect): ``sqrt(alpha) x + sqrt(1 - alpha) eps``.

    ``x`` is ``(B, N, C)``, ``alpha`` ``(B, N)`` (broadcast over channels); ``eps ~ N(0, I)`` is drawn
    fresh unless ``noise`` is given. ``alpha`` and ``1 - alpha`` are clamped to ``[min_alpha, 1]``
    inside the square roots so the gradient stays finite at 0 and 1. Computed in fp32 (or better),
    returned in ``x``'s dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    a = alpha.to(dtype).unsqueeze(-1)
    eps = torch.randn(x.shape, device=x.device, dtype=dtype) if noise is None else noise.to(dtype)
    out = a.clamp(min_alpha, 1.0).sqrt() * x.to(dtype) + (1.0 - a).clamp(min_alpha, 1.0).sqrt() * eps
    return out.to(x.dtype)


def alpha_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Sharpness of ``alpha``: mean binary entropy ``-a log a - (1 - a) log(1 - a)`` in nats; 0 for a hard mask."""
    a = alpha.float().clamp(0.0, 1.0)
    return -(torch.special.xlogy(a, a) + torch.special.xlogy(1.0 - a, 1.0 - a)).mean()
