"""The functions of the local lmms-eval tasks in this folder (``!function utils.*`` in the YAMLs),
and :func:`write_dataset`, which makes their data from tokensel's generated corpus.

The tasks read ``tokensel_lmms_local/test.parquet`` relative to the working directory (lmms-eval
anchors a ``data_files`` path to the YAML's folder only when the file is there). To run them by
hand, from an empty folder::

    python /path/to/tests/lmms_task/utils.py --corpus /path/to/data/default --limit 8
    lmms-eval --model tokensel_llava --model_args pretrained=...,selector=divprune,budget=64 \\
        --include_path /path/to/tests/lmms_task --tasks tokensel_docvqa_local --output_path out/
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA_FILE = "tokensel_lmms_local/test.parquet"
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # as lmms-eval's docvqa_val


def write_dataset(corpus: str | Path, out: str | Path = DATA_FILE, split: str = "val", limit: int = 8) -> Path:
    """The question samples of a tokensel corpus split as one parquet file (images
    embedded), with the columns the tasks read: question_id, source, question, answers, image."""
    import datasets

    from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION
    from tokensel.experiments.eval_vlm import held_out_samples

    rows = {"question_id": [], "source": [], "question": [], "answers": [], "image": []}
    for key, source, image, prompt, answers in held_out_samples(str(corpus), split, answer_suffix=""):
        if BENCHMARKS.get(source).kind == CAPTION:
            continue
        rows["question_id"].append(len(rows["question_id"]))
        rows["source"].append(source)
        rows["question"].append(prompt)
        rows["answers"].append([str(a) for a in answers])
        rows["image"].append(image.convert("RGB"))
        if len(rows["question_id"]) >= limit:
            break
    if not rows["question_id"]:
        raise SystemExit(f"{corpus}: no question samples in split {split!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(out))
    return out


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', POST_PROMPT)}"


def doc_to_answer(doc):
    """The loglikelihood task's continuation: the first reference answer."""
    return doc["answers"][0]


def process_results_ll(doc, results):
    """Perplexity and acc (is greedy) of the answer. lmms-eval 0.7.3 hands a loglikelihood task
    ``[response]`` where its own default expects the bare pair, and its evaluator turns the
    ``(logprob, is_greedy)`` pair into its ``str()`` (``unwrap_generation_output``): read both."""
    import ast

    response = results[0]
    logprob, is_greedy = ast.literal_eval(response) if isinstance(response, str) else response
    return {"perplexity": float(logprob), "acc": int(bool(is_greedy))}


def doc_to_text_rounds(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                       previous_round_info=None):
    """Two rounds: the question, then the question again after the model's first answer.
    Round 0 is a plain prompt; later calls return (visuals, context, done, round results, info)."""
    if round_idx is None:
        return doc_to_text(doc, lmms_eval_specific_kwargs)
    if round_idx == 1:
        context = f"You answered: {previous_output[-1]}. Check it. {doc['question']}{POST_PROMPT}"
        return None, context, False, None, {"rounds": 1}
    return None, None, True, None, {"rounds": previous_round_info["rounds"] + 1}


def process_results_rounds(doc, results):
    """ANLS of the last round's answer, and the number of rounds answered."""
    from lmms_eval.api.metrics import anls

    rounds = results[0]
    return {"anls": anls(doc["answers"], [rounds[-1]])["anls"], "rounds": len(rounds)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the local tasks' parquet from a tokensel corpus")
    parser.add_argument("--corpus", default="data/default", help="a tokensel corpus root (make data)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--out", default=DATA_FILE)
    args = parser.parse_args()
    print(write_dataset(args.corpus, args.out, args.split, args.limit))
