"""What the converters share when reading a raw release: checked folders and json files, image
bytes with their extension, and the count of skipped samples.

A converter (``convert_<source>.py``) turns a raw layout into :data:`Record` s; ``convert.py``
writes them as shards. A wrong folder or json is a :class:`ShardFormatError` naming the path; a
single missing or unreadable image is skipped, counted and warned about. An image is a file, or
bytes held inside the release (:class:`EmbeddedImage`: a parquet cell).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

from tokensel.datamodules.shards import ShardFormatError, encode_image

log = logging.getLogger("tokensel.datamodules.convert")


@dataclass(frozen=True)
class EmbeddedImage:
    """Image bytes stored inside a release (a parquet cell); ``where`` names the file and row."""

    data: Optional[bytes]
    where: str

    def __str__(self) -> str:
        return self.where


# One sample of a raw release: its key, its image (a file or embedded bytes) and its shard json
# (without width/height).
Record = tuple[str, Union[Path, EmbeddedImage], dict]

# PIL format name -> shard extension, for images stored as they came.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}
# Modes PNG can hold; anything else is converted to RGB before re-encoding.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


class Skips:
    """Samples left out of a conversion, counted by reason; the first few are warned about."""

    def __init__(self, max_warnings: int = 10):
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}  # reason -> the first sample skipped for it
        self.max_warnings = max_warnings

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, detail)
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


def read_image(path: Union[Path, EmbeddedImage], skips: Skips) -> tuple[bytes, str, int, int] | None:
    """The bytes, shard extension, width and height of an image, or None if it is unusable.

    JPEG and PNG images are stored byte for byte, with the extension of their actual format (a
    PNG named ``.jpg`` is stored as ``png``); other formats are re-encoded as PNG. The image is
    fully decoded once, so truncated files are caught here rather than in training. Missing
    and unreadable images are counted in ``skips``.
    """
    if isinstance(path, EmbeddedImage):
        data = path.data
        if not data:
            skips.add("missing image", str(path))
            return None
    else:
        try:
            data = path.read_bytes()
        except OSError:
            skips.add("missing image", str(path))
            return None
    try:
        with Image.open(io.BytesIO(data)) as image:
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
