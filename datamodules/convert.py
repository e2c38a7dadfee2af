"""Convert a benchmark's raw release into shards.

    python -m tokensel.datamodules.convert coco    /data/coco     data/real --split val
    python -m tokensel.datamodules.convert textvqa /data/textvqa  data/real --split val
    python -m tokensel.datamodules.convert textvqa /data/lmms-lab-textvqa data/real --split validation --out-split val

The benchmark's entry in :data:`~tokensel.datamodules.benchmarks.BENCHMARKS` names its converter
module, which reads one raw layout into ``(key, image, meta)`` records: the benchmark's own release
(``records``), or lmms-lab's parquet release (``PARQUET``, read when ``SRC`` holds parquet files).
:func:`convert` writes the records through :class:`ShardWriter` into one dataset root, so one
``index.json`` lists every (split, source). A wrong folder, file or column is a
:class:`ShardFormatError` naming it; a missing or unreadable image is skipped, counted and warned
about, and a conversion that is left with no sample at all fails in one line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterable

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.datamodules.benchmarks import BENCHMARKS, Benchmark
from tokensel.datamodules.parquet_layout import holds_parquet, parquet_records
from tokensel.datamodules.raw_layout import Record, Skips, log, read_image
from tokensel.datamodules.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_SHARD_SAMPLES,
    ShardEntry,
    ShardFormatError,
    ShardWriter,
    sanitize_key,
)


def records_of(benchmark: Benchmark, src: Path, split: str, skips: Skips, **options) -> Iterable[Record]:
    """The records of ``split`` of ``benchmark``'s release under ``src``: lmms-lab's parquet files
    when ``src`` holds them, else the benchmark's own layout. The whole layout is checked here."""
    module = benchmark.converter_module()
    if holds_parquet(src):
        layout = getattr(module, "PARQUET", None)
        if layout is None:
            raise ShardFormatError(f"{src}: holds parquet files, but {benchmark.name} is read from its own "
                                   "release only")
        if options:
            raise ShardFormatError(f"{src}: a parquet release takes no {', '.join(options)}")
        log.info("%s/%s: reading lmms-lab's parquet release in %s", benchmark.name, split, src)
        return parquet_records(src, split, layout, benchmark.name, skips)
    return module.records(src, split, skips, **options)


def converter_options() -> dict[str, list[tuple[str, str]]]:
    """Option -> ``(benchmark, help)`` of each converter that takes it: a converter module's
    ``OPTIONS`` maps the keywords its ``records`` takes (as strings) to their help."""
    declared: dict[str, list[tuple[str, str]]] = {}
    for name in BENCHMARKS:
        for option, text in getattr(BENCHMARKS.get(name).converter_module(), "OPTIONS", {}).items():
            declared.setdefault(option, []).append((name, text))
    return declared


def convert(
    source: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    limit: int | None = None,
    skips: Skips | None = None,
    out_split: str | None = None,
    **options,
) -> list[ShardEntry]:
    """Convert ``split`` of the raw ``source`` release under ``src`` into shards under ``out``, in
    the split ``out_split`` (default: ``split``).

    ``options`` go to the converter's ``records`` (its ``OPTIONS``; docvqa: ``annotations``, the
    json to read). Pass ``skips`` to learn how many samples were left out and why.
    """
    benchmark = BENCHMARKS.get(source)
    skips = Skips() if skips is None else skips
    # The whole raw layout is checked before the writer opens: it replaces this (split, source)'s old shards.
    records = records_of(benchmark, Path(src), split, skips, **options)
    return write_shards(records, out, out_split or split, source, max_bytes, max_samples, limit, skips)


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
    If there were records and not one was usable, nothing is replaced and a ``ShardFormatError``
    says why, with the first sample skipped for each reason.
    """
    if limit is not None and limit < 0:
        raise ShardFormatError(f"limit={limit} must be non-negative")
    seen: set[str] = set()
    read = 0
    with ShardWriter(out, split, source, max_bytes=max_bytes, max_samples=max_samples) as writer:
        for key, path, meta in records:
            if limit is not None and writer.total >= limit:
                break
            read += 1
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
        if read and not writer.total:
            why = "; ".join(f"{n} {reason}, first {skips.first[reason]}" for reason, n in skips.counts.most_common())
            raise ShardFormatError(f"{source}/{split}: no usable sample among {read} ({why}); nothing written")
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
        description="Convert a benchmark's raw release (its own layout, or lmms-lab's parquet files) into shards.",
    )
    parser.add_argument("source", choices=BENCHMARKS.names())
    parser.add_argument("src", type=Path, help="the raw dataset folder")
    parser.add_argument("out", type=Path, help="dataset root to write into (shards + index.json)")
    parser.add_argument("--split", default="train", help="split to convert, e.g. train, val, test (default: train)")
    parser.add_argument("--out-split", default=None,
                        help="the split to write it as, e.g. val for lmms-lab's validation (default: --split)")
    parser.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20)
    parser.add_argument("--max-shard-samples", type=int, default=DEFAULT_MAX_SHARD_SAMPLES)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    declared = converter_options()
    for option, users in declared.items():
        only = " only" if len(users) == 1 else ""
        parser.add_argument(f"--{option}", default=None, help="; ".join(f"{b}{only}: {text}" for b, text in users))
    args = parser.parse_args(argv)
    options = {}
    for option, users in declared.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.source not in (b for b, _ in users):
            parser.error(f"--{option} is only used with {', '.join(b for b, _ in users)}")
        options[option] = value
    log_to_terminal()

    skips = Skips()
    try:
        entries = convert(
            args.source, args.src, args.out, split=args.split, max_bytes=int(args.max_shard_mb * 2**20),
            max_samples=args.max_shard_samples, limit=args.limit, skips=skips, out_split=args.out_split, **options,
        )
    except OSError as err:  # an unwritable OUT is a user mistake too: one line, no traceback
        raise ShardFormatError(str(err)) from None
    samples = sum(e.count for e in entries)
    split = args.out_split or args.split
    print(
        f"{args.source}/{split}: wrote {samples} samples in {len(entries)} shard(s) to "
        f"{args.out / split} (index {args.out / 'index.json'}); {skips}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
