"""The default stand-in corpus: small, deterministic, generated, in the shard format.

``make data`` runs ``python -m tokensel.datamodules.synthetic --out data/default``. It writes a
train and a held-out ``val`` split for all three sources through :class:`ShardWriter`, so the
shards obey the same schema and ``index.json`` as converted real data:

- **coco** stands in for COCO captions: 224x224 JPEG scenes of 1-4 flat shapes (circles,
  squares, triangles, stars, ...) of named colours on a plain or gradient background, each
  with 3-5 templated captions ("a red circle and a blue square on a green background").
  It is *not* a natural-image corpus: no textures, occlusion, or open vocabulary.
- **docvqa** stands in for DocVQA: 320x416 PNG pages with a title, form fields
  ("Invoice No: INV-4821", "Total: $1,234.50"), filler text and sometimes a table of items,
  with a question whose answer is printed on the page and its pixel ``answer_box``.
  It is *not* scanned paper: no noise, skew, handwriting, or multi-column layouts.
- **chartqa** stands in for ChartQA: 320x240 PNG bar or line charts (matplotlib) of 3-7
  labelled categories with the values printed, a question about one plotted value or the
  largest category, and the pixel ``answer_box`` of the printed answer. It is *not* real
  charts: no legends, stacked series, or questions that need arithmetic.
- **vqav2** (off by default: ``--train-vqav2``, ``--val-vqav2``) stands in for VQAv2 where the
  evidence is local: 224x224 JPEG scenes of 2-4 shapes of distinct shapes and colours, asking the
  colour of one shape ("What colour is the star?"), with that shape's box as ``answer_box``. The
  printed answers of docvqa and chartqa cannot be read from a ViT-S/14's tokens at 224 px; a
  shape's colour can, so a teacher's loss on these questions depends on which tokens are kept.
  It is *not* VQAv2: one question type, twelve answers, no natural images.

Every sample is generated from its own RNG seeded by (seed, split, source, index), so the
same seed gives the same samples whatever the number of worker processes, and the same
shard contents. The generation parameters are stored in ``<out>/synthetic.json``; the CLI
skips the work when the corpus on disk already matches them.

The renderers live in ``synthetic_render.py`` (scenes, pages) and ``synthetic_chart.py`` (charts);
this module generates the corpus from them and is its command line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Mapping

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.datamodules.shards import ShardFormatError, ShardIndex, ShardWriter
from tokensel.datamodules.synthetic_chart import make_chartqa
from tokensel.datamodules.synthetic_render import (GENERATOR, GENERATOR_VERSION, Sample, make_coco, make_docvqa,
                                                   make_vqav2)

PARAMS_NAME = "synthetic.json"
DEFAULT_TRAIN = {"coco": 768, "docvqa": 256, "chartqa": 256, "vqav2": 0}
DEFAULT_VAL = {"coco": 64, "docvqa": 64, "chartqa": 64, "vqav2": 0}
DEFAULT_SHARD_SAMPLES = 128

MAKERS = {"coco": make_coco, "docvqa": make_docvqa, "chartqa": make_chartqa, "vqav2": make_vqav2}
GENERATED = tuple(MAKERS)  # the sources this corpus stands in for


def make_sample(task: tuple[str, int, str, int]) -> Sample:
    """Generate one sample from (source, seed, split, index); the unit of work for the pool."""
    source, seed, split, index = task
    return MAKERS[source](seed, split, index)


def corpus_params(seed: int, train: Mapping[str, int], val: Mapping[str, int], max_samples_per_shard: int) -> dict:
    """Everything that determines the corpus bytes; stored in ``synthetic.json``."""
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "splits": {
            "train": {s: int(train.get(s, 0)) for s in GENERATED},
            "val": {s: int(val.get(s, 0)) for s in GENERATED},
        },
        "max_samples_per_shard": max_samples_per_shard,
    }


def read_params(out: str | os.PathLike) -> dict | None:
    """The stored parameters of a complete corpus under ``out``, or None if there is none."""
    out = Path(out)
    try:
        params = json.loads((out / PARAMS_NAME).read_text())
        index = ShardIndex.load(out)
        for split, counts in params["splits"].items():
            wanted = {source: n for source, n in counts.items() if n}
            if wanted and (index.counts(split) != wanted or not index.shards(split)):
                return None
    except (OSError, ValueError, KeyError, TypeError):  # ShardFormatError is a ValueError
        return None
    return params


def generate_corpus(
    out: str | os.PathLike,
    seed: int = 0,
    train: Mapping[str, int] | None = None,
    val: Mapping[str, int] | None = None,
    max_samples_per_shard: int = DEFAULT_SHARD_SAMPLES,
    workers: int | None = None,
) -> ShardIndex:
    """Generate the corpus under ``out`` and return its index.

    ``train`` and ``val`` map a source to its sample count (None: the defaults; a source left
    out of a given mapping gets no samples). ``workers`` is the number of processes (None: up
    to 2; 1 or 0: in this process); the output does not depend on it. Only the train and val
    shards of the three sources are replaced, other entries of an existing index are kept.
    """
    train = DEFAULT_TRAIN if train is None else train
    val = DEFAULT_VAL if val is None else val
    for name, counts in (("train", train), ("val", val)):
        unknown = set(counts) - set(GENERATED)
        if unknown or any(int(n) < 0 for n in counts.values()):
            raise ShardFormatError(f"{name} counts {dict(counts)!r}: expected non-negative counts for {GENERATED}")
    if max_samples_per_shard <= 0:
        raise ShardFormatError(f"max_samples_per_shard={max_samples_per_shard} must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = corpus_params(seed, train, val, max_samples_per_shard)
    (out / PARAMS_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete

    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        for split, counts in params["splits"].items():
            for source, count in counts.items():
                tasks = [(source, seed, split, i) for i in range(count)]
                samples = pool.imap(make_sample, tasks, chunksize=8) if pool else map(make_sample, tasks)
                # ShardWriter replaces this (split, source)'s old shards even when count is 0.
                with ShardWriter(out, split, source, max_samples=max_samples_per_shard) as writer:
                    for key, image, ext, meta in samples:
                        writer.write(key, image, ext, meta)
    finally:
        if pool is not None:
            pool.terminate()  # every result is consumed by now, unless we are here on an error
            pool.join()

    (out / PARAMS_NAME).write_text(json.dumps(params, indent=1) + "\n")
    return ShardIndex.load(out)


def ensure_default_corpus(out: str | os.PathLike) -> Path:
    """Return ``out``, generating the default corpus there first if no complete corpus exists.

    A complete corpus already under ``out`` is used as it is, whatever its parameters. Call it
    from one process only (e.g. in ``prepare_data``): concurrent calls would race.
    """
    out = Path(out)
    if read_params(out) is None:
        generate_corpus(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m tokensel.datamodules.synthetic",
        description="Generate the deterministic stand-in corpus (coco, docvqa, chartqa) as shards.",
    )
    parser.add_argument("--out", required=True, help="dataset root to write (index.json, train/, val/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-coco", type=int, default=DEFAULT_TRAIN["coco"])
    parser.add_argument("--train-docvqa", type=int, default=DEFAULT_TRAIN["docvqa"])
    parser.add_argument("--train-chartqa", type=int, default=DEFAULT_TRAIN["chartqa"])
    parser.add_argument("--train-vqav2", type=int, default=DEFAULT_TRAIN["vqav2"],
                        help="scene questions with local evidence (off by default)")
    parser.add_argument("--val-per-source", type=int, default=DEFAULT_VAL["coco"], help="for coco, docvqa and chartqa")
    parser.add_argument("--val-vqav2", type=int, default=DEFAULT_VAL["vqav2"])
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="samples per shard")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the corpus is up to date")
    args = parser.parse_args(argv)

    train = {"coco": args.train_coco, "docvqa": args.train_docvqa, "chartqa": args.train_chartqa,
             "vqav2": args.train_vqav2}
    val = {"coco": args.val_per_source, "docvqa": args.val_per_source, "chartqa": args.val_per_source,
           "vqav2": args.val_vqav2}
    params = corpus_params(args.seed, train, val, args.shard_samples)
    if not args.force and read_params(args.out) == params:
        print(f"{args.out}: corpus already generated with these parameters (use --force to regenerate)")
        return 0

    start = time.perf_counter()
    index = generate_corpus(args.out, args.seed, train, val, args.shard_samples, args.workers)
    for split in params["splits"]:
        counts = index.counts(split)
        detail = ", ".join(f"{s} {counts.get(s, 0)}" for s in GENERATED if params["splits"][split][s])
        shards = len(index.splits.get(split, []))
        print(f"{split}: {sum(counts.values())} samples ({detail}) in {shards} shard(s) -> {Path(args.out) / split}")
    print(f"generated in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
