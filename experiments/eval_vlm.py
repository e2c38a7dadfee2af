"""Compare selectors where the field compares them: a pruned VLM's answers at matched budgets.

    python -m tokensel.experiments.eval_vlm [--model LLAVA] [--selectors full,random,divprune] [--ckpts p1,p2]
                                           [--budgets 64,128,192] [--limit N] [--out DIR] [key=value ...]

``--model`` is a folder or hub id of any VLM family of ``vlms/`` (LLaVA-1.5, LLaVA-NeXT,
Qwen2.5-VL, Qwen3-VL; its ``model_type`` picks the family). It defaults to the small real LLaVA of
``make vlm`` (DINOv2 ViT-S/14 + SmolLM2-135M, ``experiments/vlm_build.py``), built first when it
is not there (about 8 minutes on a 2-core CPU). Every argument is checked before anything heavy
is built. Each benchmark's entry (``datamodules/benchmarks.py``) gives its questions' suffix
(LLaVA-1.5's short-answer line) and its generation cap (``max_new_tokens``); a ``make vlm`` model,
whose projector was aligned on the bare questions, gets none (``--answer-suffix`` sets one for all
either way).

Every selector runs inside the same model (``vlms/``): K of each image's candidate tokens kept
(LLaVA: between the vision tower and the projector, for NeXT per view or across each image's
views with ``--view-selection across``; Qwen-VL: after the patch merger, at each image's own grid,
with ``--positions original|compact`` M-RoPE ids and ``--image-size`` for one fixed resolution),
then the model's own greedy ``generate`` on the same pruned prompt that the prefill was timed on.
``full`` is the all-token reference. Held-out samples come from ``data.root``'s
``data.val_split`` (the converted DocVQA val, ChartQA test and COCO val, or the generated corpus).

Per selector x budget (``results.csv``, ``results.md``, one plot per metric; every answer with its
references in ``answers.jsonl``):

- each benchmark's metric (``experiments/benchmark_metrics.py``): e.g. DocVQA ANLS, ChartQA relaxed
  accuracy, COCO CIDEr-D, each as mean ± 95 % CI over its samples; the average of each benchmark's
  headline metric, and the % of the full-token average it retains;
- prefill time (median over batches; CUDA events on a GPU, ``perf_counter`` on a CPU) and the
  speed-up over full tokens;
- per benchmark metric, the paired difference from ``random`` at the same budget
  (``<metric>_vs_random``, mean ± 95 % CI over the same samples): whether a selector beats random
  selection, which overlapping independent CIs cannot say;
- the image tokens per prompt (``k``, a mean: NeXT images differ in view count) and the keep
  ratio against the views' ``V * N`` tokens (for NeXT's full row, its own unpadded layout with
  newlines, so it need not be 1);
- the LLM's TFLOPs for the image tokens per image, by the field's formula
  ``4nd^2 + 2n^2d + 2ndm`` per layer and by the gated-FFN reading ``3ndm`` (``experiments/flops.py``);
- peak GPU memory (``n/a`` on a CPU).

Default budgets: for LLaVA-NeXT the Gumbel paper's keep ratios 0.056, 0.111, 0.222, 0.4 and 0.5;
K = 64, 128, 192 for a 576-token tower (LLaVA-1.5), else keep ratios 0.111 and 0.25 of its tokens
(also for Qwen-VL, whose images have their own token counts).
``--limit N`` stops after N samples and marks the table partial.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from webdataset.tariterators import tarfile_samples

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.common.errors import TokenselError
from tokensel.common.precision import check_precision
from tokensel.common.stats import mean_ci
from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION, generation_batches, text_of
from tokensel.datamodules.samples import SkipSample, parse_sample
from tokensel.datamodules.shards import ShardIndex
from tokensel.datamodules.synthetic import ensure_corpus
from tokensel.experiments.benchmark_metrics import headline_average, score_answers
from tokensel.experiments.config import merge_overrides
from tokensel.experiments.flops import llm_flops
from tokensel.experiments.report import plot_metrics, write_table
from tokensel.experiments.vlm_build import ensure_vlm
from tokensel.selectors.budget import parse_budgets
from tokensel.selectors.catalog import FULL, baseline_class, baseline_names, selector_for
from tokensel.vlms import check_vlm, open_vlm
from tokensel.vlms.base import NO_CLS
from tokensel.vlms.llava import LlavaFamily
from tokensel.vlms.ntp import CAPTION_INSTRUCTION

LLAVA15_COUNTS = (64, 128, 192)
NEXT_KEEP_RATIOS = (0.056, 0.111, 0.222, 0.4, 0.5)
PAIRED_REFERENCE = "random"  # the paired differences are against random selection at the same budget


class EvalVLMError(TokenselError):
    """A user mistake on the eval-vlm command line."""


@dataclass
class HeldOutData:
    root: str = "data/default"  # shards with a shards.json index
    val_split: str = "val"


@dataclass
class HeldOutConfig:
    """What eval-vlm's ``key=value`` overrides may set: where the held-out samples are."""

    data: HeldOutData = field(default_factory=HeldOutData)


def held_out_samples(root: str, split: str, limit: Optional[int] = None,
                     answer_suffix: Optional[str] = None) -> Iterator[tuple]:
    """``(key, source, PIL image, prompt, answers)`` of a split, taking the sources in turn (so
    ``limit`` keeps every benchmark); unusable samples are skipped with a warning. A question gets
    ``answer_suffix``, or by default its benchmark's."""
    index = ShardIndex.load(root)
    entries = index.shards(split)

    def source_stream(source: str):
        for entry in (e for e in entries if e.source == source):
            for sample in tarfile_samples([{"url": str(index.root / entry.path)}]):
                try:
                    image, meta = parse_sample(sample)
                except SkipSample as why:
                    logging.getLogger("tokensel.eval_vlm").warning("skipped %s: %s", sample.get("__key__"), why)
                    continue
                benchmark, (question, references) = BENCHMARKS.get(meta["source"]), text_of(meta)
                suffix = benchmark.answer_suffix if answer_suffix is None else answer_suffix
                prompt = CAPTION_INSTRUCTION if benchmark.kind == CAPTION else question + suffix
                yield sample["__key__"], meta["source"], image, prompt, references

    streams = [source_stream(s) for s in BENCHMARKS if any(e.source == s for e in entries)]
    seen = 0
    while streams and (limit is None or seen < limit):
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
                continue
            yield item
            seen += 1
            if limit is not None and seen >= limit:
                return


def default_budgets(num_tokens: Optional[int], anyres: bool = False) -> list:
    """LLaVA-NeXT (``anyres``): the Gumbel paper's keep ratios (arXiv 2503.16660, Table 1: 160,
    320, 640, 1152 and 1440 of 2,880 tokens). LLaVA-1.5: K = 64, 128, 192 of a 576-token tower; for
    another tower, or images with their own token counts (``num_tokens`` None), the keep ratio of
    64 of 576 and 25 % (two budgets, so the default run on a CPU stays within minutes)."""
    if anyres:
        return list(NEXT_KEEP_RATIOS)
    if num_tokens == 576:
        return list(LLAVA15_COUNTS)
    return [round(LLAVA15_COUNTS[0] / 576, 3), 0.25]


def prefill_ms(model, inputs: dict, cuda: bool) -> float:
    """Wall time of one prefill forward (the prompt, no generation)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inputs, use_cache=True)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    model(**inputs, use_cache=True)
    return (time.perf_counter() - began) * 1000


def evaluate(vlm, selectors: dict, budgets: list, samples: list, batch_size: int, log=print,
             answers_out: Optional[list] = None) -> list[dict]:
    """One row per selector x budget (``full`` once, at all tokens); every answer is appended to
    ``answers_out`` when it is given."""
    cuda = vlm.model.device.type == "cuda"
    text = vlm.model.config.text_config
    d, m, layers = int(text.hidden_size), int(text.intermediate_size), int(text.num_hidden_layers)
    runs = [("full", None, None)] + [(n, s, b) for n, s in selectors.items() if s is not None for b in budgets]
    with torch.no_grad():  # one untimed prefill: first calls pay for allocation
        prefill_ms(vlm.model, vlm.prune([samples[0][2]], [samples[0][3]]).inputs, cuda)
    rows, per_sample = [], []
    for name, selector, budget in runs:
        records, times, kept, candidates = [], [], [], []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for batch, max_new_tokens in generation_batches(samples, batch_size):  # one benchmark per batch
            prompt = vlm.prune([s[2] for s in batch], [s[3] for s in batch], selector, budget)
            with torch.no_grad():
                times.append(prefill_ms(vlm.model, prompt.inputs, cuda) / len(batch))
            answers = vlm.answer(prompt, max_new_tokens=max_new_tokens)
            kept += prompt.image_tokens
            candidates += prompt.candidate_tokens
            records += [{"key": s[0], "source": s[1], "answer": a, "answers": s[4]} for s, a in zip(batch, answers)]
            log(f"[eval-vlm] {name} {budget or 'all'}: {len(records)}/{len(samples)}", end="\r")
        k = statistics.mean(kept)  # image tokens per prompt (NeXT images differ in view count)
        values = score_answers(records)  # each benchmark's own metric per sample, in one sample order for every run
        per_sample.append(values)
        metrics = {metric: mean_ci(v) for metric, v in values.items()}
        row = {"selector": name, "budget": "all" if budget is None else str(budget),
               "keep_ratio": statistics.mean(a / b for a, b in zip(kept, candidates)),
               "k": int(k) if float(k).is_integer() else round(k, 1), "samples": len(records), **metrics,
               "average": headline_average(metrics),
               "prefill_ms": statistics.median(times) if times else float("nan"),
               "tflops_2ndm": llm_flops(k, d, m, layers, ffn_matrices=2) / 1e12,
               "tflops_3ndm": llm_flops(k, d, m, layers, ffn_matrices=3) / 1e12,
               "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}
        rows.append(row)
        if answers_out is not None:
            answers_out += [{"selector": name, "budget": row["budget"], "k": n, **r} for r, n in zip(records, kept)]
        log(f"[eval-vlm] {name} k={row['k']}: average {row['average']:.3f}, prefill {row['prefill_ms']:.1f} ms/sample")
    return paired_against(relative_to_full(rows), per_sample, PAIRED_REFERENCE)


def paired_against(rows: list[dict], per_sample: list[dict], reference: str) -> list[dict]:
    """Add ``<metric>_vs_<reference>``: the mean ± 95 % CI of the per-sample difference from the
    ``reference`` selector at the same budget, on the same samples. Independent CIs of two
    selectors may overlap while the paired difference, which removes the samples' own spread,
    does not include 0; this is the test of whether two selectors differ."""
    ref = {row["budget"]: values for row, values in zip(rows, per_sample) if row["selector"] == reference}
    for row, values in zip(rows, per_sample):
        base = ref.get(row["budget"])
        if base is None or row["selector"] == reference:
            continue
        for metric, v in values.items():
            if metric in base and len(base[metric]) == len(v):
                row[f"{metric}_vs_{reference}"] = mean_ci([a - b for a, b in zip(v, base[metric])])
    return rows


def relative_to_full(rows: list[dict]) -> list[dict]:
    """Add ``retained_pct`` (the average as % of the full-token row's, n/a when that is 0) and
    ``prefill_speedup`` (full-token prefill time over the row's). The first row is the reference."""
    full = rows[0]
    for row in rows:
        row["retained_pct"] = 100 * row["average"] / full["average"] if full["average"] else float("nan")
        row["prefill_speedup"] = full["prefill_ms"] / row["prefill_ms"]
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.eval_vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a VLM folder or hub id: LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL "
                        "(default: make vlm's)")
    parser.add_argument("--answer-suffix", default=None,
                        help="text after each question (default: its benchmark's; none for make vlm's)")
    parser.add_argument("--selectors", default="full,random,divprune", help="full and/or baselines, comma list")
    parser.add_argument("--ckpts", default="", help="trained selector checkpoints, comma list")
    parser.add_argument("--budgets", default="", help="token counts and/or keep ratios (default: 64,128,192 of 576)")
    parser.add_argument("--feature-space", default=None,
                        help="where selectors choose: vision | projector (LLaVA; default vision); Qwen-VL: projector")
    parser.add_argument("--view-selection", default="per_view", help="LLaVA-NeXT: a budget per view (per_view), "
                        "or across each image's views (across)")
    parser.add_argument("--positions", default="original", help="Qwen-VL: the kept tokens' M-RoPE ids, original "
                        "(default) or compact")
    parser.add_argument("--image-size", type=int, default=None,
                        help="Qwen-VL: one fixed input side in pixels (default: each image at its own grid)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N samples (the table says partial)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="32", help="the VLM's dtype: 32 | bf16 | 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder (default: eval_vlm/<time>)")
    parser.add_argument("overrides", nargs="*", help="data.root=..., data.val_split=...")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    # every argument first: nothing heavy (the corpus, make vlm's model, the VLM) before all are checked
    data = merge_overrides(HeldOutConfig(), args.overrides)
    names = [s.strip() for s in args.selectors.split(",") if s.strip()]
    bad = [n for n in names if n != FULL and n not in baseline_names()]
    if bad:
        raise EvalVLMError(f"--selectors: unknown {', '.join(bad)}; choose from {FULL}, {', '.join(baseline_names())}")
    budgets = parse_budgets(args.budgets)
    for key, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise EvalVLMError(f"{key}={value}: must be at least 1")
    check_precision("--precision", args.precision)
    options = {"feature_space": args.feature_space, "view_selection": args.view_selection,
               "positions": args.positions, "image_size": args.image_size}
    family = check_vlm(args.model, "--model", **options) if args.model else LlavaFamily
    if not args.model:
        family.check_options(**options)
    needs_cls = [n for n in names if n != FULL and baseline_class(n).needs_cls_attention]
    if needs_cls and not family.cls_attention:
        raise EvalVLMError(f"--selectors: {', '.join(needs_cls)} need the vision tower's CLS attention; "
                           f"{family.model_types[0]}: {NO_CLS}")
    trained = [selector_for(p.strip(), (1, 1), args.seed, "--ckpts")[1] for p in args.ckpts.split(",") if p.strip()]
    if data.data.root == "data/default":
        ensure_corpus("data/default")
    if args.model is None:
        args.model = str(ensure_vlm())
    made_here = (Path(args.model) / "vlm_build.json").is_file()  # aligned on bare questions
    suffix = args.answer_suffix if args.answer_suffix is not None else ("" if made_here else None)
    vlm = open_vlm(args.model, precision=args.precision, label="--model", **options)
    for path, net in zip((p.strip() for p in args.ckpts.split(",") if p.strip()), trained):
        vlm.check_selector(net, path)
    if torch.cuda.is_available():
        vlm.model.to("cuda")
    selectors = {n: selector_for(n, vlm.selection_grid, args.seed)[1] for n in names if n != FULL}
    selectors.update({net.config.name: net for net in trained})
    budgets = budgets or default_budgets(vlm.candidate_geometry()[0], vlm.anyres)
    samples = list(held_out_samples(data.data.root, data.data.val_split, args.limit, suffix))
    if not samples:
        raise EvalVLMError(f"{data.data.root}: no usable samples in split {data.data.val_split!r}")
    started = time.time()
    answers: list[dict] = []
    rows = evaluate(vlm, selectors, budgets, samples, args.batch_size, answers_out=answers)
    out = Path(args.out or f"eval_vlm/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    partial = f" (PARTIAL: --limit {args.limit})" if args.limit else ""
    title = f"{args.model}: {len(samples)} held-out samples of {data.data.root}/{data.data.val_split}{partial}"
    csv_path, md_path = write_table(rows, out, "results", title=title)
    plots = plot_metrics(rows, out)
    print("\n" + md_path.read_text())
    print(f"eval-vlm folder: {out} ({csv_path.name}, {md_path.name}, {len(plots)} plots; {time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
