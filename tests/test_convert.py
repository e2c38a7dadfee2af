"""The converters, on miniature raw datasets laid out exactly like the real releases."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tokensel.common.errors import UnknownNameError, UsageError
from tokensel.datamodules.benchmarks import BENCHMARKS
from tokensel.datamodules.convert import convert, main
from tokensel.datamodules.raw_layout import Skips
from tokensel.datamodules.shards import ShardFormatError, ShardIndex, validate_meta


def write_image(path: Path, fmt: str, colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    """Save a small image and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path.read_bytes()


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def make_coco(root: Path, split: str = "val") -> dict[str, bytes]:
    """COCO 2017: annotations/captions_<split>2017.json + <split>2017/*.jpg. Returns key -> image bytes."""
    images = {
        1: write_image(root / f"{split}2017/000000000001.jpg", "JPEG", (200, 0, 0)),
        2: write_image(root / f"{split}2017/000000000002.jpg", "JPEG", (0, 200, 0), size=(32, 48)),
        3: write_image(root / f"{split}2017/000000000003.jpg", "JPEG", (0, 0, 200)),  # no captions
    }
    write_json(root / f"annotations/captions_{split}2017.json", {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in images],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A red square."},
            {"id": 11, "image_id": 2, "caption": "A green rectangle. "},
            {"id": 12, "image_id": 1, "caption": "Something red."},
        ],
    })
    return {"coco_1": images[1], "coco_2": images[2]}


def make_docvqa(root: Path, train_json: str = "train/train_v1.0.json") -> dict[str, bytes]:
    """DocVQA: <split>/<split>_v1.0.json + <split>/documents/*, or the train json at ``train_json``
    with documents/ beside it. Returns key -> image bytes (train)."""
    folder = (root / train_json).parent
    page_a = write_image(folder / "documents/abcd0001_1.png", "PNG", (250, 250, 250))
    page_b = write_image(folder / "documents/abcd0002_3.jpg", "JPEG", (240, 240, 230))
    write_json(root / train_json, {
        "dataset_name": "docvqa", "dataset_split": "train", "dataset_version": "1.0",
        "data": [
            {"questionId": 337, "question": "what is the date?", "image": "documents/abcd0001_1.png",
             "docId": 279, "answers": ["1/8/93", "January 8, 1993"], "data_split": "train"},
            {"questionId": 338, "question": "who signed it?", "image": "documents/abcd0001_1.png",
             "docId": 279, "answers": ["T. F. Riehl"], "data_split": "train"},
            {"questionId": 901, "question": "what is the total?", "image": "documents/abcd0002_3.jpg",
             "docId": 12, "answers": ["$5.00"], "data_split": "train"},
        ],
    })
    write_image(root / "test/documents/zz0001_1.png", "PNG", (255, 255, 255))
    write_json(root / "test/test_v1.0.json", {"data": [
        {"questionId": 5, "question": "what is the title?", "image": "documents/zz0001_1.png", "docId": 1},
    ]})
    return {"docvqa_337": page_a, "docvqa_338": page_a, "docvqa_901": page_b}


def make_chartqa(root: Path, split: str = "train") -> dict[str, bytes]:
    """ChartQA: <split>/<split>_{human,augmented}.json + <split>/png/*.png. Returns key -> image bytes."""
    charts = {name: write_image(root / f"{split}/png/{name}", "PNG", (k * 40, 100, 200))
              for k, name in enumerate(["1234.png", "multi_col_20.png", "two_col_7.png"])}
    write_json(root / f"{split}/{split}_human.json", [
        {"imgname": "1234.png", "query": "What is the value of Apples?", "label": "42"},
        {"imgname": "two_col_7.png", "query": "Which year is highest?", "label": "2019"},
    ])
    write_json(root / f"{split}/{split}_augmented.json", [
        {"imgname": "multi_col_20.png", "query": "How many in 2010?", "label": 17},
        {"imgname": "1234.png", "query": "What is the lowest value?", "label": "3.5"},
        {"imgname": "two_col_7.png", "query": "Is it increasing?", "label": "Yes"},
    ])
    return {"chartqa_human_0": charts["1234.png"], "chartqa_human_1": charts["two_col_7.png"],
            "chartqa_augmented_0": charts["multi_col_20.png"], "chartqa_augmented_1": charts["1234.png"],
            "chartqa_augmented_2": charts["two_col_7.png"]}


def read_split(out: Path, split: str, source: str) -> dict[str, dict]:
    """Read a (split, source) back with plain webdataset (no decoding): key -> raw sample."""
    urls = [str(out / e.path) for e in ShardIndex.load(out).shards(split, [source])]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_coco_round_trip(tmp_path):
    expected = make_coco(tmp_path / "coco")
    skips = Skips()
    entries = convert("coco", tmp_path / "coco", tmp_path / "out", split="val", skips=skips)
    assert [(e.path, e.count) for e in entries] == [("val/coco-000000.tar", 2)]
    assert ShardIndex.load(tmp_path / "out").counts("val") == {"coco": 2}
    assert skips.counts == {"no captions": 1}

    samples = read_split(tmp_path / "out", "val", "coco")
    assert samples.keys() == expected.keys()
    for key, sample in samples.items():
        assert set(sample) >= {"jpg", "json"} and "png" not in sample
        assert sample["jpg"] == expected[key]  # stored byte for byte
    one, two = (validate_meta(json.loads(samples[k]["json"])) for k in ("coco_1", "coco_2"))
    assert one["captions"] == ["A red square.", "Something red."]
    assert two["captions"] == ["A green rectangle."]
    assert (two["width"], two["height"]) == (32, 48)
    assert one["provenance"] == {"dataset": "coco2017", "file": "val2017/000000000001.jpg", "id": 1}


def test_docvqa_round_trip_and_test_split(tmp_path):
    expected = make_docvqa(tmp_path / "docvqa")
    entries = convert("docvqa", tmp_path / "docvqa", tmp_path / "out", split="train")
    assert sum(e.count for e in entries) == 3

    samples = read_split(tmp_path / "out", "train", "docvqa")
    assert samples.keys() == expected.keys()
    assert samples["docvqa_901"]["jpg"] == expected["docvqa_901"]  # ext follows the file
    assert samples["docvqa_337"]["png"] == expected["docvqa_337"]
    meta = validate_meta(json.loads(samples["docvqa_337"]["json"]))
    assert meta["question"] == "what is the date?"
    assert meta["answers"] == ["1/8/93", "January 8, 1993"]
    assert meta["provenance"]["file"] == "documents/abcd0001_1.png"
    assert meta["provenance"]["doc_id"] == 279

    # the test split has no answers: every entry is skipped and counted
    skips = Skips()
    assert convert("docvqa", tmp_path / "docvqa", tmp_path / "out", split="test", skips=skips) == []
    assert skips.counts == {"no answers": 1}


def test_docvqa_annotations_override(tmp_path):
    make_docvqa(tmp_path / "docvqa")
    ann = tmp_path / "docvqa/train/train_v1.0.json"
    ann.rename(ann.with_name("custom.json"))
    entries = convert("docvqa", tmp_path / "elsewhere", tmp_path / "out", annotations=ann.with_name("custom.json"))
    assert sum(e.count for e in entries) == 3


@pytest.mark.parametrize("train_json", [
    "train_v1.0_withQT.json", "train/train_v1.0_withQT.json", "train_v1.0.json", "train/train_v1.0.json"])
def test_docvqa_finds_its_json_in_either_layout(tmp_path, caplog, train_json):
    expected = make_docvqa(tmp_path / "docvqa", train_json)
    with caplog.at_level(logging.INFO, logger="tokensel.datamodules.convert"):
        convert("docvqa", tmp_path / "docvqa", tmp_path / "out", split="train")
    assert read_split(tmp_path / "out", "train", "docvqa").keys() == expected.keys()
    assert f"reading {tmp_path / 'docvqa' / train_json}" in caplog.text


def test_docvqa_prefers_the_withqt_json(tmp_path, caplog):
    make_docvqa(tmp_path / "docvqa", "train_v1.0_withQT.json")
    write_json(tmp_path / "docvqa/train/train_v1.0.json", {"data": []})  # the older name, elsewhere
    with caplog.at_level(logging.INFO, logger="tokensel.datamodules.convert"):
        entries = convert("docvqa", tmp_path / "docvqa", tmp_path / "out", split="train")
    assert sum(e.count for e in entries) == 3
    assert f"reading {tmp_path / 'docvqa/train_v1.0_withQT.json'}" in caplog.text


def test_docvqa_without_a_json_names_every_path_tried(tmp_path):
    src = tmp_path / "raw"
    (src / "train/documents").mkdir(parents=True)
    with pytest.raises(ShardFormatError) as err:
        convert("docvqa", src, tmp_path / "out", split="train")
    message = str(err.value)
    assert "\n" not in message
    tried = ["train_v1.0_withQT.json", "train/train_v1.0_withQT.json", "train_v1.0.json", "train/train_v1.0.json"]
    positions = [message.index(str(src / name)) for name in tried]
    assert positions == sorted(positions)  # in the order of preference


def test_unknown_source_lists_the_benchmarks(tmp_path):
    assert {"coco", "docvqa", "chartqa"} <= set(BENCHMARKS.names())
    with pytest.raises(UnknownNameError) as err:
        convert("imagenet", tmp_path, tmp_path / "out")
    assert "choose one of: " + ", ".join(BENCHMARKS.names()) in str(err.value)
    with pytest.raises(UsageError) as err:
        main(["imagenet", str(tmp_path), str(tmp_path / "out")])
    assert ", ".join(map(repr, BENCHMARKS.names())) in str(err.value)


def test_chartqa_round_trip(tmp_path):
    expected = make_chartqa(tmp_path / "chartqa")
    convert("chartqa", tmp_path / "chartqa", tmp_path / "out", split="train")
    samples = read_split(tmp_path / "out", "train", "chartqa")
    assert samples.keys() == expected.keys()
    for key, sample in samples.items():
        assert sample["png"] == expected[key]
    meta = validate_meta(json.loads(samples["chartqa_augmented_0"]["json"]))
    assert meta["question"] == "How many in 2010?"
    assert meta["answers"] == ["17"]  # numeric labels become strings
    assert meta["provenance"] == {"dataset": "chartqa", "file": "png/multi_col_20.png",
                                  "annotations": "train_augmented.json", "index": 0}

    # either json may be missing
    (tmp_path / "chartqa/train/train_augmented.json").unlink()
    entries = convert("chartqa", tmp_path / "chartqa", tmp_path / "out", split="train")
    assert sum(e.count for e in entries) == 2


@pytest.mark.parametrize(
    "source, build, missing",
    [
        ("coco", None, "annotations/captions_train2017.json"),
        ("docvqa", None, "train/train_v1.0.json"),
        ("chartqa", None, "train/train_human.json"),
        ("coco", lambda root: make_coco(root, "train"), "train2017"),
        ("docvqa", make_docvqa, "train/documents"),
        ("chartqa", make_chartqa, "train/png"),
    ],
)
def test_wrong_folder_names_the_missing_path(tmp_path, source, build, missing):
    src = tmp_path / "raw"
    if build is not None:  # a complete layout with its image folder removed
        build(src)
        folder = src / missing
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink()
        folder.rmdir()
    with pytest.raises(ShardFormatError) as err:
        convert(source, src, tmp_path / "out", split="train")
    assert str(src / missing) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "source, path, payload",
    [
        ("coco", "annotations/captions_train2017.json", {"images": []}),
        ("docvqa", "train/train_v1.0.json", [{"questionId": 1}]),
        ("chartqa", "train/train_human.json", {"data": []}),
        ("chartqa", "train/train_human.json", [{"imgname": "a.png", "label": "1"}]),
    ],
)
def test_json_of_the_wrong_shape_names_the_file(tmp_path, source, path, payload):
    src = tmp_path / "raw"
    write_json(src / path, payload)
    for folder in ("train2017", "train/documents", "train/png"):
        (src / folder).mkdir(parents=True, exist_ok=True)
    with pytest.raises(ShardFormatError, match="not the expected layout") as err:
        convert(source, src, tmp_path / "out", split="train")
    assert str(src / path) in str(err.value)


def test_unparseable_json_names_the_file(tmp_path):
    ann = tmp_path / "raw/train/train_v1.0.json"
    ann.parent.mkdir(parents=True)
    ann.write_text("{not json")
    with pytest.raises(ShardFormatError, match="unreadable json") as err:
        convert("docvqa", tmp_path / "raw", tmp_path / "out")
    assert str(ann) in str(err.value)


def test_a_layout_error_leaves_existing_shards_alone(tmp_path):
    make_chartqa(tmp_path / "chartqa")
    convert("chartqa", tmp_path / "chartqa", tmp_path / "out")
    before = ShardIndex.load(tmp_path / "out").splits
    (tmp_path / "chartqa/train/train_human.json").write_text("[1, 2]")
    with pytest.raises(ShardFormatError):
        convert("chartqa", tmp_path / "chartqa", tmp_path / "out")
    assert ShardIndex.load(tmp_path / "out").splits == before
    assert ShardIndex.load(tmp_path / "out").shards("train")  # and the files are still there


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    make_chartqa(tmp_path / "chartqa")
    corrupt = tmp_path / "chartqa/train/png/1234.png"
    corrupt.write_bytes(corrupt.read_bytes()[:30])  # truncated
    missing = tmp_path / "chartqa/train/png/two_col_7.png"
    missing.unlink()
    skips = Skips()
    with caplog.at_level(logging.WARNING, logger="tokensel.datamodules.convert"):
        entries = convert("chartqa", tmp_path / "chartqa", tmp_path / "out", skips=skips)
    # 5 entries: two use 1234.png, two use two_col_7.png
    assert sum(e.count for e in entries) == 1
    assert skips.counts == {"unreadable image": 2, "missing image": 2}
    assert str(skips) == "skipped 4 (2 unreadable image, 2 missing image)"
    assert str(corrupt) in caplog.text and str(missing) in caplog.text
    assert set(read_split(tmp_path / "out", "train", "chartqa")) == {"chartqa_augmented_0"}


def test_a_question_file_whose_images_are_all_missing_fails_in_one_line(tmp_path):
    make_chartqa(tmp_path / "chartqa")
    convert("chartqa", tmp_path / "chartqa", tmp_path / "out")
    before = ShardIndex.load(tmp_path / "out").splits
    for image in (tmp_path / "chartqa/train/png").iterdir():
        image.unlink()
    with pytest.raises(ShardFormatError) as err:
        convert("chartqa", tmp_path / "chartqa", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "chartqa/train: no usable sample" in message
    assert "5 missing image" in message and str(tmp_path / "chartqa/train/png/1234.png") in message
    assert ShardIndex.load(tmp_path / "out").splits == before  # nothing replaced
    assert ShardIndex.load(tmp_path / "out").shards("train")

    result = run_cli("chartqa", tmp_path / "chartqa", tmp_path / "out2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "5 missing image" in errors[0]


def test_non_jpeg_png_images_are_reencoded_as_png(tmp_path):
    make_coco(tmp_path / "coco")
    # a BMP under the COCO file name: not storable as is
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "coco/val2017/000000000001.jpg", format="BMP")
    convert("coco", tmp_path / "coco", tmp_path / "out", split="val")
    sample = read_split(tmp_path / "out", "val", "coco")["coco_1"]
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.format == "PNG" and image.getpixel((0, 0)) == (1, 2, 3)


def test_three_sources_share_one_index(tmp_path):
    make_coco(tmp_path / "coco", split="train")
    make_docvqa(tmp_path / "docvqa")
    make_chartqa(tmp_path / "chartqa")
    out = tmp_path / "out"
    convert("coco", tmp_path / "coco", out)
    convert("docvqa", tmp_path / "docvqa", out)
    convert("chartqa", tmp_path / "chartqa", out)
    convert("chartqa", tmp_path / "chartqa", out, limit=2)  # re-converting replaces, never duplicates
    index = ShardIndex.load(out)
    assert index.counts("train") == {"coco": 2, "docvqa": 3, "chartqa": 2}
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "chartqa-000000.tar", "coco-000000.tar", "docvqa-000000.tar"]


def test_size_bounded_sharding(tmp_path):
    expected = make_chartqa(tmp_path / "chartqa")
    entries = convert("chartqa", tmp_path / "chartqa", tmp_path / "out", max_samples=2)
    assert [e.count for e in entries] == [2, 2, 1]
    index = ShardIndex.load(tmp_path / "out")
    assert [(e.path, e.count) for e in index.shards("train")] == [
        ("train/chartqa-000000.tar", 2), ("train/chartqa-000001.tar", 2), ("train/chartqa-000002.tar", 1)]
    for entry in entries:
        with tarfile.open(tmp_path / "out" / entry.path) as tar:
            assert sum(m.name.endswith(".png") for m in tar.getmembers()) == entry.count
    assert set(read_split(tmp_path / "out", "train", "chartqa")) == set(expected)

    # a byte bound below two samples puts one sample in each shard
    entries = convert("chartqa", tmp_path / "chartqa", tmp_path / "out", max_bytes=3000)
    assert [e.count for e in entries] == [1] * 5


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensel.datamodules.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_wrong_folder_is_a_one_line_error(tmp_path):
    result = run_cli("docvqa", tmp_path / "nowhere", tmp_path / "out", "--split", "val")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(tmp_path / "nowhere/val/val_v1.0.json") in lines[0]


def test_cli_success_reports_counts_and_skips(tmp_path):
    make_coco(tmp_path / "coco")
    result = run_cli("coco", tmp_path / "coco", tmp_path / "out", "--split", "val", "--max-shard-samples", "1")
    assert result.returncode == 0, result.stderr
    assert "coco/val: wrote 2 samples in 2 shard(s)" in result.stdout
    assert "skipped 1 (1 no captions)" in result.stdout
    assert ShardIndex.load(tmp_path / "out").counts("val") == {"coco": 2}
