"""ChartQA: one record per (chart, question) ("ChartQA: A Benchmark for Question Answering about
Charts with Visual and Logical Reasoning", arXiv:2203.10244).

Raw layout (the official release)::

    SRC/{split}/{split}_human.json       [{"imgname", "query", "label"}, ...]
    SRC/{split}/{split}_augmented.json   (either json may be missing, not both)
    SRC/{split}/png/<imgname>

Keys are ``chartqa_<human|augmented>_<i>``, ``i`` the entry's position in its json.

lmms-lab's parquet release (``lmms-lab/ChartQA``, split ``test``; the human questions, then the
augmented ones)::

    SRC/data/test-0000i-of-0000n.parquet    columns type (human_test | augmented_test), question, answer, image

Its keys are ``chartqa_<human|augmented>_<row>``, ``row`` the row's position in the split.
"""

from __future__ import annotations

from pathlib import Path

from tokensel.datamodules.parquet_layout import ParquetLayout, bad_row, text
from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, load_json, require_dir
from tokensel.datamodules.shards import ShardFormatError

SUBSETS = ("human", "augmented")


def records(src: Path, split: str, skips: Skips) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per entry: human first, then augmented.

    Every entry has its answer, so nothing is skipped here (``skips`` is for the common signature).
    """
    folder = src / split
    paths = {subset: folder / f"{split}_{subset}.json" for subset in SUBSETS}
    if not any(path.is_file() for path in paths.values()):
        raise ShardFormatError(
            f"{paths['human']} and {paths['augmented']}: neither exists; expected the ChartQA {split} annotations"
        )
    image_dir = require_dir(folder / "png", f"the ChartQA {split} chart images")

    found = []
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
            found.append((f"chartqa_{subset}_{i}", image_dir / item["imgname"], meta))
    return found


def parquet_record(row: dict, index: int, where: str, skips: Skips):
    """One row of lmms-lab's ChartQA: ``(key, meta)``."""
    subset = str(row["type"]).split("_")[0]
    if subset not in SUBSETS:
        raise bad_row(where, f"type={row['type']!r}, expected human_<split> or augmented_<split>")
    answer = row["answer"]
    if answer is None:
        raise bad_row(where, "'answer' is empty")
    meta = {
        "source": "chartqa",
        "question": text(row["question"], where, "question"),
        "answers": [str(answer)],
        "provenance": {"dataset": "chartqa", "release": "lmms-lab/ChartQA", "type": row["type"], "index": index},
    }
    return f"chartqa_{subset}_{index}", meta


PARQUET = ParquetLayout(("type", "question", "answer"), parquet_record)
