"""POPE, on a miniature copy of its release (``coco_pope_{subset}.json``, JSON lines, over COCO's
val2014 images) and of lmms-lab's parquet release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_convert import read_split, run_cli, write_image
from test_convert_parquet import image_bytes, write_parquet
from tokensel.datamodules.convert import convert
from tokensel.datamodules.raw_layout import Skips
from tokensel.datamodules.shards import ShardFormatError, validate_meta


def write_lines(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def question(qid: int, image_id: int, thing: str, label: str) -> dict:
    return {"question_id": qid, "image": f"COCO_val2014_{image_id:012d}.jpg", "image_id": image_id,
            "text": f"Is there a {thing} in the image?", "label": label}


def make_pope(root: Path, files: Path | None = None) -> dict[str, bytes]:
    """coco_pope_random.json and coco_pope_adversarial.json in ``files`` (default ``root``), COCO's
    val2014 images in ``root/val2014``. Returns key -> image bytes."""
    files = files or root
    pictures = {i: write_image(root / f"val2014/COCO_val2014_{i:012d}.jpg", "JPEG", (i % 250, 20, 20))
                for i in (548882, 8211)}
    write_lines(files / "coco_pope_random.json", [
        question(0, 548882, "dining table", "yes"), question(1, 548882, "tv", "no"),
        question(2, 8211, "motorcycle", "yes")])
    write_lines(files / "coco_pope_adversarial.json", [question(0, 548882, "fork", "no")])
    return {"pope_random_0": pictures[548882], "pope_random_1": pictures[548882], "pope_random_2": pictures[8211],
            "pope_adversarial_0": pictures[548882]}


@pytest.mark.parametrize("files", [None, "output/coco"])  # the files alone, or a clone of the release
def test_pope_round_trip(tmp_path, files):
    root = tmp_path / "pope"
    expected = make_pope(root, root / files if files else None)
    convert("pope", root, tmp_path / "out", split="val")
    samples = read_split(tmp_path / "out", "val", "pope")
    assert {k: s["jpg"] for k, s in samples.items()} == expected
    meta = validate_meta(json.loads(samples["pope_random_1"]["json"]))
    assert (meta["question"], meta["answers"]) == ("Is there a tv in the image?", ["no"])
    assert meta["provenance"] == {"dataset": "pope", "subset": "random", "question_id": 1,
                                  "file": "val2014/COCO_val2014_000000548882.jpg"}


def test_subsets_are_chosen_by_name(tmp_path):
    make_pope(tmp_path / "pope")
    result = run_cli("pope", tmp_path / "pope", tmp_path / "out", "--split", "val", "--subsets", "adversarial")
    assert result.returncode == 0, result.stderr
    assert list(read_split(tmp_path / "out", "val", "pope")) == ["pope_adversarial_0"]
    with pytest.raises(ShardFormatError, match="coco_pope_popular.json"):
        convert("pope", tmp_path / "pope", tmp_path / "out", split="val", subsets="popular")
    with pytest.raises(ShardFormatError, match="subsets=hard: POPE's subsets are random, popular, adversarial"):
        convert("pope", tmp_path / "pope", tmp_path / "out", split="val", subsets="hard")


def test_pope_has_one_split(tmp_path):
    make_pope(tmp_path / "pope")
    result = run_cli("pope", tmp_path / "pope", tmp_path / "out")  # the command's default split is train
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "POPE has one split, val" in result.stderr.strip().splitlines()[-1]


def test_a_bad_line_is_named(tmp_path):
    make_pope(tmp_path / "pope")
    write_lines(tmp_path / "pope/coco_pope_random.json", [question(0, 548882, "cat", "maybe")])
    with pytest.raises(ShardFormatError, match="entry 1 needs .* 'label' of yes or no") as err:
        convert("pope", tmp_path / "pope", tmp_path / "out", split="val")
    assert str(tmp_path / "pope/coco_pope_random.json") in str(err.value)
    (tmp_path / "pope/coco_pope_random.json").write_text('{"question_id": 0,\n')
    with pytest.raises(ShardFormatError, match="line 1 is not json"):
        convert("pope", tmp_path / "pope", tmp_path / "out", split="val")


def test_missing_images_are_skipped_and_counted(tmp_path):
    make_pope(tmp_path / "pope")
    (tmp_path / "pope/val2014/COCO_val2014_000000008211.jpg").unlink()
    skips = Skips()
    entries = convert("pope", tmp_path / "pope", tmp_path / "out", split="val", skips=skips)
    assert sum(e.count for e in entries) == 3 and skips.counts == {"missing image": 1}


def test_lmms_lab_pope_round_trip(tmp_path):
    pictures = [image_bytes((1, 20, 20), "JPEG"), image_bytes((2, 20, 20), "JPEG")]
    write_parquet(tmp_path / "lmms/data/test-00000-of-00001.parquet", {
        "id": ["0", "1"], "question_id": ["1", "1"],
        "question": ["Is there a snowboard in the image?", "Is there a fork in the image?"],
        "answer": ["yes", "no"], "image_source": ["COCO_val2014_000000310196", "COCO_val2014_000000548882"],
        "image": pictures, "category": ["random", "adversarial"]})
    convert("pope", tmp_path / "lmms", tmp_path / "out", split="test", out_split="val")
    samples = read_split(tmp_path / "out", "val", "pope")
    assert {k: s["jpg"] for k, s in samples.items()} == {"pope_random_1": pictures[0],
                                                         "pope_adversarial_1": pictures[1]}
    assert validate_meta(json.loads(samples["pope_adversarial_1"]["json"]))["answers"] == ["no"]
