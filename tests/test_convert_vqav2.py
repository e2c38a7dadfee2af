"""VQAv2, on a miniature copy of its release (``v2_OpenEnded_mscoco_{sub}_questions.json`` +
``v2_mscoco_{sub}_annotations.json`` over COCO's images) and of lmms-lab's parquet release."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from test_convert import read_split, run_cli, write_image, write_json
from test_convert_parquet import image_bytes, write_parquet
from tokensel.datamodules.convert import convert
from tokensel.datamodules.raw_layout import Skips
from tokensel.datamodules.shards import ShardFormatError, validate_meta

HUMANS = ["down"] * 6 + ["at table", "skateboard", "down", "table"]


def annotation(question_id: int, image_id: int, answers: list[str]) -> dict:
    return {"question_type": "what is the", "multiple_choice_answer": answers[0], "image_id": image_id,
            "answer_type": "other", "question_id": question_id,
            # released in answer_id order; shuffled here to check that the order is restored
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in reversed(list(enumerate(answers)))]}


def make_vqav2(root: Path, images: Path | None = None) -> dict[str, bytes]:
    """The val2014 questions and annotations in ``root``, COCO's val2014 images in ``images``
    (default ``root/val2014``); a test-dev2015 questions file without annotations. Returns key -> bytes."""
    images = images or root / "val2014"
    pictures = {i: write_image(images / f"COCO_val2014_{i:012d}.jpg", "JPEG", (i % 250, 90, 30))
                for i in (262148, 393225)}
    info = {"info": {"description": "VQA v2"}, "license": {}, "data_subtype": "val2014"}
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {**info, "task_type": "Open-Ended",
        "data_type": "mscoco", "questions": [
            {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
            {"image_id": 262148, "question": "What are the people in the background doing?", "question_id": 262148001},
            {"image_id": 393225, "question": "Is the bowl full?", "question_id": 393225000},
            {"image_id": 393225, "question": "Is this question annotated?", "question_id": 393225999}]})
    write_json(root / "v2_mscoco_val2014_annotations.json", {**info, "annotations": [
        annotation(262148000, 262148, HUMANS),
        annotation(262148001, 262148, ["watching"] * 10),
        annotation(393225000, 393225, ["yes"] * 9 + ["no"])]})
    write_json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": [
        {"image_id": 1, "question": "What color?", "question_id": 10}]})
    write_image(root / "test2015/COCO_test2015_000000000001.jpg", "JPEG", (5, 5, 5))
    return {"vqav2_262148000": pictures[262148], "vqav2_262148001": pictures[262148],
            "vqav2_393225000": pictures[393225]}


def test_vqav2_round_trip(tmp_path):
    expected = make_vqav2(tmp_path / "vqav2")
    skips = Skips()
    convert("vqav2", tmp_path / "vqav2", tmp_path / "out", split="val", skips=skips)
    samples = read_split(tmp_path / "out", "val", "vqav2")
    assert {k: s["jpg"] for k, s in samples.items()} == expected
    assert skips.counts == {"no answers": 1}  # the question without annotation
    meta = validate_meta(json.loads(samples["vqav2_262148000"]["json"]))
    assert meta["question"] == "Where is he looking?"
    assert meta["answers"] == HUMANS  # all ten, in answer_id order
    assert meta["provenance"] == {"dataset": "vqav2", "file": "val2014/COCO_val2014_000000262148.jpg",
                                  "question_id": 262148000, "image_id": 262148, "answer_type": "other"}

    skips = Skips()  # test-dev has no annotations: every question skipped and counted
    assert convert("vqav2", tmp_path / "vqav2", tmp_path / "out", split="test-dev", skips=skips) == []
    assert skips.counts == {"no answers": 1}


def test_coco_images_elsewhere(tmp_path):
    expected = make_vqav2(tmp_path / "vqav2", images=tmp_path / "coco/val2014")
    result = run_cli("vqav2", tmp_path / "vqav2", tmp_path / "out", "--split", "val",
                     "--images", tmp_path / "coco/val2014")
    assert result.returncode == 0, result.stderr
    assert read_split(tmp_path / "out", "val", "vqav2").keys() == expected.keys()
    result = run_cli("chartqa", tmp_path / "vqav2", tmp_path / "out", "--images", tmp_path)
    assert result.returncode == 2 and "--images is only used with vqav2" in result.stderr


@pytest.mark.parametrize("missing", ["v2_mscoco_val2014_annotations.json",
                                     "v2_OpenEnded_mscoco_val2014_questions.json"])
def test_a_missing_file_is_named(tmp_path, missing):
    make_vqav2(tmp_path / "vqav2")
    (tmp_path / "vqav2" / missing).unlink()
    with pytest.raises(ShardFormatError) as err:
        convert("vqav2", tmp_path / "vqav2", tmp_path / "out", split="val")
    assert str(tmp_path / "vqav2" / missing) in str(err.value)


def test_missing_images_are_skipped_and_counted(tmp_path):
    make_vqav2(tmp_path / "vqav2")
    (tmp_path / "vqav2/val2014/COCO_val2014_000000393225.jpg").unlink()
    skips = Skips()
    entries = convert("vqav2", tmp_path / "vqav2", tmp_path / "out", split="val", skips=skips)
    assert sum(e.count for e in entries) == 2
    assert skips.counts == {"no answers": 1, "missing image": 1}


def test_lmms_lab_vqav2_round_trip(tmp_path):
    answer = pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
    pictures = [image_bytes((1, 90, 30), "JPEG"), image_bytes((3, 90, 30), "JPEG")]
    rows = annotation(262148000, 262148, HUMANS)["answers"], None
    write_parquet(tmp_path / "lmms/data/validation-00000-of-00001.parquet", {
        "question_type": ["what is the", "is the"], "multiple_choice_answer": ["down", "yes"],
        "answers": list(rows), "image_id": [262148, 393225], "answer_type": ["other", "yes/no"],
        "question_id": [262148000, 393225000], "question": ["Where is he looking?", "Is the bowl full?"],
        "image": pictures}, types={"answers": pa.list_(answer)})
    skips = Skips()
    convert("vqav2", tmp_path / "lmms", tmp_path / "out", split="validation", skips=skips)
    samples = read_split(tmp_path / "out", "validation", "vqav2")
    assert list(samples) == ["vqav2_262148000"] and samples["vqav2_262148000"]["jpg"] == pictures[0]
    assert validate_meta(json.loads(samples["vqav2_262148000"]["json"]))["answers"] == HUMANS
    assert skips.counts == {"no answers": 1}
