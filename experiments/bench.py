"""Selector inference latency: ``make bench``.

    python -m tokensel.experiments.bench [--repeats 30] [--warmup 5] [--selectors a,b] [--encoder-max-images 8]

Times each selector's inference (score + top-K + gather, i.e. ``select``) at two VLM
geometries: LLaVA-1.5 (one 336 px image: 576 tokens x 1024) and LLaVA-NeXT (5 crops of 576
tokens, each selected per crop), at batch 1 and 32. Every baseline is timed, the merging ones
(``pool``, ``visionzip``) with their merge and the query-aware ``cdpruner`` from a given
instruction embedding (random, 768 wide): the text tower's own time is not in the figure. The figure is the median of ``--repeats``
timed runs after ``--warmup`` untimed ones: fp32 on the CPU, and bf16 autocast on a GPU when
CUDA is present (synchronised). Trained selectors are timed with random weights at their
default sizes (the latency does not depend on the weights): ``gumbel_ae`` (4-layer Feature
Selector; ``straight_through`` is the same network) and ``vp_noise`` (2-layer Scorer).

It also prints the ratio to the frozen encoder's forward time at the same geometry (open_clip
ViT-L-14-336, random init, the LLaVA encoder). On a CPU a batch of 32 (or 160 crops) takes
minutes, so at most ``--encoder-max-images`` images (4 on a CPU) are timed and the rest is
scaled linearly; such ratios are marked ``~``. Calls slower than 2 s get 3 timed runs instead of
``--repeats`` (the table says how many). The anchor to beat: AutoSelect's 0.69 ms for its Scorer plus top-K
(RTX A6000, batch 1, fp16).

Then the pruned VLM's prefill speed-up at each ``--prefill-budgets`` budget against all tokens,
on one LLaVA in the same run (``experiments/bench_prefill.py``): ``--prefill-model`` (default: the
small real LLaVA of ``make vlm``, built first when missing; ``--prefill-model ""`` skips it).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.common.errors import UsageError
from tokensel.datamodules.batch import FeatureDims
from tokensel.datamodules.encoders import build_encoder
from tokensel.experiments.bench_prefill import default_model, prefill_rows, prefill_table
from tokensel.selectors.budget import parse_budgets
from tokensel.selectors.catalog import (all_names, baseline_names, build_baseline, build_net, selector_entry,
                                        trained_names)
from tokensel.selectors.inference import SelectionContext

GEOMETRIES = {"llava15": 1, "llava_next": 5}  # crops of 576 tokens per image
TOKENS, WIDTH, GRID = 576, 1024, (24, 24)
JOINT_DIM = 768  # ViT-L/14-336's image-text embedding width: where a query-aware selector compares


SLOW_CALL_S = 2.0  # past this, one warm-up and MIN_REPEATS timed calls are enough
MIN_REPEATS = 3


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> tuple[float, int]:
    """Median wall time of ``fn`` in ms and the number of timed calls.

    Slow calls (over ``SLOW_CALL_S``, e.g. a 4-layer selector on 160 crops on a CPU) get one
    warm-up and ``MIN_REPEATS`` timed calls, so the benchmark ends in minutes, not hours.
    """
    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    first = timed()
    if first / 1000 > SLOW_CALL_S:
        warmup, repeats = 0, min(repeats, MIN_REPEATS)
    for _ in range(max(0, warmup - 1)):
        fn()
    times = [timed() for _ in range(repeats)]
    return statistics.median(times), len(times)


def build_selectors(names: list[str], device: torch.device) -> dict:
    """Every named selector at the LLaVA geometry: baselines as they are, trained objectives at
    their default config with random weights (``catalog.build_net``)."""
    dims = FeatureDims(TOKENS, WIDTH, GRID, 64)
    unknown = [n for n in names if n not in all_names()]
    if unknown:
        raise UsageError(f"--selectors: unknown {', '.join(unknown)}; choose from {', '.join(all_names())}")
    return {n: (build_baseline(n, GRID, seed=0) if n in baseline_names() else build_net(n, dims).to(device))
            for n in names}


def one_net_per_objective() -> list[str]:
    """Trained selector names, one per network class (``straight_through`` times the same network
    as ``gumbel_ae``)."""
    seen, names = set(), []
    for name in trained_names():
        module_cls = selector_entry(name).module_cls
        if module_cls not in seen:
            seen.add(module_cls)
            names.append(name)
    return names


class EncoderTimer:
    """Forward time of the LLaVA encoder (ViT-L/14-336, random init) per image count, cached;
    counts above ``max_images`` are timed at ``max_images`` and scaled linearly."""

    def __init__(self, max_images: int, warmup: int, repeats: int, device: torch.device, cuda: bool):
        self.encoder = build_encoder("open_clip:ViT-L-14-336", layer=-2, norm=False).to(device)
        self.max_images, self.warmup, self.repeats = max_images, warmup, repeats
        self.device, self.cuda = device, cuda
        self.cache: dict[int, float] = {}

    def __call__(self, images: int) -> tuple[float, bool]:
        timed = min(images, self.max_images)
        if timed not in self.cache:
            pixels = torch.randn(timed, 3, 336, 336, device=self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                self.cache[timed] = median_ms(lambda: self.encoder(pixels), self.warmup, self.repeats, self.cuda)[0]
        return self.cache[timed] * images / timed, timed < images


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--selectors", default="")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--keep", type=float, default=0.25, help="keep ratio of the timed top-K")
    parser.add_argument("--encoder-max-images", type=int, default=None,
                        help="encoder images actually timed (default: 4 on CPU, all on GPU)")
    parser.add_argument("--out", default=None, help="folder for bench.md (default: bench/<time>)")
    parser.add_argument("--prefill-model", default=None, help="VLM for the prefill table, any family (default: make vlm's; '' skips)")
    parser.add_argument("--prefill-budgets", default="0.111,0.25,0.5", help="kept image tokens: counts or keep ratios")
    parser.add_argument("--prefill-batch", type=int, default=8)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    names = [s for s in args.selectors.split(",") if s] or baseline_names() + one_net_per_objective()
    selectors = build_selectors(names, device)
    batches = [int(b) for b in args.batches.split(",")]
    max_images = args.encoder_max_images or (10**9 if cuda else 4)
    encoder_ms = EncoderTimer(max_images, args.warmup, args.repeats, device, cuda)
    precision = "bf16 autocast" if cuda else "fp32"
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"[bench] {where}, {precision}; median of {args.repeats} after {args.warmup} warm-up; keep {args.keep:.0%}",
          flush=True)
    lines = ["| geometry | batch | selector | select (ms) | timed runs | encoder forward (ms) | select / encoder |",
             "|---|---|---|---|---|---|---|"]
    for geometry, crops in GEOMETRIES.items():
        for batch in batches:
            enc_ms, scaled = encoder_ms(batch * crops)
            features = torch.randn(batch * crops, TOKENS, WIDTH, device=device)
            context = SelectionContext(cls_attention=torch.rand(batch * crops, TOKENS, device=device),
                                       instruction_embedding=torch.randn(batch * crops, JOINT_DIM, device=device),
                                       token_embedding=torch.randn(batch * crops, TOKENS, JOINT_DIM, device=device))
            for name, selector in selectors.items():
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    ms, runs = median_ms(lambda: selector.select(features, args.keep, context=context), args.warmup,
                                         args.repeats, cuda)
                ratio = f"{'~' if scaled else ''}{ms / enc_ms:.2%}"
                lines.append(f"| {geometry} ({crops}x{TOKENS}x{WIDTH}) | {batch} | {name} | {ms:.2f} | {runs} | "
                             f"{'~' if scaled else ''}{enc_ms:.0f} | {ratio} |")
                print(lines[-1], flush=True)
    note = (f"\n{where}, {precision}. `~`: encoder time scaled linearly from {max_images} timed images. "
            "Anchor: AutoSelect's Scorer + top-K, 0.69 ms (RTX A6000, batch 1, fp16).")
    if args.prefill_model != "":
        model = args.prefill_model or default_model()
        rows = prefill_rows(model, parse_budgets(args.prefill_budgets, "--prefill-budgets"), args.prefill_batch,
                            lambda fn, on_gpu: median_ms(fn, args.warmup, args.repeats, on_gpu))
        prefill = prefill_table(rows, model, args.prefill_batch, "bf16" if cuda else f"fp32, {where}")
        lines += prefill
        print("\n".join(prefill), flush=True)
    out_dir = Path(args.out or f"bench/{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n" + note + "\n")
    print(note)
    print(f"written: {out_dir / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
