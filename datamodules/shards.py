"""The shard format: one schema, one writer, one index.

A shard is a webdataset tar. One sample is three members sharing a ``__key__``:

- ``<key>.jpg`` or ``<key>.png``: the image bytes, stored as they came (never re-encoded);
- ``<key>.json``: the metadata below, UTF-8.

The json holds:

- ``source``: a benchmark's name in ``benchmarks.BENCHMARKS`` (``coco``, ``docvqa``, ``textvqa``, ...);
- the text, by the benchmark's kind: ``captions: [str, ...]`` (caption), or ``question: str`` +
  ``answers: [str, ...]`` (question);
- ``answer_box: [x0, y0, x1, y1]`` (optional), in the stored image's pixels;
- ``width``, ``height``: the stored image's size;
- ``provenance``: where the sample came from (original file and id).

Every dataset root has an ``index.json`` listing its shards with their sample counts::

    {"format": "tokensel-shards/1",
     "splits": {"train": [{"path": "train/coco-000000.tar", "source": "coco",
                           "count": 812, "bytes": 63912345}, ...],
                "val": [...]}}

Converters and the synthetic corpus all write through :class:`ShardWriter`, so every shard
in the project obeys the same schema and every split has an exact count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from tokensel.common.errors import TokenselError
from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION

INDEX_NAME = "index.json"
INDEX_FORMAT = "tokensel-shards/1"
IMAGE_EXTS = ("jpg", "png")
# Members that would be unpickled by webdataset's default decoders. We never decode them.
REFUSED_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz")
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 5000


def source_seed(source: str) -> int:
    """A source's part of every per-source RNG seed: from its name, never its position in a
    table, so that adding a source changes no other source's stream."""
    return int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:4], "little")


class ShardFormatError(TokenselError):
    """A user-facing problem with shards or their index. The message names the path."""


def validate_meta(meta: Any, where: str = "sample") -> dict:
    """Check one sample's json against the schema; return it unchanged or raise ``ShardFormatError``."""
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: json is {type(meta).__name__}, expected an object")
    source = meta.get("source")
    if not isinstance(source, str) or source not in BENCHMARKS:
        raise ShardFormatError(f"{where}: source={source!r}, expected one of {', '.join(BENCHMARKS)}")
    if BENCHMARKS.get(source).kind == CAPTION:
        captions = meta.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise ShardFormatError(f"{where}: {source} sample needs 'captions', a non-empty list of strings")
    else:
        if not isinstance(meta.get("question"), str):
            raise ShardFormatError(f"{where}: {source} sample needs 'question', a string")
        answers = meta.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ShardFormatError(f"{where}: {source} sample needs 'answers', a non-empty list of strings")
    box = meta.get("answer_box")
    if box is not None:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ShardFormatError(f"{where}: answer_box={box!r}, expected [x0, y0, x1, y1] in pixels")
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            raise ShardFormatError(f"{where}: answer_box={box!r} is empty (need x1 > x0 and y1 > y0)")
    return meta


def sanitize_key(key: str) -> str:
    """webdataset splits a member name at its first dot, so keys must not contain dots or slashes."""
    out = "".join(ch if (ch.isalnum() or ch in "-_") else "_" for ch in str(key))
    if not out:
        raise ShardFormatError(f"sample key {key!r} is empty after sanitising")
    return out


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: path relative to the dataset root, its source and sample count."""

    path: str
    source: str
    count: int
    bytes: int = 0


class ShardIndex:
    """The ``index.json`` of one dataset root."""

    def __init__(self, root: str | os.PathLike, splits: dict[str, list[ShardEntry]]):
        self.root = Path(root)
        self.splits = splits

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardIndex":
        root = Path(root)
        if not root.is_dir():
            raise ShardFormatError(f"data root {str(root)!r} does not exist or is not a folder")
        path = root / INDEX_NAME
        if not path.is_file():
            raise ShardFormatError(
                f"{path}: no shard index; write shards with `python -m tokensel.datamodules.convert` "
                "or `make data`"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ShardFormatError(f"{path}: unreadable index ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT or not isinstance(raw.get("splits"), dict):
            raise ShardFormatError(f"{path}: not a {INDEX_FORMAT} index")
        splits: dict[str, list[ShardEntry]] = {}
        for split, entries in raw["splits"].items():
            try:
                splits[split] = [ShardEntry(**entry) for entry in entries]
            except TypeError as err:
                raise ShardFormatError(f"{path}: bad entry in split {split!r} ({err})") from None
        return cls(root, splits)

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / INDEX_NAME
        payload = {
            "format": INDEX_FORMAT,
            "splits": {s: [vars(e) for e in sorted(es, key=lambda e: e.path)] for s, es in sorted(self.splits.items())},
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)
        return path

    def shards(self, split: str, sources: Iterable[str] | None = None) -> list[ShardEntry]:
        """The shards of ``split`` (optionally of some sources), checked to exist on disk."""
        if split not in self.splits or not self.splits[split]:
            have = ", ".join(sorted(self.splits)) or "none"
            raise ShardFormatError(f"{self.root / INDEX_NAME}: split {split!r} has no shards (splits: {have})")
        wanted = set(sources) if sources is not None else None
        entries = [e for e in self.splits[split] if wanted is None or e.source in wanted]
        for entry in entries:
            if not (self.root / entry.path).is_file():
                raise ShardFormatError(f"{self.root / entry.path}: shard listed in {INDEX_NAME} is missing")
        return entries

    def counts(self, split: str) -> dict[str, int]:
        """Samples per source in ``split``."""
        out: dict[str, int] = {}
        for entry in self.splits.get(split, []):
            out[entry.source] = out.get(entry.source, 0) + entry.count
        return out


class ShardWriter:
    """Write size-bounded shards of one (split, source) under a dataset root and index them.

    Shards are named ``<split>/<source>-NNNNNN.tar``. A new shard starts when the current one
    would pass ``max_bytes`` or holds ``max_samples``. On ``close()`` the root's ``index.json``
    is updated: this (split, source)'s old entries are replaced, the others kept, so every
    converter can write into the same root.

    Use as a context manager::

        with ShardWriter(out, "train", "coco") as writer:
            writer.write(key, jpeg_bytes, "jpg", {"source": "coco", "captions": [...]})
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        source: str,
        max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        max_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    ):
        if source not in BENCHMARKS:
            raise ShardFormatError(f"source={source!r}, expected one of {', '.join(BENCHMARKS)}")
        if max_bytes <= 0 or max_samples <= 0:
            raise ShardFormatError(f"max_bytes={max_bytes} and max_samples={max_samples} must be positive")
        self.root = Path(root)
        self.split = split
        self.source = source
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.entries: list[ShardEntry] = []
        self._tar: wds.TarWriter | None = None
        self._path: str | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(write_index=exc_type is None)

    @property
    def total(self) -> int:
        return sum(e.count for e in self.entries) + self._count

    def write(self, key: str, image: bytes, image_ext: str, meta: dict) -> None:
        if image_ext not in IMAGE_EXTS:
            raise ShardFormatError(f"{key}: image extension {image_ext!r}, expected one of {IMAGE_EXTS}")
        key = sanitize_key(key)
        if key in self._keys:
            raise ShardFormatError(f"{self.split}/{self.source}: duplicate sample key {key!r}")
        validate_meta(meta, where=key)
        self._keys.add(key)
        image = bytes(image)
        payload = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        size = len(image) + len(payload) + 3 * 512  # tar headers
        if self._tar is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        self._tar.write({"__key__": key, image_ext: image, "json": payload})
        self._count += 1
        self._bytes += size

    def _start_shard(self) -> None:
        self._path = f"{self.split}/{self.source}-{len(self.entries):06d}.tar"
        # Written under a temporary name; the old shards stay valid until close() succeeds.
        # mtime=0 makes the bytes depend on the samples only (reproducible shards).
        self._tar = wds.TarWriter(str(self._partial(self._path)), mtime=0)
        self._count = 0
        self._bytes = 0

    def _partial(self, path: str) -> Path:
        return self.root / (path + ".partial")

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        size = self._partial(self._path).stat().st_size
        self.entries.append(ShardEntry(self._path, self.source, self._count, size))
        self._tar = None
        self._count = 0

    def close(self, write_index: bool = True) -> list[ShardEntry]:
        """Finish the last shard; on success swap the new shards in and update the index.

        On failure (``write_index=False``) the new shards are deleted and the old ones, with
        their index entries, are left as they were.
        """
        if self._tar is not None:
            self._finish_shard()
        new = {e.path for e in self.entries}
        if not write_index:
            for path in new:
                self._partial(path).unlink(missing_ok=True)
            return self.entries
        for stale in (self.root / self.split).glob(f"{self.source}-*.tar"):
            if f"{self.split}/{stale.name}" not in new:
                stale.unlink()
        for path in new:
            self._partial(path).replace(self.root / path)
        update_index(self.root, self.split, self.source, self.entries)
        return self.entries


def update_index(root: str | os.PathLike, split: str, source: str, entries: list[ShardEntry]) -> Path:
    """Replace the index entries of one (split, source) under ``root``, keeping the others.

    Not safe against two processes writing the same root at once: run converters one after
    another (each is a separate (split, source), so order does not matter).
    """
    root = Path(root)
    try:
        index = ShardIndex.load(root)
    except ShardFormatError:
        index = ShardIndex(root, {})
    kept = [e for e in index.splits.get(split, []) if e.source != source]
    index.splits[split] = kept + list(entries)
    return index.save()


def encode_image(image, ext: str = "jpg", quality: int = 90) -> bytes:
    """Encode a PIL image for a shard (deterministic for a given image and settings)."""
    buf = io.BytesIO()
    if ext == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif ext == "png":
        image.save(buf, format="PNG")
    else:
        raise ShardFormatError(f"image extension {ext!r}, expected one of {IMAGE_EXTS}")
    return buf.getvalue()
