"""lmms-lab's parquet releases, on miniature folders laid out as a downloaded copy of the hub
dataset (``data/{split}-0000i-of-0000n.parquet``, DocVQA's ``DocVQA/`` config folder), with the
image column as the ``datasets`` Image feature writes it (a struct of bytes and path)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_module
from test_convert import read_split
from tokensel.datamodules.convert import convert
from tokensel.datamodules.raw_layout import Skips
from tokensel.datamodules.shards import ShardFormatError, ShardIndex, validate_meta

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size=(36, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path: Path, columns: dict[str, list], types: dict[str, pa.DataType] | None = None) -> None:
    """One parquet file; an ``image`` column of bytes (or None) is stored as the Image feature's struct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, values in columns.items():
        if name == "image":
            cells = [None if v is None else {"bytes": v, "path": None} for v in values]
            arrays[name] = pa.array(cells, type=IMAGE)
        else:
            arrays[name] = pa.array(values, type=(types or {}).get(name))
    pq.write_table(pa.table(arrays), path)


def make_lmms_docvqa(root: Path) -> dict[str, bytes]:
    """lmms-lab/DocVQA: DocVQA/{validation,test}-*.parquet (and the InfographicVQA config beside it)."""
    pages = [image_bytes((250, 250, 250)), image_bytes((240, 240, 230), "JPEG"), image_bytes((200, 210, 220))]
    common = {"question_types": [["form"]], "docId": [279], "ucsf_document_id": ["x"],
              "ucsf_document_page_no": ["1"], "data_split": ["validation"]}
    write_parquet(root / "DocVQA/validation-00000-of-00002.parquet", {
        "questionId": ["337", "338"], "question": ["what is the date?", "who signed it?"],
        **{k: v * 2 for k, v in common.items()},
        "image": pages[:2], "answers": [["1/8/93", "January 8, 1993"], ["T. F. Riehl"]]})
    write_parquet(root / "DocVQA/validation-00001-of-00002.parquet", {
        "questionId": ["901"], "question": ["what is the total?"], **common, "image": [pages[2]],
        "answers": [["$5.00"]]})
    write_parquet(root / "DocVQA/test-00000-of-00001.parquet", {
        "questionId": ["5"], "question": ["what is the title?"], **common, "image": [pages[0]], "answers": [None]},
        types={"answers": pa.list_(pa.string())})
    write_parquet(root / "InfographicVQA/validation-00000-of-00001.parquet", {
        "questionId": ["1"], "question": ["how many?"], "image": [pages[0]], "answers": [["3"]]})
    return {"docvqa_337": pages[0], "docvqa_338": pages[1], "docvqa_901": pages[2]}


def make_lmms_chartqa(root: Path) -> dict[str, bytes]:
    """lmms-lab/ChartQA: data/test-00000-of-00001.parquet, human questions first."""
    charts = [image_bytes((k * 60, 100, 200)) for k in range(3)]
    write_parquet(root / "data/test-00000-of-00001.parquet", {
        "type": ["human_test", "human_test", "augmented_test"],
        "question": ["What is the value of Apples?", "Which year is highest?", "How many in 2010?"],
        "answer": ["42", "2019", "17"], "image": charts})
    return {"chartqa_human_0": charts[0], "chartqa_human_1": charts[1], "chartqa_augmented_2": charts[2]}


def test_docvqa_parquet_round_trip(tmp_path):
    expected = make_lmms_docvqa(tmp_path / "lmms")
    entries = convert("docvqa", tmp_path / "lmms", tmp_path / "out", split="validation")
    assert sum(e.count for e in entries) == 3  # both files of the split; InfographicVQA is another config
    samples = read_split(tmp_path / "out", "validation", "docvqa")
    assert samples.keys() == expected.keys()
    assert samples["docvqa_337"]["png"] == expected["docvqa_337"]  # stored byte for byte
    assert samples["docvqa_338"]["jpg"] == expected["docvqa_338"]
    meta = validate_meta(json.loads(samples["docvqa_337"]["json"]))
    assert meta["question"] == "what is the date?" and meta["answers"] == ["1/8/93", "January 8, 1993"]
    assert (meta["width"], meta["height"]) == (36, 24)
    assert meta["provenance"] == {"dataset": "docvqa", "release": "lmms-lab/DocVQA", "question_id": "337", "index": 0}

    skips = Skips()
    assert convert("docvqa", tmp_path / "lmms", tmp_path / "out", split="test", skips=skips) == []
    assert skips.counts == {"no answers": 1}


def test_chartqa_parquet_round_trip_into_another_split(tmp_path):
    expected = make_lmms_chartqa(tmp_path / "lmms")
    convert("chartqa", tmp_path / "lmms", tmp_path / "out", split="test", out_split="val")
    assert ShardIndex.load(tmp_path / "out").counts("val") == {"chartqa": 3}
    samples = read_split(tmp_path / "out", "val", "chartqa")
    assert {k: s["png"] for k, s in samples.items()} == expected
    meta = validate_meta(json.loads(samples["chartqa_augmented_2"]["json"]))
    assert (meta["question"], meta["answers"]) == ("How many in 2010?", ["17"])


def test_rows_without_image_bytes_are_skipped_and_counted(tmp_path):
    make_lmms_chartqa(tmp_path / "lmms")
    table = pq.read_table(tmp_path / "lmms/data/test-00000-of-00001.parquet").to_pydict()
    table["image"] = [None, table["image"][1]["bytes"], b"not an image"]
    write_parquet(tmp_path / "lmms/data/test-00000-of-00001.parquet", table)
    skips = Skips()
    entries = convert("chartqa", tmp_path / "lmms", tmp_path / "out", split="test", skips=skips)
    assert sum(e.count for e in entries) == 1
    assert skips.counts == {"missing image": 1, "unreadable image": 1}
    assert "test-00000-of-00001.parquet row 0" in skips.first["missing image"]


def test_a_parquet_folder_without_the_needed_columns_names_them(tmp_path):
    write_parquet(tmp_path / "lmms/data/test-00000-of-00001.parquet", {
        "query": ["What is the value?"], "label": ["42"], "image": [image_bytes((1, 2, 3))]})
    with pytest.raises(ShardFormatError) as err:
        convert("chartqa", tmp_path / "lmms", tmp_path / "out", split="test")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "lmms/data/test-00000-of-00001.parquet") in message
    assert "no column 'type', 'question', 'answer'" in message and "query" in message

    result = run_module("tokensel.datamodules.convert", "chartqa", str(tmp_path / "lmms"), str(tmp_path / "out"),
                        "--split", "test", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'type', 'question', 'answer'" in lines[0]


def test_a_missing_split_lists_the_splits_there_are(tmp_path):
    make_lmms_docvqa(tmp_path / "lmms")
    with pytest.raises(ShardFormatError) as err:
        convert("docvqa", tmp_path / "lmms", tmp_path / "out", split="val")
    assert str(tmp_path / "lmms/DocVQA/val-*.parquet") in str(err.value)
    assert "the splits there are: test, validation" in str(err.value)


def test_a_parquet_release_takes_no_layout_options(tmp_path):
    make_lmms_docvqa(tmp_path / "lmms")
    with pytest.raises(ShardFormatError, match="annotations"):
        convert("docvqa", tmp_path / "lmms", tmp_path / "out", split="validation", annotations="x.json")
