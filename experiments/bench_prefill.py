"""The pruned VLM's prefill speed-up, measured: the second table of ``make bench``.

One VLM of any family of ``vlms/`` (default: the small real LLaVA of ``make vlm``), the same
prompts, one run: the language model's prefill (the whole prompt's forward with a KV cache, no
generation) is timed with all of the image's tokens and with K of them kept (``VLMFamily.prune``
with the ``uniform`` baseline: the time does not depend on which K). Beside each measured speed-up is
the ideal one, the ratio of the prompt's LLM FLOPs (``experiments/flops.llm_flops`` over every
prompt token, image and text: ``4nd^2 + 2n^2d + 3ndm`` per layer, the gated FFN of LLaMA-family
LLMs), and measured / ideal. bf16 on a GPU (synchronised, ``bench.median_ms``), fp32 on a
CPU; the median of ``make bench``'s ``--repeats`` timed prefills after its ``--warmup``. The vision tower,
the selector and the projector are outside the timed region (their cost is the first table's).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tokensel.experiments.flops import llm_flops
from tokensel.experiments.vlm_build import ensure_vlm
from tokensel.selectors.catalog import selector_for
from tokensel.vlms import open_vlm

QUESTION = "What is the value shown for 2017?"


def prefill_rows(model: str, budgets: list, batch: int, timer, log=print) -> list[dict]:
    """One row per budget (``None``: all tokens, first), each timed on the same ``batch`` prompts;
    ``timer(fn, cuda)`` -> (median ms, timed runs) is ``make bench``'s."""
    cuda = torch.cuda.is_available()
    vlm = open_vlm(model, precision="bf16" if cuda else "32", label="--prefill-model")
    if cuda:
        vlm.model.to("cuda")
    text = vlm.model.config.text_config
    d, m, layers = int(text.hidden_size), int(text.intermediate_size), int(text.num_hidden_layers)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    _, uniform = selector_for("uniform", vlm.selection_grid)
    rows = []
    for budget in [None, *budgets]:
        pruned = vlm.prune(images, [QUESTION] * batch, None if budget is None else uniform, budget)
        with torch.inference_mode():
            ms, runs = timer(lambda: vlm.model(**pruned.inputs, use_cache=True), cuda)
        prompt = int(pruned.inputs["attention_mask"].shape[1])
        k = max(pruned.image_tokens)  # the same image size for every prompt: one count
        rows.append({"budget": "all" if budget is None else str(budget), "image_tokens": k, "prompt_tokens": prompt,
                     "prefill_ms": ms, "runs": runs, "flops": llm_flops(prompt, d, m, layers, ffn_matrices=3)})
        log(f"[bench] prefill {model}: {k} image tokens, {prompt}-token prompts x {batch}: {ms:.1f} ms", flush=True)
    for row in rows:
        row["speedup"] = rows[0]["prefill_ms"] / row["prefill_ms"]
        row["ideal"] = rows[0]["flops"] / row["flops"]
    return rows


def prefill_table(rows: list[dict], model: str, batch: int, where: str) -> list[str]:
    lines = [f"\nPrefill of {model} (batch {batch}, {where}):\n",
             "| budget | image tokens | prompt tokens | prefill (ms) | timed runs | speed-up | ideal (FLOPs) | measured / ideal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['image_tokens']} | {r['prompt_tokens']} | {r['prefill_ms']:.1f} | "
                     f"{r['runs']} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['speedup'] / r['ideal']:.2f} |")
    return lines


def default_model() -> str:
    """``make vlm``'s folder, built first when there is none."""
    return str(ensure_vlm())
