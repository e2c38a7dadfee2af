"""Per-sample evaluation metrics for token selectors: pure torch functions, no Lightning.

Used by ``make eval`` (``experiments/evaluate.py``) and the learning-curve callback. Each metric returns a 1-D float64 tensor with
one value per (counted) sample, so the caller can accumulate them over batches and report
confidence intervals (``common/stats.py``): :func:`evidence_recall`, :func:`token_coverage`,
:func:`psnr`; plus the helper :func:`keep_mask` (top-K indices -> boolean keep mask).

Recall and coverage take what a selector kept either as a boolean keep mask (a subset) or as each
token's kept share in [0, 1] (``SelectorNet.kept_share``), which also covers merging selectors such
as ``pool``: a token averaged into a cell of ``s`` tokens counts as ``1/s`` kept. With a 0/1 share
both metrics are exactly their subset definitions.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

__all__ = ["keep_mask", "evidence_rows", "evidence_recall", "token_coverage", "psnr"]

# torchmetrics turns ``base`` into a tensor with torch.tensor(base): a NumPy float64 keeps the dB
# factor 10 / ln(base) in float64 (a Python float would make it float32 and cost ~2e-6 dB at 40 dB).
# It takes log(data_range) in float32, which moves a result by < 1e-6 dB when max_value != 1.
_DECIBEL_BASE = np.float64(10.0)


def keep_mask(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean keep mask ``(B, N)`` from kept token indices ``(B, k)`` (any order, ``k`` may be 0).

    Duplicate indices are harmless. Raises ``ValueError`` for indices outside ``[0, num_tokens)``.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be (B, k), got shape {tuple(indices.shape)}")
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_tokens):
        raise ValueError(f"indices must lie in [0, {num_tokens}), got [{int(indices.min())}, {int(indices.max())}]")
    mask = torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device)
    if indices.numel():
        mask.scatter_(1, indices, True)
    return mask


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`keep_mask`: the kept positions ``(B, k)`` of a ``(B, N)`` bool mask, in
    positional order. Every row must keep the same ``k`` (raises ``ValueError`` otherwise)."""
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"keep sets of one size per batch only, got sizes {sorted(set(counts.tolist()))}")
    return mask.nonzero()[:, 1].view(mask.shape[0], int(counts[0]))  # row-major: in positional order


def evidence_rows(answer_tokens: torch.Tensor, has_box: Optional[torch.Tensor] = None,
                  negatives: bool = False) -> torch.Tensor:
    """``(B,)`` bool: the samples an evidence metric scores: with a box (``has_box``; None means
    "wherever a row has an answer token") and at least one answer token; with ``negatives``, also
    at least one token outside the box (a ranking metric needs both)."""
    answer = answer_tokens.bool()
    n_answer = answer.sum(dim=1)
    valid = n_answer > 0
    if negatives:
        valid = valid & (n_answer < answer.shape[1])
    if has_box is not None:
        valid = valid & has_box.bool().to(valid.device)
    return valid


def evidence_recall(
    keep: torch.Tensor, answer_tokens: Optional[torch.Tensor], has_box: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Fraction of each sample's answer-box tokens that the selector kept.

    ``keep``: ``(B, N)`` bool, or the float kept share of each token (``SelectorNet.kept_share``):
    the box then counts as kept in proportion to the kept tokens spent on it, ``sum_box share /
    |box|`` (a merging selector whose cells cover a 9-token box with 9-token cells scores 1/9 per
    token); ``answer_tokens``: ``(B, N)`` bool (``FeatureBatch.answer_tokens``);
    ``has_box``: ``(B,)`` bool (``FeatureBatch.has_answer_box``; ``None`` means "a box wherever a
    row has an answer token").

    Only samples with a box *and* at least one answer token are scored; the others are
    **excluded** (not counted as 0), so the result has ``m <= B`` entries, in batch order, float64.
    ``answer_tokens=None`` (a batch in which no sample has a box) gives an empty tensor.
    """
    if answer_tokens is None:
        return torch.empty(0, dtype=torch.float64, device=keep.device)
    if keep.shape != answer_tokens.shape:
        raise ValueError(f"keep {tuple(keep.shape)} and answer_tokens {tuple(answer_tokens.shape)} differ")
    answer = answer_tokens.bool()
    n_answer = answer.sum(dim=1)
    valid = evidence_rows(answer, has_box)
    hit = (keep.double().clamp(0.0, 1.0) * answer.double()).sum(dim=1)
    return (hit[valid] / n_answer[valid].double())


def token_coverage(features: torch.Tensor, keep: torch.Tensor, chunk: int = 8,
                   kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How well the kept tokens cover the dropped ones, per sample ``(B,)`` float64.

    For every dropped token, the maximum cosine similarity to any kept token (of the same sample);
    the coverage is the mean of that over the dropped tokens. It is ``1.0`` when nothing is dropped
    and ``nan`` when nothing is kept (no token can cover; not reachable with a budget ``k >= 1``).
    Batched: kept columns are selected by masking the others with ``-inf``; the ``(b, N, N)``
    similarity is built ``chunk`` samples at a time to bound memory (2880 tokens: 33 MB/sample).
    Zero feature vectors have cosine 0 to everything.

    A merging selector: ``keep`` is each token's kept share (float, ``SelectorNet.kept_share``) and
    ``kept`` ``(B, k, C)`` the tokens it returned. Token ``i`` is then dropped to the extent
    ``1 - share_i`` and covered by its best cosine to a returned token; the coverage is the
    ``(1 - share)``-weighted mean of that (1.0 when every share is 1).
    """
    if features.dim() != 3 or keep.shape != features.shape[:2]:
        raise ValueError(f"features must be (B, N, C) and keep (B, N); got {tuple(features.shape)}, {tuple(keep.shape)}")
    if kept is not None:
        return _merged_coverage(features, keep, kept, chunk)
    keep = keep.bool()
    out = []
    for start in range(0, features.shape[0], max(1, chunk)):
        f = F.normalize(features[start:start + chunk].float(), dim=-1)
        k = keep[start:start + chunk]
        sim = f @ f.transpose(1, 2)  # (b, N, N): row = token, column = candidate coverer
        sim = sim.masked_fill(~k[:, None, :], float("-inf"))
        best = sim.max(dim=2).values.double()  # (b, N): -inf where nothing is kept
        dropped = ~k
        n_dropped = dropped.sum(dim=1)
        total = torch.where(dropped, best, torch.zeros_like(best)).sum(dim=1)
        cov = total / n_dropped.clamp(min=1).double()
        cov = torch.where(n_dropped == 0, torch.ones_like(cov), cov)
        cov = torch.where(k.any(dim=1), cov, torch.full_like(cov, float("nan")))
        out.append(cov)
    if not out:
        return torch.empty(0, dtype=torch.float64, device=features.device)
    return torch.cat(out)


def _merged_coverage(features: torch.Tensor, share: torch.Tensor, kept: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for start in range(0, features.shape[0], max(1, chunk)):
        f = F.normalize(features[start:start + chunk].float(), dim=-1)
        y = F.normalize(kept[start:start + chunk].float(), dim=-1)
        best = (f @ y.transpose(1, 2)).max(dim=2).values.double()  # (b, N): best returned token per token
        dropped = (1.0 - share[start:start + chunk].double()).clamp(min=0.0)
        mass = dropped.sum(dim=1)
        cov = (dropped * best).sum(dim=1) / mass.clamp(min=1e-12)
        out.append(torch.where(mass <= 1e-9, torch.ones_like(cov), cov))
    if not out:
        return torch.empty(0, dtype=torch.float64, device=features.device)
    return torch.cat(out)


def psnr(pred: torch.Tensor, target: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB, ``(B,)`` float64 (torchmetrics'
    ``peak_signal_noise_ratio`` with ``data_range=max_value``, one value per sample).

    ``10 * log10(max_value**2 / MSE)`` with the MSE over all channels and pixels of a sample;
    images in ``[0, max_value]`` (``FeatureBatch.image`` is in ``[0, 1]``). Predictions are not
    clamped. **Identical images give ``+inf``** (no cap): a mean over samples that contains one is
    ``+inf`` and its CI half-width ``nan``, which makes a degenerate reconstruction visible instead
    of hiding it behind an arbitrary cap. Cap it yourself (``psnr(...).clamp(max=...)``) if needed.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return peak_signal_noise_ratio(pred.double().flatten(1), target.double().flatten(1), data_range=float(max_value),
                                   base=_DECIBEL_BASE, reduction="none", dim=1)
