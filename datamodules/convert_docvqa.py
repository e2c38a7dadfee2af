"""DocVQA (single-page task) -> shards: one sample per question.

Raw layout (the task release)::

    SRC/{split}/{split}_v1.0.json   {"data": [{"questionId", "question", "image": "documents/x.png",
                                               "answers": [...], "docId", ...}]}
    SRC/{split}/documents/x.png     (``image`` is relative to the json's folder)

Entries without ``answers`` (the test split) are skipped and counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokensel.datamodules.convert import Skips, bad_shape, load_json, require_dir, write_shards
from tokensel.datamodules.shards import DEFAULT_MAX_SHARD_BYTES, DEFAULT_MAX_SHARD_SAMPLES, ShardEntry


def docvqa_records(ann_path: Path, skips: Skips) -> list[tuple[str, Path, dict]]:
    """Check the layout and return ``(key, image path, meta)`` per answered question, in file order."""
    expected = "a DocVQA json {'data': [{'questionId', 'question', 'image', 'answers'}, ...]}"
    raw = load_json(ann_path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise bad_shape(ann_path, f"expected {expected}")
    root = ann_path.parent

    records = []
    for k, item in enumerate(raw["data"]):
        if not (
            isinstance(item, dict)
            and "questionId" in item
            and isinstance(item.get("question"), str)
            and isinstance(item.get("image"), str)
        ):
            raise bad_shape(ann_path, f"data[{k}] needs 'questionId', a string 'question' and a string 'image'")
        answers = item.get("answers")
        if not answers:
            skips.add("no answers", f"questionId {item['questionId']} in {ann_path}")
            continue
        if not isinstance(answers, list):
            raise bad_shape(ann_path, f"data[{k}]['answers'] should be a list of strings")
        meta = {
            "source": "docvqa",
            "question": item["question"],
            "answers": [str(a) for a in answers],
            "provenance": {
                "dataset": "docvqa",
                "file": item["image"],
                "question_id": item["questionId"],
                "doc_id": item.get("docId"),
            },
        }
        records.append((f"docvqa_{item['questionId']}", root / item["image"], meta))

    for folder in sorted({path.parent for _, path, _ in records}):
        require_dir(folder, f"the document images referenced by {ann_path.name}")
    return records


def convert_docvqa(
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    limit: int | None = None,
    skips: Skips | None = None,
    annotations: str | os.PathLike | None = None,
) -> list[ShardEntry]:
    """Convert DocVQA ``split`` under ``src`` into shards of split ``split`` under ``out``.

    ``annotations`` overrides the json (default ``src/split/split_v1.0.json``); image paths are
    relative to its folder. Pass ``skips`` to learn how many samples were left out and why.
    """
    skips = Skips() if skips is None else skips
    ann_path = Path(annotations) if annotations is not None else Path(src) / split / f"{split}_v1.0.json"
    records = docvqa_records(ann_path, skips)
    return write_shards(records, out, split, "docvqa", max_bytes, max_samples, limit, skips)
