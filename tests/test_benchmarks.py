"""The benchmark table drives the schema, the converters and the metrics: every entry is checked
here, so a new benchmark is tested the day it registers."""

import inspect
import math

import pytest

from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION, KINDS, generation_batches, text_of
from tokensel.datamodules.parquet_layout import ParquetLayout
from tokensel.datamodules.shards import ShardFormatError, source_seed, validate_meta
from tokensel.experiments.benchmark_metrics import METRICS, headline_average, score_answers


def sample_meta(name: str) -> dict:
    if BENCHMARKS.get(name).kind == CAPTION:
        return {"source": name, "captions": ["a red square"]}
    return {"source": name, "question": "what colour?", "answers": ["red"]}


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_every_benchmark_is_complete(name):
    benchmark = BENCHMARKS.get(name)
    assert benchmark.kind in KINDS and benchmark.max_new_tokens > 0
    module = benchmark.converter_module()
    parameters = list(inspect.signature(module.records).parameters)
    assert parameters[:3] == ["src", "split", "skips"]
    assert set(getattr(module, "OPTIONS", {})) <= set(parameters[3:])  # each command-line option is a keyword
    parquet = getattr(module, "PARQUET", None)
    assert parquet is None or isinstance(parquet, ParquetLayout)
    metric = METRICS.get(benchmark.metric)
    assert metric.columns
    validate_meta(sample_meta(name))
    question, references = text_of(sample_meta(name))
    assert references and (question == "") == (benchmark.kind == CAPTION)
    if benchmark.kind != CAPTION:
        assert benchmark.answer_suffix.startswith("\n")


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_the_schema_follows_the_kind(name):
    wrong = {"source": name, "question": "q?", "answers": ["a"]} if BENCHMARKS.get(name).kind == CAPTION else {
        "source": name, "captions": ["a caption"]}
    with pytest.raises(ShardFormatError, match=name):
        validate_meta(wrong)


def test_unknown_source_names_the_benchmarks():
    with pytest.raises(ShardFormatError) as err:
        validate_meta({"source": "imagenet", "captions": ["x"]})
    assert ", ".join(BENCHMARKS.names()) in str(err.value)


def test_seeds_come_from_names_not_positions():
    seeds = {name: source_seed(name) for name in BENCHMARKS}
    assert len(set(seeds.values())) == len(seeds)
    assert source_seed("coco") == int.from_bytes(__import__("hashlib").sha256(b"coco").digest()[:4], "little")


def test_generation_batches_hold_one_benchmark_each_with_its_cap():
    names = BENCHMARKS.names()
    samples = [(f"k{i}", names[i % 2]) for i in range(7)]  # interleaved, as eval-vlm reads them
    batches = list(generation_batches(samples, 3))
    assert [len(b) for b, _ in batches] == [3, 1, 3]
    for batch, cap in batches:
        assert len({s[1] for s in batch}) == 1 and cap == BENCHMARKS.get(batch[0][1]).max_new_tokens
    assert sorted(s for b, _ in batches for s in b) == sorted(samples)


def test_score_answers_scores_each_benchmark_by_its_own_metric():
    records = [
        {"source": "docvqa", "answer": "helo", "answers": ["hello"]},
        {"source": "chartqa", "answer": "10.4", "answers": ["10"]},
        {"source": "docvqa", "answer": "x", "answers": ["hello"]},
    ]
    scores = score_answers(records)
    assert scores == {"docvqa_anls": [pytest.approx(0.8), 0.0], "chartqa_relaxed": [1.0]}


def test_the_average_takes_each_benchmarks_headline_only():
    summaries = {"docvqa_anls": (0.5, 0.1, 4), "chartqa_relaxed": (0.9, 0.1, 4), "docvqa_other": (0.0, 0.1, 4)}
    assert headline_average(summaries) == pytest.approx(0.7)
    # POPE reports F1 (its headline) and accuracy; the average takes F1 only
    assert headline_average({"pope_f1": (0.8, 0.1, 4), "pope_accuracy": (0.2, 0.1, 4)}) == pytest.approx(0.8)
    assert math.isnan(headline_average({}))
