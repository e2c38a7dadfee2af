"""Convert a benchmark's raw release into shards.

    python -m tokensel.datamodules.convert coco    /data/coco    data/real --split val
    python -m tokensel.datamodules.convert docvqa  /data/docvqa  data/real --split train
    python -m tokensel.datamodules.convert chartqa /data/ChartQA data/real --split test

The benchmark's entry in :data:`~tokensel.datamodules.benchmarks.BENCHMARKS` names its converter
module, whose ``records`` reads the benchmark's raw layout into ``(key, image path, meta)`` records;
:func:`convert` writes them through :class:`ShardWriter` into one dataset root, so one
``index.json`` lists every (split, source). A wrong folder is a :class:`ShardFormatError` naming
the path; a single missing or unreadable image is skipped, counted and warned about.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.datamodules.benchmarks import BENCHMARKS, Benchmark
from tokensel.datamodules.raw_layout import Record, Skips, read_image
from tokensel.datamodules.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_SHARD_SAMPLES,
    ShardEntry,
    ShardFormatError,
    ShardWriter,
    sanitize_key,
)

# Per-benchmark options of the command line: flag -> keyword of the converter's ``records``.
OPTIONS = {"--annotations": "annotations"}


def records_of(benchmark: Benchmark, src: Path, split: str, skips: Skips, **options) -> Iterable[Record]:
    """The records of ``split`` of ``benchmark``'s release under ``src``; the whole layout is checked here."""
    return benchmark.converter_module().records(src, split, skips, **options)


def option_names(benchmark: Benchmark) -> list[str]:
    """The keyword options of ``benchmark``'s converter (``records(src, split, skips, **options)``)."""
    params = list(inspect.signature(benchmark.converter_module().records).parameters)
    return params[3:]


def convert(
    source: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    limit: int | None = None,
    skips: Skips | None = None,
    **options,
) -> list[ShardEntry]:
    """Convert ``split`` of the raw ``source`` release under ``src`` into shards under ``out``.

    ``options`` go to the converter's ``records`` (docvqa: ``annotations``, the json to read).
    Pass ``skips`` to learn how many samples were left out and why.
    """
    benchmark = BENCHMARKS.get(source)
    skips = Skips() if skips is None else skips
    # The whole raw layout is checked before the writer opens: it replaces this (split, source)'s old shards.
    records = records_of(benchmark, Path(src), split, skips, **options)
    return write_shards(records, out, split, source, max_bytes, max_samples, limit, skips)


def write_shards(
    records: Iterable[Record],
    out: str | os.PathLike,
    split: str,
    source: str,
    max_bytes: int,
    max_samples: int,
    limit: int | None,
    skips: Skips,
) -> list[ShardEntry]:
    """Write the records of one (split, source) as shards under ``out``.

    Each image goes through :func:`read_image` and its ``width``/``height`` are added to the
    meta; unusable images and repeated keys are skipped. Writing stops after ``limit`` samples.
    """
    if limit is not None and limit < 0:
        raise ShardFormatError(f"limit={limit} must be non-negative")
    seen: set[str] = set()
    with ShardWriter(out, split, source, max_bytes=max_bytes, max_samples=max_samples) as writer:
        for key, path, meta in records:
            if limit is not None and writer.total >= limit:
                break
            clean = sanitize_key(key)  # the key as stored
            if clean in seen:
                skips.add("duplicate key", f"{key} ({path})")
                continue
            image = read_image(path, skips)
            if image is None:
                continue
            data, ext, width, height = image
            writer.write(key, data, ext, {**meta, "width": width, "height": height})
            seen.add(clean)
    return writer.entries


def log_to_terminal() -> None:
    """Notes (which file was read) on stdout; warnings on stderr as ``warning: ...``."""
    notes = logging.StreamHandler(sys.stdout)
    notes.addFilter(lambda record: record.levelno < logging.WARNING)
    notes.setFormatter(logging.Formatter("%(message)s"))
    alerts = logging.StreamHandler(sys.stderr)
    alerts.setLevel(logging.WARNING)
    alerts.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[notes, alerts])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m tokensel.datamodules.convert",
        description="Convert a benchmark's raw release into tokensel shards.",
    )
    parser.add_argument("source", choices=BENCHMARKS.names())
    parser.add_argument("src", type=Path, help="the raw dataset folder")
    parser.add_argument("out", type=Path, help="dataset root to write into (shards + index.json)")
    parser.add_argument("--split", default="train", help="split to convert, e.g. train, val, test (default: train)")
    parser.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20)
    parser.add_argument("--max-shard-samples", type=int, default=DEFAULT_MAX_SHARD_SAMPLES)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="docvqa only: the annotation json (default: the first of SPLIT_v1.0_withQT.json "
                             "and SPLIT_v1.0.json found in SRC or SRC/SPLIT)")
    args = parser.parse_args(argv)
    benchmark = BENCHMARKS.get(args.source)
    accepted = option_names(benchmark)
    options = {}
    for flag, name in OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            users = [b for b in BENCHMARKS.names() if name in option_names(BENCHMARKS.get(b))]
            parser.error(f"{flag} is only used with {', '.join(users)}")
        options[name] = value
    log_to_terminal()

    skips = Skips()
    try:
        entries = convert(
            args.source, args.src, args.out, split=args.split, max_bytes=int(args.max_shard_mb * 2**20),
            max_samples=args.max_shard_samples, limit=args.limit, skips=skips, **options,
        )
    except OSError as err:  # an unwritable OUT is a user mistake too: one line, no traceback
        raise ShardFormatError(str(err)) from None
    samples = sum(e.count for e in entries)
    print(
        f"{args.source}/{args.split}: wrote {samples} samples in {len(entries)} shard(s) to "
        f"{args.out / args.split} (index {args.out / 'index.json'}); {skips}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
