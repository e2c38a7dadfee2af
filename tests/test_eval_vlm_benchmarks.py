"""Every registered benchmark, converted from a miniature copy of its release, through ``make
eval-vlm`` on the tiny random LLaVA: each is scored by its own metric, and each question gets its
benchmark's answer suffix and generation cap."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from test_convert import make_chartqa, make_coco
from test_convert_parquet import make_lmms_docvqa
from test_convert_pope import make_pope
from test_convert_textvqa import make_textvqa
from test_convert_vqav2 import make_vqav2
from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION
from tokensel.datamodules.convert import convert
from tokensel.datamodules.shards import ShardIndex
from tokensel.experiments.benchmark_metrics import METRICS

# benchmark -> (make a miniature release under a folder, the split to read from it); each is written
# into the split "val" of one root. DocVQA comes from lmms-lab's parquet release, the others from their own.
MINIATURES = {
    "coco": (make_coco, "val"),
    "docvqa": (make_lmms_docvqa, "validation"),
    "chartqa": (make_chartqa, "train"),
    "textvqa": (make_textvqa, "val"),
    "vqav2": (make_vqav2, "val"),
    "pope": (make_pope, "val"),
}


@pytest.fixture(scope="module")
def every_benchmark(tmp_path_factory) -> Path:
    assert set(MINIATURES) == set(BENCHMARKS.names()), "a new benchmark needs its miniature release here"
    raw, root = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("benchmarks")
    for name, (make, split) in MINIATURES.items():
        make(raw / name)
        convert(name, raw / name, root, split=split, out_split="val")
    return root


def test_every_question_gets_its_benchmarks_suffix(every_benchmark):
    from tokensel.experiments.eval_vlm import held_out_samples
    from tokensel.vlms.ntp import CAPTION_INSTRUCTION

    samples = list(held_out_samples(str(every_benchmark), "val"))
    assert {s[1] for s in samples} == set(BENCHMARKS.names())
    for key, source, image, prompt, references in samples:
        benchmark = BENCHMARKS.get(source)
        if benchmark.kind == CAPTION:
            assert prompt == CAPTION_INSTRUCTION
        else:
            assert prompt.endswith("?" + benchmark.answer_suffix) and benchmark.answer_suffix, key
        assert references
    bare = list(held_out_samples(str(every_benchmark), "val", answer_suffix=""))  # --answer-suffix '' (make vlm's)
    assert all(p.endswith("?") for _, s, _, p, _ in bare if BENCHMARKS.get(s).kind != CAPTION)


@pytest.mark.slow
def test_make_eval_vlm_scores_every_benchmark(tiny_llava, every_benchmark, tmp_path):
    from transformers import AutoTokenizer

    assert min(ShardIndex.load(every_benchmark).counts("val").values()) >= 2
    per_benchmark = 2  # --limit takes the sources in turn
    out = tmp_path / "eval_vlm"
    result = subprocess.run(
        ["make", "--no-print-directory", "eval-vlm", f"MODEL={tiny_llava}", "SELECTORS=full,random", "BUDGETS=4",
         f"ARGS=--limit {per_benchmark * len(BENCHMARKS)} --out {out} data.root={every_benchmark}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["selector"], r["budget"]) for r in rows] == [("full", "all"), ("random", "4")]
    for row in rows:
        for name in BENCHMARKS:  # every benchmark, by every column of its own metric
            for column in METRICS.get(BENCHMARKS.get(name).metric).columns:
                assert int(row[f"{name}_{column}_n"]) == per_benchmark, (name, column)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {a["source"] for a in answers} == set(BENCHMARKS.names())
    # Each generation stops at its own benchmark's cap. n tokens decode to at most n * (the longest
    # token's bytes) characters; the random model rarely says EOS, so POPE's answers (cap 128) run
    # past what the 16 tokens of TextVQA's and VQAv2's cap could hold.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    longest = max(len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer)))  # byte-level: 1 char a byte
    for a in answers:
        assert len(a["answer"]) <= BENCHMARKS.get(a["source"]).max_new_tokens * longest, a
    short_cap = BENCHMARKS.get("vqav2").max_new_tokens
    assert max(len(a["answer"]) for a in answers if a["source"] == "pope") > short_cap * longest
