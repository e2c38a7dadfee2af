"""ChartQA -> shards: one sample per (chart, question).

Raw layout (the official release)::

    SRC/{split}/{split}_human.json       [{"imgname", "query", "label"}, ...]
    SRC/{split}/{split}_augmented.json   (either json may be missing, not both)
    SRC/{split}/png/<imgname>

Keys are ``chartqa_<human|augmented>_<i>``, ``i`` the entry's position in its json.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokensel.datamodules.convert import Skips, bad_shape, load_json, require_dir, write_shards
from tokensel.datamodules.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_SHARD_SAMPLES,
    ShardEntry,
    ShardFormatError,
)

SUBSETS = ("human", "augmented")


def chartqa_records(src: Path, split: str) -> list[tuple[str, Path, dict]]:
    """Check the layout and return ``(key, image path, meta)`` per entry: human first, then augmented."""
    folder = src / split
    paths = {subset: folder / f"{split}_{subset}.json" for subset in SUBSETS}
    if not any(path.is_file() for path in paths.values()):
        raise ShardFormatError(
            f"{paths['human']} and {paths['augmented']}: neither exists; expected the ChartQA {split} annotations"
        )
    image_dir = require_dir(folder / "png", f"the ChartQA {split} chart images")

    records = []
    for subset, path in paths.items():
        if not path.is_file():
            continue
        expected = "a ChartQA json list of {'imgname', 'query', 'label'}"
        raw = load_json(path, expected)
        if not isinstance(raw, list):
            raise bad_shape(path, f"expected {expected}")
        for i, item in enumerate(raw):
            if not (
                isinstance(item, dict)
                and isinstance(item.get("imgname"), str)
                and isinstance(item.get("query"), str)
                and "label" in item
            ):
                raise bad_shape(path, f"entry [{i}] needs string 'imgname' and 'query', and a 'label'")
            meta = {
                "source": "chartqa",
                "question": item["query"],
                "answers": [str(item["label"])],
                "provenance": {
                    "dataset": "chartqa",
                    "file": f"png/{item['imgname']}",
                    "annotations": path.name,
                    "index": i,
                },
            }
            records.append((f"chartqa_{subset}_{i}", image_dir / item["imgname"], meta))
    return records


def convert_chartqa(
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    limit: int | None = None,
    skips: Skips | None = None,
) -> list[ShardEntry]:
    """Convert ChartQA ``split`` (train, val, test) under ``src`` into shards of split ``split`` under ``out``.

    Pass ``skips`` to learn how many images were left out and why.
    """
    skips = Skips() if skips is None else skips
    records = chartqa_records(Path(src), split)
    return write_shards(records, out, split, "chartqa", max_bytes, max_samples, limit, skips)
