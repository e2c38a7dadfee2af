"""Each benchmark's answer metric, by the name its entry in ``datamodules/benchmarks.py`` gives.

:data:`METRICS` maps a metric name to an :class:`AnswerMetric`: the columns it reports (the first is
the benchmark's headline, the one an average across benchmarks takes) and a function from the
predictions and references of one benchmark's samples to per-sample values of each column (the math
is in ``vqa_metrics.py``). :func:`score_answers` scores a run's answers, each benchmark by its own
metric; ``make eval-vlm`` calls it once per selector and budget.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from tokensel.common.registry import Registry
from tokensel.datamodules.benchmarks import BENCHMARKS
from tokensel.experiments.vqa_metrics import (anls, cider_d, pope_scores, relaxed_accuracy, textvqa_accuracy,
                                              vqav2_accuracy)

Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, list[float]]]


@dataclass(frozen=True)
class AnswerMetric:
    columns: tuple[str, ...]  # the first is the headline
    score: Scorer  # (predictions, references) -> column -> one value per sample


def per_sample(column: str, metric: Callable[[str, Sequence[str]], float]) -> AnswerMetric:
    """A metric that scores each answer against its own references."""
    return AnswerMetric((column,), lambda predictions, references: {
        column: [metric(p, refs) for p, refs in zip(predictions, references)]})


METRICS: Registry[AnswerMetric] = Registry("answer metric")
METRICS.register("anls", per_sample("anls", anls))
METRICS.register("relaxed_accuracy", per_sample("relaxed", lambda p, refs: relaxed_accuracy(p, refs[0])))
METRICS.register("cider_d", AnswerMetric(("cider",), lambda p, refs: {"cider": cider_d(p, refs)}))
METRICS.register("textvqa_accuracy", per_sample("accuracy", textvqa_accuracy))
METRICS.register("vqav2_accuracy", per_sample("accuracy", vqav2_accuracy))
METRICS.register("pope", AnswerMetric(("f1", "accuracy"), lambda p, refs: pope_scores(p, [r[0] for r in refs])))


def metric_of(source: str) -> AnswerMetric:
    return METRICS.get(BENCHMARKS.get(source).metric)


def score_answers(records: Sequence[dict]) -> dict[str, list[float]]:
    """``<benchmark>_<column>`` -> one value per sample of that benchmark, in record order, for each
    benchmark among ``records`` (dicts with ``source``, ``answer`` and ``answers``), in table order."""
    out: dict[str, list[float]] = {}
    for source in BENCHMARKS:
        mine = [r for r in records if r["source"] == source]
        if mine:
            values = metric_of(source).score([r["answer"] for r in mine], [r["answers"] for r in mine])
            out.update({f"{source}_{column}": v for column, v in values.items()})
    return out


def headline_average(summaries: dict[str, tuple]) -> float:
    """The mean over benchmarks of each one's headline metric, from ``<benchmark>_<column>`` ->
    ``(mean, ...)``; NaN when there is none."""
    headlines = {f"{source}_{metric_of(source).columns[0]}" for source in BENCHMARKS}
    means = [v[0] for name, v in summaries.items() if name in headlines]
    return statistics.mean(means) if means else math.nan
