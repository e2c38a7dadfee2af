"""Summaries of repeated measurements: over samples (``make eval``) and over seeds (sweeps).

- :func:`mean_ci`: mean and Student-t confidence half-width of per-sample values, and
  :class:`MetricAccumulator`, which collects them over batches;
- :func:`paired_ci`: the same for the per-sample difference of two measurements of the same
  samples (a paired t interval), which removes the samples' own spread;
- :func:`mean_std` and :func:`aggregate`: mean and sample standard deviation over seeds, per
  grid point (``make sweep``, ``make collapse``).

A *metric triple* is ``(mean, spread, n)``: the spread is the CI half-width (:func:`mean_ci`) or the
sample std (:func:`mean_std`); ``n == 0`` means "nothing could be scored" (e.g. evidence recall on
a corpus without answer boxes) and is reported as ``n/a``, never as 0 (``experiments/report.py``).
"""

from __future__ import annotations

import json
import math
from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["MetricTriple", "t_quantile", "mean_ci", "paired_ci", "MetricAccumulator", "mean_std", "aggregate"]

MetricTriple = tuple[float, float, int]


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution, ``scipy.stats.t.ppf(p, df)``; e.g.
    ``t_quantile(0.975, 4) = 2.7764``. Raises ``ValueError`` for ``p`` outside (0, 1) or ``df <= 0``."""
    from scipy import stats

    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    return float(stats.t.ppf(p, df))


def _as_float_array(values: Union[Sequence[float], torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def mean_ci(values: Union[Sequence[float], torch.Tensor, np.ndarray], confidence: float = 0.95) -> MetricTriple:
    """``(mean, half_width, n)``: sample mean and the half-width of its two-sided Student-t CI.

    ``half_width = t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof=1``) and the t quantile from :func:`t_quantile`.
    ``n == 0`` gives ``(nan, nan, 0)``; ``n == 1`` gives ``(value, nan, 1)`` (no spread to
    estimate). Non-finite values are not dropped: they propagate (an ``inf`` PSNR makes the mean
    ``inf`` and the half-width ``nan``).
    """
    x = _as_float_array(values)
    n = int(x.size)
    if n == 0:
        return (math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return (mean, math.nan, 1)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return (mean, float(half), n)


def paired_ci(a: Union[Sequence[float], torch.Tensor, np.ndarray], b: Union[Sequence[float], torch.Tensor, np.ndarray],
              confidence: float = 0.95) -> MetricTriple:
    """:func:`mean_ci` of ``a - b`` over the samples where both are finite: the paired Student-t
    interval of the mean difference. ``a`` and ``b`` are per-sample values of the same samples."""
    x, y = _as_float_array(a), _as_float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.size} and {y.size}")
    finite = np.isfinite(x) & np.isfinite(y)
    return mean_ci(x[finite] - y[finite], confidence)


class MetricAccumulator:
    """Collects per-sample metric values over batches and summarises them with :func:`mean_ci`.

    ``add(name, values)`` accepts a tensor (any shape, flattened), an array, a list or a float;
    adding an empty tensor registers the name, so :meth:`summary` reports it with ``n = 0``
    (printed as ``n/a``) instead of leaving it out. Names keep the order of their first ``add``.
    """

    def __init__(self, confidence: float = 0.95):
        self.confidence = confidence
        self._values: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, values: Union[torch.Tensor, np.ndarray, Sequence[float], float]) -> None:
        if isinstance(values, (int, float)):
            values = [float(values)]
        self._values.setdefault(name, []).append(_as_float_array(values))

    def names(self) -> list[str]:
        return list(self._values)

    def values(self, name: str) -> np.ndarray:
        """All values added under ``name`` (float64, empty if none)."""
        parts = self._values.get(name, [])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)

    def count(self, name: str) -> int:
        return int(sum(p.size for p in self._values.get(name, [])))

    def summary(self) -> dict[str, MetricTriple]:
        return {name: mean_ci(self.values(name), self.confidence) for name in self._values}

    def reset(self) -> None:
        self._values.clear()


def mean_std(values: list[float]) -> MetricTriple:
    """``(mean, sample std, n)`` of the finite values; std is nan for n = 1, both nan for n = 0."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def aggregate(rows: list[dict], group_keys: list[str], exclude: tuple[str, ...] = ("seed",)) -> list[dict]:
    """Rows grouped by ``group_keys`` (first-seen order); every other numeric column becomes
    ``(mean, std, n)`` over the group's rows (the seeds), via :func:`mean_std`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in group_keys]), []).append(row)
    value_cols: list[str] = []
    for row in rows:
        value_cols += [c for c in row if c not in group_keys and c not in exclude and c not in value_cols]
    out = []
    for members in groups.values():
        agg = {k: members[0].get(k) for k in group_keys}
        for col in value_cols:
            nums = [m[col] for m in members if isinstance(m.get(col), (int, float)) and not isinstance(m.get(col), bool)]
            if nums or all(col not in m for m in members):
                agg[col] = mean_std(nums)
        out.append(agg)
    return out
