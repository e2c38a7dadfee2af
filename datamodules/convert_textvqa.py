"""TextVQA 0.5.1: one record per question ("Towards VQA Models That Can Read", Singh et al., CVPR
2019, arXiv:1904.08920).

Raw layout (the official release: the json of a split, and ``train_val_images.zip`` unzipped,
which holds the train and val images; ``test_images.zip`` for test)::

    SRC/TextVQA_0.5.1_{split}.json    {"dataset_name": "textvqa", "data": [{"question_id", "question",
                                       "image_id", "answers": [10 strings], ...}]}
    SRC/train_images/<image_id>.jpg   (train and val; SRC/test_images/ for test)

Entries without ``answers`` (the test split) are skipped and counted.

lmms-lab's parquet release (``lmms-lab/textvqa``; splits ``train``, ``validation``, ``test``)::

    SRC/data/{split}-0000i-of-0000n.parquet    columns question_id, question, answers, image, ...
"""

from __future__ import annotations

from pathlib import Path

from tokensel.datamodules.parquet_layout import ParquetLayout, strings, text
from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, load_json, require_dir

VERSION = "0.5.1"


def image_folder(split: str) -> str:
    return "test_images" if split == "test" else "train_images"


def records(src: Path, split: str, skips: Skips) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per answered question, in file order."""
    ann_path = src / f"TextVQA_{VERSION}_{split}.json"
    expected = "a TextVQA json {'data': [{'question_id', 'question', 'image_id', 'answers'}, ...]}"
    raw = load_json(ann_path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise bad_shape(ann_path, f"expected {expected}")
    image_dir = require_dir(src / image_folder(split), f"the TextVQA images of {ann_path.name}")

    found = []
    for k, item in enumerate(raw["data"]):
        if not (
            isinstance(item, dict)
            and "question_id" in item
            and isinstance(item.get("question"), str)
            and isinstance(item.get("image_id"), str)
        ):
            raise bad_shape(ann_path, f"data[{k}] needs 'question_id', a string 'question' and a string 'image_id'")
        answers = item.get("answers")
        if not answers:
            skips.add("no answers", f"question_id {item['question_id']} in {ann_path}")
            continue
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise bad_shape(ann_path, f"data[{k}]['answers'] should be a list of strings")
        file = f"{image_dir.name}/{item['image_id']}.jpg"
        meta = {
            "source": "textvqa",
            "question": item["question"],
            "answers": answers,
            "provenance": {"dataset": f"textvqa-{VERSION}", "file": file, "question_id": item["question_id"],
                           "image_id": item["image_id"]},
        }
        found.append((f"textvqa_{item['question_id']}", src / file, meta))
    return found


def parquet_record(row: dict, index: int, where: str, skips: Skips):
    """One row of lmms-lab's textvqa: ``(key, meta)``, the key as the official release's."""
    if not row["answers"]:
        skips.add("no answers", f"question_id {row['question_id']} ({where})")
        return None
    meta = {
        "source": "textvqa",
        "question": text(row["question"], where, "question"),
        "answers": strings(row["answers"], where, "answers"),
        "provenance": {"dataset": f"textvqa-{VERSION}", "release": "lmms-lab/textvqa",
                       "question_id": row["question_id"], "index": index},
    }
    return f"textvqa_{row['question_id']}", meta


PARQUET = ParquetLayout(("question_id", "question", "answers"), parquet_record)
