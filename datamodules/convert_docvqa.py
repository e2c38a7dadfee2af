"""DocVQA (single-page task): one record per question ("DocVQA: A Dataset for VQA on Document
Images", arXiv:2007.00398).

Raw layout (the single-page release; a split may also sit in its own ``SRC/{split}/``)::

    SRC/{split}_v1.0_withQT.json    {"data": [{"questionId", "question", "image": "documents/x.png",
                                               "answers": [...], "docId", ...}]}
    SRC/documents/x.png             (``image`` is relative to the json's folder)

The json is the first that exists of ``{split}_v1.0_withQT.json`` then ``{split}_v1.0.json``, each
looked for in ``SRC/`` then ``SRC/{split}/``; ``annotations=`` (``--annotations``) names it
outright. Entries without ``answers`` (the test split) are skipped and counted.

lmms-lab's parquet release (``lmms-lab/DocVQA``, the ``DocVQA`` config; splits ``validation`` and
``test``)::

    SRC/DocVQA/{split}-0000i-of-0000n.parquet    columns questionId, question, answers, image, ...
"""

from __future__ import annotations

from pathlib import Path

from tokensel.datamodules.parquet_layout import ParquetLayout, strings, text
from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, load_json, log, require_dir
from tokensel.datamodules.shards import ShardFormatError

OPTIONS = {"annotations": "the annotation json (default: the first of SPLIT_v1.0_withQT.json and SPLIT_v1.0.json "
                          "found in SRC or SRC/SPLIT)"}


def find_annotations(src: Path, split: str) -> Path:
    """The DocVQA json of ``split`` under ``src``: the first that exists, ``withQT`` first."""
    names = (f"{split}_v1.0_withQT.json", f"{split}_v1.0.json")
    tried = [folder / name for name in names for folder in (src, src / split)]
    for path in tried:
        if path.is_file():
            return path
    raise ShardFormatError(
        f"none of {', '.join(map(str, tried))} exists; expected the DocVQA {split} annotations "
        "(or name the json with --annotations)"
    )


def records(src: Path, split: str, skips: Skips, annotations: str | Path | None = None) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per answered question, in file order."""
    ann_path = Path(annotations) if annotations is not None else find_annotations(src, split)
    log.info("docvqa/%s: reading %s", split, ann_path)
    expected = "a DocVQA json {'data': [{'questionId', 'question', 'image', 'answers'}, ...]}"
    raw = load_json(ann_path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise bad_shape(ann_path, f"expected {expected}")
    root = ann_path.parent

    found = []
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
        found.append((f"docvqa_{item['questionId']}", root / item["image"], meta))

    for folder in sorted({path.parent for _, path, _ in found}):
        require_dir(folder, f"the document images referenced by {ann_path.name}")
    return found


def parquet_record(row: dict, index: int, where: str, skips: Skips):
    """One row of lmms-lab's DocVQA: ``(key, meta)``, the key as the official release's."""
    if not row["answers"]:
        skips.add("no answers", f"questionId {row['questionId']} ({where})")
        return None
    meta = {
        "source": "docvqa",
        "question": text(row["question"], where, "question"),
        "answers": strings(row["answers"], where, "answers"),
        "provenance": {"dataset": "docvqa", "release": "lmms-lab/DocVQA", "question_id": row["questionId"],
                       "index": index},
    }
    return f"docvqa_{row['questionId']}", meta


PARQUET = ParquetLayout(("questionId", "question", "answers"), parquet_record, folders=("DocVQA",))
