"""TextVQA 0.5.1, on a miniature copy of its release (``TextVQA_0.5.1_{split}.json`` with
``train_images/``) and of lmms-lab's parquet release (``data/{split}-*.parquet``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_convert import read_split, run_cli, write_image, write_json
from test_convert_parquet import image_bytes, write_parquet
from tokensel.datamodules.convert import convert
from tokensel.datamodules.raw_layout import Skips
from tokensel.datamodules.shards import ShardFormatError, ShardIndex, validate_meta

ANSWERS = ["nokia"] * 7 + ["nokia phone", "nokla", "nokia"]


def entry(question_id: int, image_id: str, question: str, answers=ANSWERS) -> dict:
    """One question as the release has it (the fields tokensel does not read included)."""
    item = {"question": question, "image_id": image_id, "image_classes": ["Mobile phone"],
            "flickr_original_url": f"https://farm.example/{image_id}_o.jpg", "flickr_300k_url": "",
            "image_width": 40, "image_height": 30, "question_tokens": question.split(),
            "question_id": question_id, "set_name": "val"}
    if answers is not None:
        item["answers"] = answers
    return item


def make_textvqa(root: Path) -> dict[str, bytes]:
    """TextVQA_0.5.1_{val,test}.json + train_images/ (val's) and test_images/. Returns key -> image bytes."""
    images = {name: write_image(root / f"train_images/{name}.jpg", "JPEG", colour)
              for name, colour in (("0054c91397f2fe05", (200, 10, 10)), ("00685bc495504d61", (10, 200, 10)))}
    write_json(root / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [entry(34602, "0054c91397f2fe05", "what is the brand of this camera?"),
                 entry(34603, "0054c91397f2fe05", "what does the small white text spell?",
                       ["copenhagen"] * 6 + ["thursday"] * 4),
                 entry(34604, "00685bc495504d61", "what kind of beer is this?", ["ale"] * 10)]})
    write_image(root / "test_images/0a0bc91825468c45.jpg", "JPEG", (1, 2, 3))
    write_json(root / "TextVQA_0.5.1_test.json", {"dataset_type": "test", "dataset_name": "textvqa",
                                                  "data": [entry(1, "0a0bc91825468c45", "what time is it?", None)]})
    return {"textvqa_34602": images["0054c91397f2fe05"], "textvqa_34603": images["0054c91397f2fe05"],
            "textvqa_34604": images["00685bc495504d61"]}


def test_textvqa_round_trip(tmp_path):
    expected = make_textvqa(tmp_path / "textvqa")
    entries = convert("textvqa", tmp_path / "textvqa", tmp_path / "out", split="val")
    assert sum(e.count for e in entries) == 3
    samples = read_split(tmp_path / "out", "val", "textvqa")
    assert {k: s["jpg"] for k, s in samples.items()} == expected  # stored byte for byte
    meta = validate_meta(json.loads(samples["textvqa_34602"]["json"]))
    assert meta["question"] == "what is the brand of this camera?"
    assert meta["answers"] == ANSWERS  # all ten, in order: VQA accuracy needs them
    assert meta["provenance"] == {"dataset": "textvqa-0.5.1", "file": "train_images/0054c91397f2fe05.jpg",
                                  "question_id": 34602, "image_id": "0054c91397f2fe05"}

    skips = Skips()  # the test split has no answers: skipped and counted
    assert convert("textvqa", tmp_path / "textvqa", tmp_path / "out", split="test", skips=skips) == []
    assert skips.counts == {"no answers": 1}


def test_missing_images_are_counted_and_only_nothing_left_fails(tmp_path):
    make_textvqa(tmp_path / "textvqa")
    (tmp_path / "textvqa/train_images/0054c91397f2fe05.jpg").unlink()  # two of the three questions' image
    result = run_cli("textvqa", tmp_path / "textvqa", tmp_path / "out", "--split", "val")
    assert result.returncode == 0, result.stderr
    assert "textvqa/val: wrote 1 samples" in result.stdout and "skipped 2 (2 missing image)" in result.stdout

    (tmp_path / "textvqa/train_images/00685bc495504d61.jpg").unlink()
    result = run_cli("textvqa", tmp_path / "textvqa", tmp_path / "out", "--split", "val")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no usable sample among 3 (3 missing image" in errors[0]
    assert ShardIndex.load(tmp_path / "out").counts("val") == {"textvqa": 1}  # the earlier shards stay


@pytest.mark.parametrize("remove, named", [
    ("TextVQA_0.5.1_val.json", "TextVQA_0.5.1_val.json"),
    ("train_images", "train_images"),
])
def test_wrong_folder_names_the_missing_path(tmp_path, remove, named):
    make_textvqa(tmp_path / "textvqa")
    path = tmp_path / "textvqa" / remove
    if path.is_dir():
        for image in path.iterdir():
            image.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(ShardFormatError) as err:
        convert("textvqa", tmp_path / "textvqa", tmp_path / "out", split="val")
    assert str(tmp_path / "textvqa" / named) in str(err.value) and "\n" not in str(err.value)


def test_a_json_of_the_wrong_shape_names_the_entry(tmp_path):
    make_textvqa(tmp_path / "textvqa")
    write_json(tmp_path / "textvqa/TextVQA_0.5.1_val.json", {"data": [{"question_id": 1, "question": "q?"}]})
    with pytest.raises(ShardFormatError, match=r"data\[0\] needs .*'image_id'"):
        convert("textvqa", tmp_path / "textvqa", tmp_path / "out", split="val")


def make_lmms_textvqa(root: Path, columns: dict | None = None) -> dict[str, bytes]:
    """lmms-lab/textvqa: data/{validation,test}-*.parquet with the release's columns."""
    images = [image_bytes((200, 10, 10), "JPEG"), image_bytes((10, 200, 10), "JPEG")]
    write_parquet(root / "data/validation-00000-of-00001.parquet", columns or {
        "image_id": ["0054c91397f2fe05", "00685bc495504d61"], "question_id": [34602, 34604],
        "question": ["what is the brand of this camera?", "what kind of beer is this?"],
        "question_tokens": [["what"], ["what"]], "image": images, "image_width": [40, 40],
        "image_height": [30, 30], "flickr_original_url": ["", ""], "flickr_300k_url": ["", ""],
        "answers": [ANSWERS, ["ale"] * 10], "image_classes": [["phone"], ["beer"]], "set_name": ["val", "val"],
        "ocr_tokens": [["nokia"], ["ale"]]})
    return {"textvqa_34602": images[0], "textvqa_34604": images[1]}


def test_lmms_lab_textvqa_round_trip(tmp_path):
    expected = make_lmms_textvqa(tmp_path / "lmms")
    convert("textvqa", tmp_path / "lmms", tmp_path / "out", split="validation", out_split="val")
    samples = read_split(tmp_path / "out", "val", "textvqa")
    assert {k: s["jpg"] for k, s in samples.items()} == expected  # the official release's keys
    meta = validate_meta(json.loads(samples["textvqa_34602"]["json"]))
    assert meta["answers"] == ANSWERS and meta["question"] == "what is the brand of this camera?"


def test_lmms_lab_textvqa_without_answers_names_the_column(tmp_path):
    make_lmms_textvqa(tmp_path / "lmms", {"question_id": [1], "question": ["q?"], "image": [image_bytes((0, 0, 0))]})
    result = run_cli("textvqa", tmp_path / "lmms", tmp_path / "out", "--split", "validation")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no column 'answers'" in lines[0] and "textvqa needs question_id, question" in lines[0]
