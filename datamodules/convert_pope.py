"""POPE: yes/no questions on whether an object is in a COCO val2014 image, one record per question
("Evaluating Object Hallucination in Large Vision-Language Models", Li et al., EMNLP 2023,
arXiv:2305.10355).

Raw layout (the release's ``output/coco/`` files, JSON lines, over COCO's val2014 images)::

    SRC/coco_pope_{subset}.json      {"question_id", "image": "COCO_val2014_<id>.jpg", "text", "label": yes|no}
                                     per line; subset: random, popular, adversarial (a clone of the
                                     release: SRC/output/coco/coco_pope_{subset}.json)
    SRC/val2014/COCO_val2014_*.jpg   (or --images DIR)

POPE has one split, ``val`` (COCO's). Every subset file found is read, in the order random,
popular, adversarial, unless ``subsets`` (``--subsets random,adversarial``) names them. Keys are
``pope_<subset>_<question_id>``.

lmms-lab's parquet release (``lmms-lab/POPE``; split ``test``, the three subsets in one)::

    SRC/data/test-0000i-of-0000n.parquet    columns question_id, question, answer, category, image, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokensel.datamodules.parquet_layout import ParquetLayout, bad_row, text
from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, require_dir
from tokensel.datamodules.shards import ShardFormatError

SUBSETS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
OPTIONS = {"images": "the folder of COCO's val2014 images (default: SRC/val2014)",
           "subsets": "a comma list of random, popular, adversarial (default: every coco_pope_*.json found)"}


def subset_files(src: Path, subsets: str | Sequence[str] | None) -> dict[str, Path]:
    """subset -> its file, in SRC or SRC/output/coco."""
    names = list(SUBSETS) if subsets is None else (subsets.split(",") if isinstance(subsets, str) else list(subsets))
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in SUBSETS]
    if unknown:
        raise ShardFormatError(f"subsets={','.join(unknown)}: POPE's subsets are {', '.join(SUBSETS)}")
    files = {}
    for name in names:
        tried = [folder / f"coco_pope_{name}.json" for folder in (src, src / "output/coco")]
        found = next((path for path in tried if path.is_file()), None)
        if found is not None:
            files[name] = found
        elif subsets is not None:
            raise ShardFormatError(f"none of {', '.join(map(str, tried))} exists; expected POPE's {name} questions")
    if not files:
        raise ShardFormatError(f"no coco_pope_{{{','.join(SUBSETS)}}}.json in {src} or {src / 'output/coco'}; "
                               "expected POPE's question files")
    return files


def read_lines(path: Path) -> list[dict]:
    """The entries of a POPE file: JSON lines (as released), or one JSON list."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{path}: unreadable ({err})") from None
    if content.lstrip().startswith("["):
        try:
            return json.loads(content)
        except ValueError as err:
            raise ShardFormatError(f"{path}: unreadable json ({err})") from None
    entries = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError as err:
                raise ShardFormatError(f"{path}: line {number} is not json ({err})") from None
    return entries


def records(src: Path, split: str, skips: Skips, images: str | Path | None = None,
            subsets: str | Sequence[str] | None = None) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per question, subset by subset."""
    if split != "val":
        raise ShardFormatError(f"pope: no split {split!r}; POPE has one split, val (its questions are on COCO val2014)")
    files = subset_files(src, subsets)
    image_dir = require_dir(Path(images) if images is not None else src / "val2014",
                            "the COCO val2014 images that POPE's questions are about")
    found = []
    for subset, path in files.items():
        for number, item in enumerate(read_lines(path), 1):
            if not (isinstance(item, dict) and "question_id" in item and isinstance(item.get("image"), str)
                    and isinstance(item.get("text"), str) and item.get("label") in LABELS):
                raise bad_shape(path, f"entry {number} needs 'question_id', a string 'image' and 'text', and a "
                                      f"'label' of {' or '.join(LABELS)}")
            meta = {
                "source": "pope",
                "question": item["text"],
                "answers": [item["label"]],
                "provenance": {"dataset": "pope", "subset": subset, "file": f"val2014/{item['image']}",
                               "question_id": item["question_id"]},
            }
            found.append((f"pope_{subset}_{item['question_id']}", image_dir / item["image"], meta))
    return found


def parquet_record(row: dict, index: int, where: str, skips: Skips):
    """One row of lmms-lab's POPE: ``(key, meta)``, the key as the official release's."""
    answer = str(row["answer"]).strip().lower()
    if answer not in LABELS or row["category"] not in SUBSETS:
        raise bad_row(where, f"answer={row['answer']!r}, category={row['category']!r}: expected "
                             f"{' or '.join(LABELS)}, and one of {', '.join(SUBSETS)}")
    meta = {
        "source": "pope",
        "question": text(row["question"], where, "question"),
        "answers": [answer],
        "provenance": {"dataset": "pope", "release": "lmms-lab/POPE", "subset": row["category"],
                       "question_id": row["question_id"], "index": index},
    }
    return f"pope_{row['category']}_{row['question_id']}", meta


PARQUET = ParquetLayout(("question_id", "question", "answer", "category"), parquet_record)
