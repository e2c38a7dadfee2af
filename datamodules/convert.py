"""Convert the raw COCO / DocVQA / ChartQA releases into shards.

    python -m tokensel.datamodules.convert coco    /data/coco    data/real --split val
    python -m tokensel.datamodules.convert docvqa  /data/docvqa  data/real --split train
    python -m tokensel.datamodules.convert chartqa /data/ChartQA data/real --split test

All three write into the same dataset root through :class:`ShardWriter`, so one ``index.json``
lists every (split, source). This module also holds the small helpers the three converters
share: checked paths and json, image bytes with their extension, and the count of skipped
samples. A wrong folder is a :class:`ShardFormatError` naming the path; a single missing or
unreadable image is skipped, counted and warned about.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from tokensel.datamodules.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_SHARD_SAMPLES,
    ShardEntry,
    ShardFormatError,
    ShardWriter,
    encode_image,
    sanitize_key,
)

log = logging.getLogger("tokensel.datamodules.convert")

# PIL format name -> shard extension, for images stored as they came.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}
# Modes PNG can hold; anything else is converted to RGB before re-encoding.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


class Skips:
    """Samples left out of a conversion, counted by reason; the first few are warned about."""

    def __init__(self, max_warnings: int = 10):
        self.counts: Counter[str] = Counter()
        self.max_warnings = max_warnings

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        total = self.total
        if total <= self.max_warnings:
            log.warning("skipped (%s): %s", reason, detail)
        elif total == self.max_warnings + 1:
            log.warning("more samples skipped; counting them without further warnings")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "skipped 0"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} ({reasons})"


def require_dir(path: Path, expected: str) -> Path:
    """``path`` if it is a folder, else a ``ShardFormatError`` saying what should be there."""
    if not path.is_dir():
        raise ShardFormatError(f"{path}: no such folder; expected {expected}")
    return path


def load_json(path: Path, expected: str) -> Any:
    """Parse a json file, or raise a ``ShardFormatError`` naming it and what it should hold."""
    if not path.is_file():
        raise ShardFormatError(f"{path}: no such file; expected {expected}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ShardFormatError(f"{path}: unreadable json ({err}); expected {expected}") from None


def bad_shape(path: Path, what: str) -> ShardFormatError:
    """The error for a json file that parsed but is not the expected shape."""
    return ShardFormatError(f"{path}: not the expected layout; {what}")


def read_image(path: Path, skips: Skips) -> tuple[bytes, str, int, int] | None:
    """The bytes, shard extension, width and height of an image file, or None if it is unusable.

    JPEG and PNG files are stored byte for byte, with the extension of their actual format (a
    PNG named ``.jpg`` is stored as ``png``); other formats are re-encoded as PNG. The image is
    fully decoded once, so truncated files are caught here rather than in training. Missing
    and unreadable files are counted in ``skips``.
    """
    try:
        data = path.read_bytes()
    except OSError:
        skips.add("missing image", str(path))
        return None
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            ext = STORED_FORMATS.get(image.format)
            if ext is None:
                ext = "png"
                data = encode_image(image if image.mode in PNG_MODES else image.convert("RGB"), "png")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        skips.add("unreadable image", f"{path} ({err})")
        return None
    return data, ext, width, height


def write_shards(
    records: list[tuple[str, Path, dict]],
    out: str | os.PathLike,
    split: str,
    source: str,
    max_bytes: int,
    max_samples: int,
    limit: int | None,
    skips: Skips,
) -> list[ShardEntry]:
    """Write ``(key, image path, meta)`` records of one (split, source) as shards under ``out``.

    Each image goes through :func:`read_image` and its ``width``/``height`` are added to the
    meta; unusable images and repeated keys are skipped. Writing stops after ``limit``
    samples. Callers check the whole raw layout *before* calling this, because the writer
    replaces the old shards of this (split, source) as soon as it opens.
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


def main(argv: list[str] | None = None) -> int:
    # Imported here: the converters import the helpers above from this module.
    from tokensel.datamodules.convert_chartqa import convert_chartqa
    from tokensel.datamodules.convert_coco import convert_coco
    from tokensel.datamodules.convert_docvqa import convert_docvqa

    parser = argparse.ArgumentParser(
        prog="python -m tokensel.datamodules.convert",
        description="Convert a raw COCO 2017 / DocVQA / ChartQA release into tokensel shards.",
    )
    parser.add_argument("source", choices=("coco", "docvqa", "chartqa"))
    parser.add_argument("src", type=Path, help="the raw dataset folder")
    parser.add_argument("out", type=Path, help="dataset root to write into (shards + index.json)")
    parser.add_argument("--split", default="train", help="split to convert, e.g. train, val, test (default: train)")
    parser.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20)
    parser.add_argument("--max-shard-samples", type=int, default=DEFAULT_MAX_SHARD_SAMPLES)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="docvqa only: the annotation json (default: SRC/SPLIT/SPLIT_v1.0.json)")
    args = parser.parse_args(argv)
    if args.annotations is not None and args.source != "docvqa":
        parser.error("--annotations is only used with docvqa")
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)

    skips = Skips()
    common = dict(
        split=args.split,
        max_bytes=int(args.max_shard_mb * 2**20),
        max_samples=args.max_shard_samples,
        limit=args.limit,
        skips=skips,
    )
    try:
        if args.source == "coco":
            entries = convert_coco(args.src, args.out, **common)
        elif args.source == "docvqa":
            entries = convert_docvqa(args.src, args.out, annotations=args.annotations, **common)
        else:
            entries = convert_chartqa(args.src, args.out, **common)
    except (ShardFormatError, OSError) as err:  # a wrong path or an unwritable OUT: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples = sum(e.count for e in entries)
    print(
        f"{args.source}/{args.split}: wrote {samples} samples in {len(entries)} shard(s) to "
        f"{args.out / args.split} (index {args.out / 'index.json'}); {skips}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
