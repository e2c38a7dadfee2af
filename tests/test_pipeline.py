"""The reader pipeline: disjoint reads, equal batch counts per rank, bad samples skipped."""

import io
import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from tokensel.datamodules.pipeline import ShardStream
from tokensel.datamodules.samples import Preprocess, preprocess_image
from tokensel.datamodules.shards import ShardFormatError, ShardIndex

PRE = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


def stream(root, split, **kw):
    index = ShardIndex.load(root)
    args = dict(train=split == "train", batch_size=4, preprocess=PRE, shuffle_buffer=8, seed=0)
    args.update(kw)
    return ShardStream(root, index.shards(split), **args)


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def run_rank(s: ShardStream):
    loader = DataLoader(s, batch_size=None, num_workers=s.workers if s.workers > 1 else 0)
    return list(loader)


def test_validation_reads_every_sample_exactly_once_across_ranks_and_workers(tiny_corpus):
    index = ShardIndex.load(tiny_corpus)
    total = sum(index.counts("val").values())
    for world, workers in [(1, 1), (2, 1), (2, 2), (3, 2)]:
        seen = []
        for rank in range(world):
            s = stream(tiny_corpus, "val", rank=rank, world=world, num_workers=workers)
            batches = run_rank(s)
            assert len(batches) == len(s), "len() must match what the rank yields"
            seen += keys_of(batches)
        assert len(seen) == total and len(set(seen)) == total, (world, workers)


def test_training_gives_every_rank_the_same_number_of_batches_on_uneven_shards(tiny_corpus):
    index = ShardIndex.load(tiny_corpus)
    sizes = Counter(e.count for e in index.shards("train"))
    assert len(sizes) > 1, "the fixture must have uneven shards"
    for world, workers in [(2, 1), (2, 2), (3, 1)]:
        lengths = []
        for rank in range(world):
            s = stream(tiny_corpus, "train", rank=rank, world=world, num_workers=workers)
            batches = run_rank(s)
            assert all(len(b["keys"]) == 4 for b in batches), "training batches are full"
            lengths.append(len(batches))
            assert len(batches) == len(s)
        assert len(set(lengths)) == 1, (world, workers, lengths)


def test_training_readers_read_disjoint_samples_within_a_pass(tiny_corpus):
    # 40 coco samples in shards of 7,7,7,7,7,5 over 2 ranks x 2 workers: each reader owns at least
    # 5 samples, so an epoch of 20 (5 per reader, no look-ahead buffer) is within one pass.
    seen = []
    for rank in range(2):
        s = stream(tiny_corpus, "train", rank=rank, world=2, num_workers=2, samples_per_epoch=20,
                   batch_size=1, weights={"coco": 1}, shuffle_buffer=1)
        seen += keys_of(run_rank(s))
    assert len(seen) == len(set(seen)) == 20


def test_epochs_reshuffle_and_seeds_repeat(tiny_corpus):
    a = keys_of(run_rank(stream(tiny_corpus, "train", epoch=0)))
    b = keys_of(run_rank(stream(tiny_corpus, "train", epoch=0)))
    c = keys_of(run_rank(stream(tiny_corpus, "train", epoch=1)))
    assert a == b
    assert a != c


def test_source_weights_steer_the_mix(tiny_corpus):
    s = stream(tiny_corpus, "train", weights={"coco": 1, "docvqa": 0, "chartqa": 3}, samples_per_epoch=400)
    sources = Counter(src for b in run_rank(s) for src in b["source"])
    assert "docvqa" not in sources
    assert sources["chartqa"] > 2 * sources["coco"]


def test_bad_weights_name_the_source(tiny_corpus):
    with pytest.raises(ShardFormatError, match="imagenet"):
        stream(tiny_corpus, "train", weights={"imagenet": 1})


def _jpeg(colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    good = json.dumps({"source": "coco", "captions": ["a red square"]}).encode()
    members = [
        {"__key__": "ok1", "jpg": _jpeg(), "json": good},
        {"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "json": good},
        {"__key__": "badjson", "jpg": _jpeg(), "json": b"{not json"},
        {"__key__": "nojson", "jpg": _jpeg()},
        {"__key__": "pickled", "jpg": _jpeg(), "json": good, "pyd": b"\x80\x04K\x01."},
        {"__key__": "schema", "jpg": _jpeg(), "json": json.dumps({"source": "imagenet"}).encode()},
        {"__key__": "ok2", "jpg": _jpeg(), "json": good},
    ]
    (tmp_path / "val").mkdir()
    with wds.TarWriter(str(tmp_path / "val" / "coco-000000.tar")) as tar:
        for m in members:
            tar.write(m)
    (tmp_path / "index.json").write_text(json.dumps({"format": "tokensel-shards/1", "splits": {
        "val": [{"path": "val/coco-000000.tar", "source": "coco", "count": len(members)}]}}))
    batches = run_rank(stream(tmp_path, "val", batch_size=8))
    assert keys_of(batches) == ["ok1", "ok2"]
    assert sum(b["n_skipped"] for b in batches) == 5


def test_preprocess_keeps_the_whole_image_and_maps_the_box():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    pixels, box = preprocess_image(image, [100, 50, 200, 100], PRE, "squash")
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, torch.ones_like(pixels))  # white, normalised with mean/std 0.5
    assert box.tolist() == [16.0, 16.0, 32.0, 32.0]
    _, padded = preprocess_image(image, [100, 50, 200, 100], PRE, "pad")
    # padded to 200x200 (50 px above), then scaled by 32/200
    assert padded.tolist() == pytest.approx([16.0, 16.0, 32.0, 24.0])
    _, none = preprocess_image(image, None, PRE, "squash")
    assert torch.isnan(none).all()
