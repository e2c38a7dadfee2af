"""Evaluation metrics for token selectors: pure functions (torch / numpy / matplotlib, no Lightning).

Used by ``make eval`` (``experiments/evaluate.py``) to compare every selector x budget on held-out
data. Four groups:

1. **Per-sample metrics**, each returning a 1-D float64 tensor with one value per (counted)
   sample, so the caller can accumulate them over batches and report confidence intervals:
   :func:`evidence_recall`, :func:`token_coverage`, :func:`psnr`; plus the helper
   :func:`keep_mask` (top-K indices -> boolean keep mask).
2. **Aggregation**: :func:`mean_ci` (mean and Student-t confidence half-width) and
   :class:`MetricAccumulator`.
3. **FLOPs** (gumbel-ae-selector.md, Sec. 5.3), counting only FLOPs attributable to vision
   tokens: :func:`llm_flops`, :func:`sampler_flops`, :data:`GEOMETRIES`, :func:`flops_report`.
4. **Report writers**: :func:`write_table` (CSV + markdown, :func:`markdown_table`) and
   :func:`plot_metrics` (PNGs).

A *metric triple* is ``(mean, half_width, n)`` as returned by :func:`mean_ci`; ``n == 0`` means
"no sample could be scored" (e.g. evidence recall on a corpus without answer boxes) and is always
reported as ``n/a``, never as 0.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "keep_mask", "evidence_recall", "token_coverage", "psnr",
    "t_quantile", "mean_ci", "MetricAccumulator",
    "llm_flops", "sampler_flops", "Geometry", "GEOMETRIES", "flops_report",
    "is_metric_triple", "format_triple", "write_table", "markdown_table", "plot_metrics",
]

MetricTriple = tuple[float, float, int]

# ----------------------------------------------------------------------------------------------
# 1. Per-sample metrics
# ----------------------------------------------------------------------------------------------


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


def evidence_recall(
    keep: torch.Tensor, answer_tokens: Optional[torch.Tensor], has_box: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Fraction of each sample's answer-box tokens that the selector kept.

    ``keep``: ``(B, N)`` bool; ``answer_tokens``: ``(B, N)`` bool (``FeatureBatch.answer_tokens``);
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
    keep, answer = keep.bool(), answer_tokens.bool()
    n_answer = answer.sum(dim=1)
    valid = n_answer > 0
    if has_box is not None:
        valid = valid & has_box.bool().to(valid.device)
    hit = (keep & answer).sum(dim=1)
    return (hit[valid].double() / n_answer[valid].double())


def token_coverage(features: torch.Tensor, keep: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """How well the kept tokens cover the dropped ones, per sample ``(B,)`` float64.

    For every dropped token, the maximum cosine similarity to any kept token (of the same sample);
    the coverage is the mean of that over the dropped tokens. It is ``1.0`` when nothing is dropped
    and ``nan`` when nothing is kept (no token can cover; not reachable with a budget ``k >= 1``).
    Batched: kept columns are selected by masking the others with ``-inf``; the ``(b, N, N)``
    similarity is built ``chunk`` samples at a time to bound memory (2880 tokens: 33 MB/sample).
    Zero feature vectors have cosine 0 to everything.
    """
    if features.dim() != 3 or keep.shape != features.shape[:2]:
        raise ValueError(f"features must be (B, N, C) and keep (B, N); got {tuple(features.shape)}, {tuple(keep.shape)}")
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


def psnr(pred: torch.Tensor, target: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB, ``(B,)`` float64.

    ``10 * log10(max_value**2 / MSE)`` with the MSE over all channels and pixels of a sample;
    images in ``[0, max_value]`` (``FeatureBatch.image`` is in ``[0, 1]``). Predictions are not
    clamped. **Identical images give ``+inf``** (no cap): a mean over samples that contains one is
    ``+inf`` and its CI half-width ``nan``, which makes a degenerate reconstruction visible instead
    of hiding it behind an arbitrary cap. Cap it yourself (``psnr(...).clamp(max=...)``) if needed.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = pred.double() - target.double()
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(torch.as_tensor(float(max_value) ** 2, dtype=torch.float64, device=mse.device) / mse)


# ----------------------------------------------------------------------------------------------
# 2. Aggregation
# ----------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    """Student-t CDF with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution (``scipy.stats.t.ppf``), without scipy.

    scipy is not a dependency, so this inverts the exact CDF (regularised incomplete beta,
    continued fraction) by bisection to ~1e-12; closed forms for ``df`` 1 and 2. E.g.
    ``t_quantile(0.975, 4) = 2.7764``, ``t_quantile(0.975, 1) = 12.706``, and it tends to the
    normal quantile 1.95996 for large ``df``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _as_float_array(values: Union[Sequence[float], torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def mean_ci(values: Union[Sequence[float], torch.Tensor, np.ndarray], confidence: float = 0.95) -> MetricTriple:
    """``(mean, half_width, n)``: sample mean and the half-width of its two-sided Student-t CI.

    ``half_width = t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof=1``); the t quantile comes from :func:`t_quantile` (exact, no scipy).
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


# ----------------------------------------------------------------------------------------------
# 3. FLOPs (gumbel-ae-selector.md, Section 5.3)
# ----------------------------------------------------------------------------------------------


def llm_flops(n_tokens: float, d: int, m: int, layers: int, ffn_matrices: int = 3) -> float:
    """FLOPs of the LLM attributable to ``n_tokens`` vision tokens (Sec. 5.3, after FastV/PDrop).

    ``(4 n d^2 + 2 n^2 d + ffn_matrices * n d m) * layers``: the q/k/v/o projections
    (``4 n d^2``), attention scores and weighted values among the vision tokens (``2 n^2 d``) and
    the FFN (``ffn_matrices`` matrices of ``d x m``), counting one multiply-add as one FLOP, as the
    paper does.

    The paper writes the FFN term as ``2 n d m`` (``ffn_matrices=2``), which gives ~16.7 TFLOPs at
    2880 tokens for LLaVA-NeXT (d=4096, m=11008, 32 layers), but its Table 1 headers (~21 T at
    2880 tokens, ~10 at 1440, ~8 at 1152, ~4 at 640, ~2 at 320, ~1 at 160) match ``3 n d m``:
    LLaMA's gated (SwiGLU) FFN has three ``d x m`` matrices (gate, up, down). Hence the default
    ``ffn_matrices=3`` for LLaMA-family LLMs (Vicuna, Mistral, ...); pass ``ffn_matrices=2`` for
    the paper's formula as printed or for a plain two-matrix MLP.
    """
    n = float(n_tokens)
    return (4.0 * n * d * d + 2.0 * n * n * d + float(ffn_matrices) * n * d * m) * layers


def sampler_flops(n_tokens: float, crop_tokens: int, d: int, m: int, layers: int, ffn_matrices: int = 3) -> float:
    """FLOPs of the sampler's per-crop stage (Sec. 5.3): ``n / n_c`` crops of ``n_c`` tokens, each
    through ``layers`` transformer layers of the same MHA+FFN form as :func:`llm_flops`:
    ``(n / n_c) * (4 n_c d^2 + 2 n_c^2 d + ffn_matrices * n_c d m) * layers`` (the paper uses
    ``layers = l_s = 4``). Attention is within a crop, so this is linear in ``n``."""
    if crop_tokens <= 0:
        raise ValueError(f"crop_tokens must be positive, got {crop_tokens}")
    return float(n_tokens) / crop_tokens * llm_flops(crop_tokens, d, m, layers, ffn_matrices)


@dataclass(frozen=True)
class Geometry:
    """A VLM's vision-token geometry for FLOPs accounting.

    ``tokens``: vision tokens per image into the LLM (n); ``crop_tokens``: tokens per crop (n_c);
    ``d``, ``m``, ``layers``: the LLM's hidden size, FFN intermediate size and depth.
    ``vision_d`` / ``vision_m``: the vision encoder's width and MLP size, i.e. the width at which
    *this repository's* selectors run (``selector.width=None`` -> feature width C, ``mlp_ratio=4``).
    """

    name: str
    tokens: int
    crop_tokens: int
    d: int
    m: int
    layers: int
    vision_d: int = 1024
    vision_m: int = 4096


GEOMETRIES: dict[str, Geometry] = {
    # LLaVA-NeXT / Open-LLaVA-Next (Vicuna-7B): 1 + 4 crops of 576 CLIP ViT-L/14-336 tokens
    "llava_next": Geometry("llava_next", tokens=2880, crop_tokens=576, d=4096, m=11008, layers=32),
    # LLaVA-1.5 (7B): one 336 px view, 576 tokens
    "llava15": Geometry("llava15", tokens=576, crop_tokens=576, d=4096, m=11008, layers=32),
}


def flops_report(
    geometry: Union[str, Geometry],
    keep_ratio: float,
    sampler_layers: int = 4,
    sampler_d: Optional[int] = None,
    sampler_m: Optional[int] = None,
    ffn_matrices: int = 3,
    sampler_ffn_matrices: Optional[int] = None,
) -> dict:
    """Prefill FLOPs of the vision tokens, in TFLOPs (1e12), for a selector keeping ``keep_ratio``.

    - ``llm_tflops_full``: the LLM over all ``n`` tokens; ``llm_tflops_kept``: over
      ``round(keep_ratio * n)`` tokens (:func:`llm_flops`, ``ffn_matrices`` for the LLM).
    - ``sampler_tflops``: :func:`sampler_flops` over all ``n`` tokens, per crop, with
      ``sampler_layers`` layers (the paper's ``l_s = 4``; pass ``0`` for selectors without a
      learned per-crop stage, e.g. random or training-free baselines).
    - ``total_tflops = llm_tflops_kept + sampler_tflops``;
      ``prefill_reduction = 1 - total / llm_full``.

    **Sampler width convention.** Sec. 5.3 prices the sampler with "the same MHA+FFN form" and the
    *same symbols* ``d`` and ``m`` it defined as the LLM's hidden and FFN sizes, so by default
    (``sampler_d=None``, ``sampler_m=None``) the sampler is priced at the LLM's width with the
    LLM's FFN (``sampler_ffn_matrices=None`` -> ``ffn_matrices``): 2.39 T for LLaVA-NeXT with 4
    layers. That is the paper's formula as written, and conservative. Note that it does not
    reproduce the paper's "~21 -> ~10 TFLOPs at 50 % including sampler overhead" (it gives
    9.87 + 2.39 = 12.3 T); that sentence matches a sampler at the vision encoder's width
    (``sampler_d=g.vision_d, sampler_m=g.vision_m, sampler_ffn_matrices=2``: 0.16 T, total
    10.0 T), which is also how this repository's selectors are built.
    """
    g = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    n = g.tokens
    kept = int(round(keep_ratio * n))
    s_d = g.d if sampler_d is None else sampler_d
    s_m = g.m if sampler_m is None else sampler_m
    s_ffn = ffn_matrices if sampler_ffn_matrices is None else sampler_ffn_matrices
    full = llm_flops(n, g.d, g.m, g.layers, ffn_matrices) / 1e12
    kept_f = llm_flops(kept, g.d, g.m, g.layers, ffn_matrices) / 1e12
    samp = sampler_flops(n, g.crop_tokens, s_d, s_m, sampler_layers, s_ffn) / 1e12 if sampler_layers > 0 else 0.0
    total = kept_f + samp
    return {
        "geometry": g.name,
        "tokens": n,
        "kept_tokens": kept,
        "keep_ratio": float(keep_ratio),
        "llm_tflops_full": full,
        "llm_tflops_kept": kept_f,
        "sampler_tflops": samp,
        "total_tflops": total,
        "prefill_reduction": 1.0 - total / full,
    }


# ----------------------------------------------------------------------------------------------
# 4. Report writers
# ----------------------------------------------------------------------------------------------

_KEY_COLUMNS = ("selector", "budget", "keep_ratio", "k")


def is_metric_triple(value) -> bool:
    """A ``(mean, half_width, n)`` triple as produced by :func:`mean_ci`."""
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, (int, float, np.floating, np.integer)) for v in value)
        and float(value[2]).is_integer()
    )


def _fmt(x) -> str:
    """Numbers with 3 decimals (``.3g`` for magnitudes < 1e-3 or >= 1e6); ``n/a`` for nan."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "n/a"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:.3f}"
    return str(x)


def format_triple(value: Sequence) -> str:
    """``mean ± half`` ; ``n/a`` when ``n == 0``; ``mean (n=1)`` when there is no CI."""
    mean, half, n = value
    if int(n) == 0:
        return "n/a"
    if half is None or math.isnan(float(half)):
        return f"{_fmt(mean)} (n={int(n)})"
    return f"{_fmt(mean)} ± {_fmt(half)}"


def _columns(rows: Sequence[Mapping], key_columns: Sequence[str] = _KEY_COLUMNS) -> list[str]:
    cols: list[str] = [c for c in key_columns if any(c in r for r in rows)]
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    return cols


def _metric_columns(rows: Sequence[Mapping], cols: Iterable[str]) -> list[str]:
    return [c for c in cols if any(is_metric_triple(r.get(c)) for r in rows)]


def _csv_value(x) -> str:
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return "" if math.isnan(x) else repr(x)
    return str(x)


def write_table(
    rows: list[dict], out_dir: Path, name: str, confidence: float = 0.95, title: Optional[str] = None,
    spread: str = "ci", key_columns: Sequence[str] = _KEY_COLUMNS, markdown: bool = True,
) -> tuple[Path, Optional[Path]]:
    """Write ``<out_dir>/<name>.csv`` and (unless ``markdown=False``) ``<out_dir>/<name>.md``
    (:func:`markdown_table`); return both paths.

    Row schema: ``{"selector", "budget", "keep_ratio", "k", "<metric>": (mean, half, n), ...,
    "<scalar>": value}``. Columns are the union over rows (key columns first, then first-seen
    order); a row missing a column leaves it empty / ``n/a``.

    CSV: every plain column as is, and every metric as three columns ``<metric>_mean``,
    ``<metric>_ci`` (the half-width) and ``<metric>_n``; undefined values (n = 0, nan) are empty
    cells, never 0. ``spread="std"`` reads the triples as ``(mean, sample std, n)`` over seeds
    instead (CSV ``<metric>_std``). ``key_columns`` come first, in that order.
    """
    _check_spread(spread)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, key_columns)
    metrics = set(_metric_columns(rows, cols))

    csv_cols: list[str] = []
    for c in cols:
        csv_cols += [f"{c}_mean", f"{c}_{spread}", f"{c}_n"] if c in metrics else [c]
    csv_path = out_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(csv_cols)
        for r in rows:
            line = []
            for c in cols:
                v = r.get(c)
                if c in metrics:
                    if is_metric_triple(v):
                        mean, half, n = v
                        n = int(n)
                        line += [_csv_value(float(mean)) if n else "", _csv_value(float(half)) if n else "", str(n)]
                    else:
                        line += ["", "", "0"]
                else:
                    line.append(_csv_value(v))
            w.writerow(line)
    if not markdown:
        return csv_path, None
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown_table(rows, confidence, title, spread, key_columns))
    return csv_path, md_path


def _check_spread(spread: str) -> None:
    if spread not in ("ci", "std"):
        raise ValueError(f"spread={spread!r}: expected 'ci' or 'std'")


def markdown_table(
    rows: list[dict], confidence: float = 0.95, title: Optional[str] = None, spread: str = "ci",
    key_columns: Sequence[str] = _KEY_COLUMNS, legend: bool = True,
) -> str:
    """The rows of :func:`write_table` as markdown: one cell per metric reading
    ``mean ± half_width`` (3 decimals), ``n/a`` when n = 0 and ``mean (n=1)`` when there is no
    CI. The ``legend`` line states that ± is the ``confidence`` CI (Student t) and the sample
    counts of every metric; with ``spread="std"``, that ± is the sample std over n seeds, and a
    single seed's cell is the bare mean.
    """
    _check_spread(spread)
    cols = _columns(rows, key_columns)
    metrics = set(_metric_columns(rows, cols))
    counts = []
    for c in cols:
        if c not in metrics:
            continue
        ns = [int(r[c][2]) if is_metric_triple(r.get(c)) else 0 for r in rows]
        lo, hi = (min(ns), max(ns)) if ns else (0, 0)
        counts.append(f"{c} n={lo}" if lo == hi else f"{c} n={lo}–{hi}")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    if legend and spread == "std":
        lines += ["Metric cells are mean ± sample standard deviation over n seeds (a bare number: a single "
                  "seed; n/a: no run could be scored). Seeds per cell: " + ("; ".join(counts) or "none") + ".", ""]
    elif legend:
        lines += [f"Metric cells are mean ± half-width of the {confidence * 100:g} % confidence interval (Student t) "
                  f"over n samples (n/a: no sample could be scored). Samples per cell: "
                  + ("; ".join(counts) if counts else "none") + ".", ""]
    lines.append("| " + " | ".join(cols) + " |")
    text_cols = {c for c in cols if c not in metrics and any(isinstance(r.get(c), str) for r in rows)}
    lines.append("|" + "|".join("---" if c in text_cols else "---:" for c in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in metrics:
                if spread == "std" and is_metric_triple(v) and int(v[2]) == 1:
                    cells.append(_fmt(v[0]))  # one seed: no spread to show
                else:
                    cells.append(format_triple(v) if is_metric_triple(v) else "n/a")
            else:
                cells.append("" if v is None else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plot_metrics(rows: list[dict], out_dir: Path, dpi: int = 100, confidence: float = 0.95) -> list[Path]:
    """One PNG per metric column (``<out_dir>/<metric>.png``): the metric against the keep ratio,
    one line per selector (points sorted by keep ratio), with the CI half-widths as error bars
    (``confidence`` only labels the title).
    Cells with n = 0 are left out; a metric with no data at all still gets a PNG saying so.

    Uses ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` (no pyplot global state) and saves
    with ``metadata={"Software": None}``, so the same rows give byte-identical files.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    selectors: list[str] = []
    for r in rows:
        s = str(r.get("selector", ""))
        if s not in selectors:
            selectors.append(s)
    paths = []
    for metric in _metric_columns(rows, cols):
        fig = Figure(figsize=(5.5, 4.0), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        plotted = False
        for sel in selectors:
            pts = []
            for r in rows:
                v = r.get(metric)
                if str(r.get("selector", "")) != sel or not is_metric_triple(v) or int(v[2]) == 0:
                    continue
                x = r.get("keep_ratio")
                if x is None or not math.isfinite(float(v[0])):
                    continue
                half = float(v[1])
                pts.append((float(x), float(v[0]), half if math.isfinite(half) else 0.0))
            if not pts:
                continue
            pts.sort()
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, linewidth=1.2, label=sel)
            plotted = True
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs keep ratio (± {confidence * 100:g} % CI)")
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a (no samples)", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / f"{_safe_name(metric)}.png"
        fig.savefig(path, format="png", metadata={"Software": None})
        paths.append(path)
    return paths
