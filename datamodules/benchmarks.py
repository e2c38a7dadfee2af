"""The benchmarks: one table, :data:`BENCHMARKS`, with one entry per shard ``source``.

An entry holds everything the rest of tokensel needs to know about a benchmark:

- ``kind``: ``caption`` (a sample holds ``captions``) or ``question`` (``question`` and
  ``answers``). The shard schema (``shards.validate_meta``), the training text
  (``samples.draw_text``) and the prompt in ``make eval-vlm`` all follow it;
- ``converter``: the module ``datamodules/<converter>.py`` that reads the benchmark's own released
  layout with ``records(src, split, skips, **options)``. If lmms-lab publishes the benchmark as
  parquet, the module also has ``PARQUET`` (``parquet_layout.ParquetLayout``). Either way
  ``convert.py`` writes the records as shards;
- ``metric``: the name of its answer metric in ``experiments/benchmark_metrics.py`` (``METRICS``);
- ``answer_suffix``: the text after each question in ``make eval-vlm``;
- ``max_new_tokens``: the generation cap in ``make eval-vlm``.

Adding a benchmark takes one entry below and one ``convert_<name>.py``. Per-source random streams are
seeded by the source's name (``shards.source_seed``), so a new entry leaves every other source's
corpus and training stream as they were.

The converter is named, not imported: the shard schema (``shards.py``) reads this table, and the
converters write through ``shards.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from operator import itemgetter
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from tokensel.common.registry import Registry

CAPTION, QUESTION = "caption", "question"
KINDS = (CAPTION, QUESTION)
# LLaVA-1.5's short-answer prompt ("Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744),
# which lmms-eval's tasks append too.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # CAPTION | QUESTION
    converter: str  # a module of tokensel.datamodules
    metric: str  # a name in experiments/benchmark_metrics.py METRICS
    answer_suffix: str = SHORT_ANSWER  # after each question (captions use the VLM's caption instruction)
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"benchmark {self.name!r}: kind={self.kind!r}, expected one of {', '.join(KINDS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"benchmark {self.name!r}: max_new_tokens={self.max_new_tokens} must be positive")

    def converter_module(self) -> ModuleType:
        """The module that reads this benchmark's raw releases."""
        return importlib.import_module(f"tokensel.datamodules.{self.converter}")


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register(benchmark: Benchmark) -> Benchmark:
    return BENCHMARKS.register(benchmark.name, benchmark)


# make eval-vlm takes the sources in turn, in this order. Generation caps: coco, docvqa and chartqa keep
# the 32 tokens make eval-vlm has always used; the short-answer VQA benchmarks take lmms-eval's VQAv2 cap, 16.
register(Benchmark("coco", CAPTION, "convert_coco", "cider_d", answer_suffix=""))
register(Benchmark("docvqa", QUESTION, "convert_docvqa", "anls"))
register(Benchmark("chartqa", QUESTION, "convert_chartqa", "relaxed_accuracy"))
register(Benchmark("textvqa", QUESTION, "convert_textvqa", "textvqa_accuracy", max_new_tokens=16))
register(Benchmark("vqav2", QUESTION, "convert_vqav2", "vqav2_accuracy", max_new_tokens=16))
register(Benchmark("pope", QUESTION, "convert_pope", "pope", max_new_tokens=128))  # lmms-eval's cap


def text_of(meta: dict) -> tuple[str, list[str]]:
    """``(question, references)`` of a checked sample json: ``("", captions)`` for a caption
    benchmark, ``(question, answers)`` for a question benchmark."""
    if BENCHMARKS.get(meta["source"]).kind == CAPTION:
        return "", meta["captions"]
    return meta["question"], meta["answers"]


def generation_batches(samples: Sequence, batch_size: int,
                       source_of: Callable[[Any], str] = itemgetter(1)) -> Iterator[tuple[list, int]]:
    """``(batch, max_new_tokens)``: the samples in batches of at most ``batch_size`` from one
    benchmark each (benchmarks in table order, samples in their order), with that benchmark's cap."""
    for name in BENCHMARKS:
        mine = [s for s in samples if source_of(s) == name]
        for start in range(0, len(mine), batch_size):
            yield mine[start:start + batch_size], BENCHMARKS.get(name).max_new_tokens
