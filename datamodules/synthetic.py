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
- **vqav2** (off by default; ``--preset scenes`` and ``data.corpus=scenes`` have only these) stands
  in for VQAv2 where the evidence is local: 224x224 JPEG scenes of 2-4 shapes of distinct shapes
  and colours, asking the colour of one shape ("What colour is the star?"), with that shape's box
  as ``answer_box``. No teacher measured on docvqa and chartqa rewards keeping their printed
  answers' tokens (hypothesis: a ViT-S/14 at 224 px does not resolve the print); on these scenes
  the corpus teacher's loss does depend on keeping the asked shape's tokens.
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
from tokensel.datamodules.config import data_root
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
# --preset and data.corpus: (train, val) counts. "scenes": the scene questions alone, on which the corpus
# teacher's loss depends on the answer's tokens (vp_noise's laptop default, experiments/vp_noise.yaml).
PRESETS = {"default": (DEFAULT_TRAIN, DEFAULT_VAL), "scenes": ({"vqav2": 3072}, {"vqav2": 128})}


def make_sample(task: tuple[str, int, str, int]) -> Sample:
    """Generate one sample from (source, seed, split, index); the unit of work for the pool."""
    source, seed, split, index = task
    return MAKERS[source](seed, split, index)


def corpus_params(seed: int, train: Mapping[str, int], val: Mapping[str, int], max_samples_per_shard: int) -> dict:
    """Everything that determines the corpus bytes; stored in ``synthetic.json``. A source with no
    sample in either split is left out, so that a new source leaves existing corpora up to date."""
    counts = {"train": {s: int(train.get(s, 0)) for s in GENERATED}, "val": {s: int(val.get(s, 0)) for s in GENERATED}}
    present = [s for s in GENERATED if counts["train"][s] or counts["val"][s]]
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "splits": {split: {s: by_source[s] for s in present} for split, by_source in counts.items()},
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
    shards of the generated sources are replaced, other entries of an existing index are kept.
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
        for split, counts in (("train", train), ("val", val)):
            for source in GENERATED:
                tasks = [(source, seed, split, i) for i in range(int(counts.get(source, 0)))]
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


def ensure_corpus(out: str | os.PathLike, preset: str = "default", log=None) -> Path:
    """Return ``out``, generating the ``preset`` corpus there first if no complete corpus exists
    (saying so through ``log``, when given).

    A complete corpus already under ``out`` is used as it is, whatever its parameters. Call it
    from one process only (e.g. in ``prepare_data``): concurrent calls would race.
    """
    out = Path(out)
    if read_params(out) is None:
        if log is not None:
            log(f"no data.root given: generating the {preset!r} corpus in {out}/ (once)", flush=True)
        train, val = PRESETS[preset]
        generate_corpus(out, train=train, val=val)
    return out


def ensure_data(data, log=print) -> Path:
    """The shards' folder of ``data`` (a ``DataConfig``): ``data.root`` as given, else the generated
    corpus ``data/<data.corpus>``, generated first when it is not there (one process only)."""
    return data_root(data) if data.root else ensure_corpus(data_root(data), data.corpus, log)


def preset_counts(args) -> tuple[dict, dict]:
    """(train, val) sample counts per source: ``--preset``'s, then ``--val-per-source`` for every
    source with training samples, then each ``--train-<source>`` / ``--val-<source>``."""
    train, val = (dict(counts) for counts in PRESETS[args.preset])
    for source in GENERATED:
        given = getattr(args, f"train_{source}")
        train[source] = train.get(source, 0) if given is None else given
    if args.val_per_source is not None:
        val = {source: args.val_per_source if train[source] else 0 for source in GENERATED}
    for source in GENERATED:
        given = getattr(args, f"val_{source}")
        val[source] = val.get(source, 0) if given is None else given
    return train, val


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m tokensel.datamodules.synthetic",
        description="Generate the deterministic stand-in corpus (coco, docvqa, chartqa; vqav2 scenes) as shards.",
    )
    parser.add_argument("--out", required=True, help="dataset root to write (index.json, train/, val/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="sample counts: 'default' (coco, docvqa, chartqa) or 'scenes' (vqav2 scene questions only)")
    parser.add_argument("--seed", type=int, default=0)
    for source in GENERATED:
        parser.add_argument(f"--train-{source}", type=int, default=None, help="training samples (default: the preset's)")
    parser.add_argument("--val-per-source", type=int, default=None, help="held-out samples of every source that has training samples")
    for source in GENERATED:
        parser.add_argument(f"--val-{source}", type=int, default=None, help="held-out samples (default: the preset's)")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="samples per shard")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the corpus is up to date")
    args = parser.parse_args(argv)

    train, val = preset_counts(args)
    params = corpus_params(args.seed, train, val, args.shard_samples)
    if not args.force and read_params(args.out) == params:
        print(f"{args.out}: corpus already generated with these parameters (use --force to regenerate)")
        return 0

    start = time.perf_counter()
    index = generate_corpus(args.out, args.seed, train, val, args.shard_samples, args.workers)
    for split in params["splits"]:
        counts = index.counts(split)
        detail = ", ".join(f"{s} {counts.get(s, 0)}" for s in GENERATED if params["splits"][split].get(s))
        shards = len(index.splits.get(split, []))
        print(f"{split}: {sum(counts.values())} samples ({detail}) in {shards} shard(s) -> {Path(args.out) / split}")
    print(f"generated in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
