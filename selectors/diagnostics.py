"""Why a selector wins or loses: per-sample diagnostics beyond the outcome metrics of
``selectors/metrics.py``. Used by ``make eval`` and by the learning-curve callback
(``callbacks/learning_curve.py``), so a table and a training curve measure the same thing.

- :func:`evidence_auroc`: per image, the AUROC of a selector's token ranking
  (:meth:`~tokensel.selectors.inference.SelectorNet.ranking`) for "this token lies in the answer
  box". Threshold-free: 0.5 is chance, 1 puts every evidence token first, and below 0.5 the
  ranking points *away* from the evidence. Ties count one half (the Mann-Whitney U statistic).
- :func:`rank_correlation`: Spearman's rho between a ranking and another per-token quantity
  (``make eval`` reports it against the tokens' feature norm);
- :func:`random_keep_masks`: ``R`` uniformly random keep sets of ``k`` tokens per sample, drawn
  from a seeded generator: the reference of every paired "vs random" difference.
- :func:`objective_losses`: an objective's own per-sample loss
  (:meth:`~tokensel.selectors.inference.SelectorNet.objective_loss`) on several keep sets at once.
- :func:`headroom`: how much a loss *can* move with the choice of tokens, from the spread of the
  loss over random subsets of the same size. A testbed whose best-of-``R`` subset is no better
  than two random draws differ by chance cannot separate selectors on that loss, whatever the
  selectors do (:func:`headroom_verdict`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from tokensel.datamodules.batch import FeatureBatch
from tokensel.selectors.inference import SelectorNet
from tokensel.selectors.metrics import evidence_rows

__all__ = ["evidence_rows", "evidence_auroc", "rank_correlation", "random_keep_masks", "objective_losses", "headroom", "headroom_verdict"]


def evidence_auroc(ranking: torch.Tensor, answer_tokens: Optional[torch.Tensor],
                   has_box: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image AUROC ``(m,)`` float64 of ``ranking`` ``(B, N)`` (higher = kept first) for the
    label ``answer_tokens`` ``(B, N)`` bool. Only images with a box and with both evidence and
    other tokens are scored (``m <= B``, batch order); ``answer_tokens=None`` gives an empty tensor."""
    if answer_tokens is None:
        return torch.empty(0, dtype=torch.float64)
    if ranking.shape != answer_tokens.shape:
        raise ValueError(f"ranking {tuple(ranking.shape)} and answer_tokens {tuple(answer_tokens.shape)} differ")
    valid = evidence_rows(answer_tokens, has_box, negatives=True)
    scores = ranking.detach().double().cpu()
    labels = answer_tokens.long().cpu()
    out = [binary_auroc(scores[i], labels[i]) for i in valid.nonzero().flatten().tolist()]
    return torch.stack(out).double() if out else torch.empty(0, dtype=torch.float64)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row ``(B,)`` float64, Spearman's rank correlation of ``a`` and ``b`` ``(B, N)`` (ties get
    their mean rank; NaN for a row that is constant in either). With ``b`` the tokens' feature norm
    it says how much a ranking follows token norm (DINOv2's high-norm tokens, "Vision Transformers
    Need Registers", arXiv 2309.16588, Sec. 2)."""
    from scipy.stats import rankdata

    ra = torch.from_numpy(rankdata(a.detach().double().cpu().numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.detach().double().cpu().numpy(), axis=1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


def random_keep_masks(batch_size: int, num_tokens: int, k: int, draws: int, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(draws, B, N)`` bool: ``draws`` independent uniformly random sets of ``k`` tokens per sample.
    The noise comes from ``generator`` (on the CPU), so a seed gives the same sets on any device."""
    noise = torch.rand(draws, batch_size, num_tokens, generator=generator)
    indices = noise.topk(k, dim=-1).indices
    masks = torch.zeros(draws, batch_size, num_tokens, dtype=torch.bool)
    masks.scatter_(2, indices, True)
    return masks.to(device)


@torch.no_grad()
def objective_losses(net: SelectorNet, batch: FeatureBatch, masks: torch.Tensor,
                     vlm: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """``(R, B)`` float64: ``net``'s own objective loss with each of the ``R`` keep sets ``masks``
    ``(R, B, N)``; None when ``net`` has no objective (or it needs a VLM and none is given)."""
    rows = []
    for mask in masks:
        loss = net.objective_loss(batch, mask, vlm=vlm)
        if loss is None:
            return None
        rows.append(loss.detach().double().cpu())
    return torch.stack(rows)


def headroom(losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """From one loss on ``R >= 2`` random keep sets per sample, ``(R, B)``, per sample ``(B,)``:

    - ``spread``: the standard deviation of the loss over the ``R`` sets;
    - ``best_gain``: their mean minus the best (lowest) of them: what an oracle that may try ``R``
      random sets per image gains over a random one;
    - ``draw_difference``: the first set's loss minus the second's, whose CI over samples is the
      noise floor of any paired "vs random" difference on this testbed.

    A sample with a non-finite loss in any set is NaN in every output."""
    if losses.dim() != 2 or losses.shape[0] < 2:
        raise ValueError(f"headroom needs (R >= 2, B) losses, got shape {tuple(losses.shape)}")
    x = losses.double()
    x = x.masked_fill(~torch.isfinite(x).all(dim=0), float("nan"))
    return {"spread": x.std(dim=0), "best_gain": x.mean(dim=0) - x.min(dim=0).values,
            "draw_difference": x[0] - x[1]}


def headroom_verdict(best_gain: float, noise_floor: float) -> str:
    """``separable`` when the mean best-of-R gain exceeds the noise floor (the 95 % CI half-width
    of the difference between two random draws), else ``within noise``: no selector can then be
    told from random on this loss with this many samples."""
    if best_gain != best_gain or noise_floor != noise_floor:  # nan: nothing scored
        return "n/a"
    return "separable" if best_gain > noise_floor else "within noise"
