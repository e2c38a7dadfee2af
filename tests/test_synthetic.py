"""The synthetic corpus: counts, schema, determinism, and answer boxes that point at the evidence."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokensel.common.cli import run_main
from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION
from tokensel.datamodules.shards import ShardIndex, validate_meta
from tokensel.datamodules.synthetic import GENERATED
from tokensel.datamodules.synthetic import DEFAULT_TRAIN, DEFAULT_VAL, PARAMS_NAME, corpus_params
from tokensel.datamodules.synthetic import ensure_corpus, generate_corpus, main
from tokensel.datamodules.synthetic_render import COLOURS, SHAPES, draw_scene

TRAIN = {"coco": 6, "docvqa": 6, "chartqa": 6, "vqav2": 6}
VAL = {"coco": 3, "docvqa": 3, "chartqa": 3, "vqav2": 3}
SCENES = ("coco", "vqav2")  # photos as JPEG, documents and charts as PNG


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard of a split listed in the index."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in ShardIndex.load(root).shards(split):
        for name, data in read_members(root / entry.path):
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def corpus_contents(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Shard path -> its members, for every shard in the index."""
    index = ShardIndex.load(root)
    return {e.path: read_members(root / e.path) for entries in index.splits.values() for e in entries}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_corpus(out, seed=0, train=TRAIN, val=VAL, max_samples_per_shard=4, workers=1)
    return out


def test_counts_match_index_and_shards(corpus):
    index = ShardIndex.load(corpus)
    assert index.counts("train") == TRAIN
    assert index.counts("val") == VAL
    for entries in index.splits.values():
        for entry in entries:
            names = [name for name, _ in read_members(corpus / entry.path)]
            assert sum(name.endswith(".json") for name in names) == entry.count
            assert entry.count <= 4
            assert entry.bytes == (corpus / entry.path).stat().st_size
    # 6 samples at 4 per shard: two shards per (train, source)
    assert len(index.shards("train", ["chartqa"])) == 2


@pytest.mark.parametrize("split", ["train", "val"])
def test_samples_follow_the_schema(corpus, split):
    samples = read_samples(corpus, split)
    assert len(samples) == sum((TRAIN if split == "train" else VAL).values())
    for key, members in samples.items():
        meta = validate_meta(json.loads(members["json"]), where=key)
        caption = BENCHMARKS.get(meta["source"]).kind == CAPTION
        ext = "jpg" if meta["source"] in SCENES else "png"
        assert set(members) == {ext, "json"}
        image = Image.open(io.BytesIO(members[ext]))
        assert image.format == ("JPEG" if ext == "jpg" else "PNG")
        assert image.size == (meta["width"], meta["height"])
        assert meta["provenance"]["generator"] == "tokensel.synthetic"
        assert meta["provenance"]["seed"] == 0
        assert key.startswith(f"{meta['source']}_{split}_")
        if caption:
            assert 3 <= len(meta["captions"]) <= 5
            assert len(set(meta["captions"])) == len(meta["captions"])
            assert "answer_box" not in meta
        else:
            assert meta["question"].endswith("?")
            assert len(meta["answers"]) == 1 and meta["answers"][0]


def test_answer_boxes_are_in_bounds_and_cover_ink(corpus):
    checked = 0
    for key, members in read_samples(corpus, "train").items():
        meta = json.loads(members["json"])
        if BENCHMARKS.get(meta["source"]).kind == CAPTION:
            continue
        x0, y0, x1, y1 = meta["answer_box"]
        assert 0 <= x0 < x1 <= meta["width"] and 0 <= y0 < y1 <= meta["height"], key
        ext = "jpg" if meta["source"] in SCENES else "png"
        pixels = np.asarray(Image.open(io.BytesIO(members[ext])).convert("RGB")).astype(int)
        crop = pixels[y0:y1, x0:x1]
        if meta["source"] == "vqav2":
            # the asked-about shape, drawn last, fills its box's centre with the answer's colour
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - COLOURS[meta["answers"][0]]).max() < 40, key
            checked += 1
            continue
        # a tight box around one short printed string, not a region of the page
        assert (x1 - x0) * (y1 - y0) < 0.05 * meta["width"] * meta["height"], key
        if meta["source"] == "docvqa":
            paper = pixels[0, 0]  # the page corner is bare paper
            ink = np.abs(crop - paper).sum(-1) > 150
            assert ink.mean() > 0.05, key
        else:
            assert crop.reshape(-1, 3).std(0).max() > 20, key  # not uniformly the background
            assert crop.sum(-1).min() < 200, key  # the printed label is dark text
        checked += 1
    assert checked == TRAIN["docvqa"] + TRAIN["chartqa"] + TRAIN["vqav2"]


def test_a_scene_question_asks_the_colour_of_a_shape_no_other_in_its_scene_shares(corpus):
    for seed in range(20):
        _, objects, bg = draw_scene(np.random.default_rng(seed), (2, 4), (0.07, 0.16), distinct=True)
        assert 2 <= len(objects) <= 4
        for field in ("shape", "colour"):
            assert len({o[field] for o in objects}) == len(objects)
        assert bg not in {o["colour"] for o in objects}
    questions = [json.loads(m["json"]) for m in read_samples(corpus, "train").values()]
    questions = [q for q in questions if q["source"] == "vqav2"]
    assert len(questions) == TRAIN["vqav2"]
    for meta in questions:
        shape = meta["question"].rstrip("?").split()[-1]
        assert shape in SHAPES and meta["answers"][0] in COLOURS, meta["question"]


def test_a_new_source_leaves_every_other_source_as_it_was(corpus, tmp_path):
    without = {s: n for s, n in TRAIN.items() if s != "vqav2"}
    generate_corpus(tmp_path, seed=0, train=without, val={}, max_samples_per_shard=4, workers=1)
    assert ShardIndex.load(tmp_path).counts("train") == without
    for entry in ShardIndex.load(tmp_path).shards("train"):
        assert read_members(tmp_path / entry.path) == read_members(corpus / entry.path), entry.path


def test_same_seed_same_contents_for_any_worker_count(corpus, tmp_path):
    generate_corpus(tmp_path, seed=0, train=TRAIN, val=VAL, max_samples_per_shard=4, workers=2)
    assert ShardIndex.load(tmp_path).splits == ShardIndex.load(corpus).splits
    assert corpus_contents(tmp_path) == corpus_contents(corpus)
    assert (tmp_path / PARAMS_NAME).read_text() == (corpus / PARAMS_NAME).read_text()


def test_same_seed_identical_shard_bytes(corpus, tmp_path):
    time.sleep(1.1)  # tar mtimes have one-second resolution
    generate_corpus(tmp_path, seed=0, train=TRAIN, val=VAL, max_samples_per_shard=4, workers=1)
    for entries in ShardIndex.load(corpus).splits.values():
        for entry in entries:
            assert (tmp_path / entry.path).read_bytes() == (corpus / entry.path).read_bytes(), entry.path


def test_different_seed_gives_different_samples(corpus, tmp_path):
    generate_corpus(tmp_path, seed=1, train=TRAIN, val=VAL, max_samples_per_shard=4, workers=1)
    ours, theirs = read_samples(corpus, "train"), read_samples(tmp_path, "train")
    assert ours.keys() == theirs.keys()
    for source in GENERATED:
        ext = "jpg" if source in SCENES else "png"
        keys = [k for k in ours if k.startswith(source)]
        assert all(ours[k][ext] != theirs[k][ext] for k in keys), source
    assert json.loads(theirs["coco_train_000000"]["json"])["provenance"]["seed"] == 1


def test_cli_skips_an_up_to_date_corpus(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--train-coco", "2", "--train-docvqa", "1", "--train-chartqa", "1",
            "--val-per-source", "1", "--shard-samples", "2", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: 4 samples (coco 2, docvqa 1, chartqa 1) in 3 shard(s)" in out
    assert "val: 3 samples" in out and "generated in" in out
    stamp = (tmp_path / "index.json").stat().st_mtime_ns

    assert main(args) == 0
    assert "already generated" in capsys.readouterr().out
    assert (tmp_path / "index.json").stat().st_mtime_ns == stamp

    # a complete corpus is used as it is
    assert ensure_corpus(tmp_path) == tmp_path
    assert (tmp_path / "index.json").stat().st_mtime_ns == stamp

    # other parameters regenerate
    assert main(args + ["--seed", "3"]) == 0
    assert "generated in" in capsys.readouterr().out
    assert json.loads((tmp_path / PARAMS_NAME).read_text())["seed"] == 3


def test_cli_mistakes_are_one_error_line(tmp_path, capsys):
    assert run_main(main, ["--out", str(tmp_path), "--train-coco", "-1"]) == 2
    assert run_main(main, ["--out", str(tmp_path), "--no-such-option"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "'coco': -1" in lines[0] and "--no-such-option" in lines[1]


def test_cli_presets_and_per_source_counts(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--preset", "scenes", "--train-vqav2", "3", "--val-vqav2", "2",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 samples (vqav2 3) in 1 shard(s)" in out and "val: 2 samples (vqav2 2)" in out
    assert ShardIndex.load(tmp_path / "s").counts("val") == {"vqav2": 2}
    # --val-per-source gives held-out samples to the sources that have training samples
    assert main(["--out", str(tmp_path / "d"), "--train-coco", "2", "--train-docvqa", "0", "--train-chartqa", "1",
                 "--val-per-source", "1", "--workers", "1"]) == 0
    assert ShardIndex.load(tmp_path / "d").counts("val") == {"coco": 1, "chartqa": 1}
    # a preset written over another corpus replaces every generated source's shards
    assert main(["--out", str(tmp_path / "d"), "--preset", "scenes", "--train-vqav2", "3", "--workers", "1"]) == 0
    assert ShardIndex.load(tmp_path / "d").counts("train") == {"vqav2": 3}
    assert run_main(main, ["--out", str(tmp_path / "x"), "--preset", "nope"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_a_corpus_without_the_new_source_stays_up_to_date():
    # the parameters name only the sources that have samples: the default corpus's did not change
    params = corpus_params(0, DEFAULT_TRAIN, DEFAULT_VAL, 128)
    assert params["splits"] == {"train": {"coco": 768, "docvqa": 256, "chartqa": 256},
                                "val": {"coco": 64, "docvqa": 64, "chartqa": 64}}
