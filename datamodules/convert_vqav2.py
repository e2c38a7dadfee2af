"""VQAv2: one record per question, with its ten human answers ("Making the V in VQA Matter", Goyal
et al., CVPR 2017, arXiv:1612.00837).

Raw layout (the official release: the questions and annotations zips unzipped, over the COCO images
of the same split)::

    SRC/v2_OpenEnded_mscoco_{sub}_questions.json   {"data_subtype", "questions": [{"question_id",
                                                     "image_id", "question"}, ...]}
    SRC/v2_mscoco_{sub}_annotations.json           {"annotations": [{"question_id", "answers": [{"answer",
                                                     "answer_confidence", "answer_id"} x 10], ...}]}
    SRC/{images}/COCO_{images}_<image_id:012d>.jpg  (or --images DIR)

``split`` is ``train``, ``val``, ``test`` or ``test-dev`` (``{sub}``: ``train2014``, ``val2014``,
``test2015``, ``test-dev2015``; the test-dev images are test2015's). The test splits have no
annotations: their questions are skipped and counted.

lmms-lab's parquet release (``lmms-lab/VQAv2``; splits ``validation``, ``testdev``, ``test``)::

    SRC/data/{split}-0000i-of-0000n.parquet    columns question_id, question, answers [{answer, ...}], image, ...
"""

from __future__ import annotations

from pathlib import Path

from tokensel.datamodules.parquet_layout import ParquetLayout, bad_row, text
from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, load_json, require_dir

SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
OPTIONS = {"images": "the folder of the split's COCO images (default: SRC/train2014, SRC/val2014 or SRC/test2015)"}


def records(src: Path, split: str, skips: Skips, images: str | Path | None = None) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per annotated question, in file order."""
    sub = SUBTYPES.get(split, split)
    image_sub = "test2015" if sub.startswith("test") else sub
    questions_path = src / f"v2_OpenEnded_mscoco_{sub}_questions.json"
    expected = "a VQAv2 questions json {'questions': [{'question_id', 'image_id', 'question'}, ...]}"
    raw = load_json(questions_path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("questions"), list):
        raise bad_shape(questions_path, f"expected {expected}")
    answers = annotated_answers(src / f"v2_mscoco_{sub}_annotations.json", optional=sub.startswith("test"))
    image_dir = require_dir(Path(images) if images is not None else src / image_sub,
                            f"the COCO {image_sub} images of {questions_path.name}")

    found = []
    for k, item in enumerate(raw["questions"]):
        if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                and isinstance(item.get("question_id"), int) and isinstance(item.get("image_id"), int)):
            raise bad_shape(questions_path, f"questions[{k}] needs an integer 'question_id' and 'image_id' and a "
                                            "string 'question'")
        annotation = answers.get(item["question_id"])
        if annotation is None:
            skips.add("no answers", f"question_id {item['question_id']} in {questions_path}")
            continue
        file = f"COCO_{image_sub}_{item['image_id']:012d}.jpg"
        meta = {
            "source": "vqav2",
            "question": item["question"],
            "answers": [a["answer"] for a in sorted(annotation["answers"], key=lambda a: a.get("answer_id", 0))],
            "provenance": {"dataset": "vqav2", "file": f"{image_sub}/{file}", "question_id": item["question_id"],
                           "image_id": item["image_id"], "answer_type": annotation.get("answer_type")},
        }
        found.append((f"vqav2_{item['question_id']}", image_dir / file, meta))
    return found


def annotated_answers(path: Path, optional: bool) -> dict[int, dict]:
    """question_id -> its annotation, from the annotations json (none for a test split without one)."""
    if optional and not path.is_file():
        return {}
    expected = "a VQAv2 annotations json {'annotations': [{'question_id', 'answers': [{'answer'}, ...]}, ...]}"
    raw = load_json(path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise bad_shape(path, f"expected {expected}")
    out = {}
    for k, ann in enumerate(raw["annotations"]):
        if not (isinstance(ann, dict) and "question_id" in ann and isinstance(ann.get("answers"), list)
                and ann["answers"] and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"])):
            raise bad_shape(path, f"annotations[{k}] needs a 'question_id' and 'answers', a list of {{'answer': str}}")
        out[ann["question_id"]] = ann
    return out


def parquet_record(row: dict, index: int, where: str, skips: Skips):
    """One row of lmms-lab's VQAv2: ``(key, meta)``, the key as the official release's."""
    if not row["answers"]:
        skips.add("no answers", f"question_id {row['question_id']} ({where})")
        return None
    answers = row["answers"]
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise bad_row(where, "'answers' should be a list of {'answer': str, ...}")
    meta = {
        "source": "vqav2",
        "question": text(row["question"], where, "question"),
        "answers": [a["answer"] for a in sorted(answers, key=lambda a: a.get("answer_id") or 0)],
        "provenance": {"dataset": "vqav2", "release": "lmms-lab/VQAv2", "question_id": row["question_id"],
                       "index": index},
    }
    return f"vqav2_{row['question_id']}", meta


PARQUET = ParquetLayout(("question_id", "question", "answers"), parquet_record)
