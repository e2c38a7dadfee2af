"""The budget side of every selector: mask estimators, the kept proportion, regularisers.

Equation numbers refer to ``gumbel-ae-selector.md`` (Sec. 4, App. B.1).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("gumbel", "straight_through")
REGULARISERS = ("maxmin", "plain")


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


def keep_ratio(mask: torch.Tensor) -> torch.Tensor:
    """``L^pr`` (Eq. 7): the mean of the mask over tokens, averaged over the batch."""
    return mask.mean()


def budget_regulariser(l_pr: torch.Tensor, kind: str, p: float, q: float, alpha1: float, alpha2: float) -> torch.Tensor:
    """The budget term of Eq. 8.

    - ``maxmin`` (Eq. 4, 8): ``alpha1 * max(L_pr, p) - alpha2 * min(L_pr, q)``. Its gradient is
      ``alpha1`` above ``p`` (pushes the ratio down), ``-alpha2`` below ``q`` (pushes it up) and
      zero strictly inside ``(q, p)``.
    - ``plain`` (App. B.1): ``alpha1 * L_pr``, which always pushes the ratio down.
    """
    if kind == "maxmin":
        return alpha1 * torch.clamp(l_pr, min=p) - alpha2 * torch.clamp(l_pr, max=q)
    if kind == "plain":
        return alpha1 * l_pr
    raise ValueError(f"regulariser={kind!r}, expected one of {REGULARISERS}")


def replace_dropped(features: torch.Tensor, mask: torch.Tensor, masked_embedding: torch.Tensor) -> torch.Tensor:
    """``F^pr`` (Eq. 5): kept tokens as they are, dropped ones replaced by the shared ``E_masked``.

    ``M * F + (1 - M) * E``, so with a straight-through mask the gradient reaches the mask.
    """
    m = mask.unsqueeze(-1).to(features.dtype)
    return m * features + (1.0 - m) * masked_embedding.to(features.dtype)
