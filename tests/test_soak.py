"""Data loss is visible: 1,000 samples with about 5 % damaged (flipped image bytes, bad json,
pickled members) and one shard cut to 60 % of its bytes. Reading never crashes, yields exactly the
intact samples, and counts every lost one, in validation and in training; a reader resumed
mid-epoch yields exactly the rest of the epoch."""

import io
import logging
import re
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from tokensel.datamodules.benchmarks import BENCHMARKS, CAPTION
from tokensel.datamodules.pipeline import ShardStream
from tokensel.datamodules.samples import Preprocess
from tokensel.datamodules.shards import ShardIndex, ShardWriter

PRE = Preprocess((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
SIZES = {"coco": 640, "docvqa": 256, "chartqa": 104}  # 1,000 samples, shards of 128
CUT = ("docvqa", 1)  # docvqa-000001.tar keeps 60 % of its bytes
DAMAGES = ("flipped image", "bad json", "pickled member")


def meta(source: str, i: int) -> dict:
    if BENCHMARKS.get(source).kind == CAPTION:
        return {"source": source, "captions": [f"caption {i}", f"another {i}"]}
    return {"source": source, "question": f"question {i}?", "answers": [f"answer {i}"]}


def damage_of(i: int):
    """Every 20th sample of a source is damaged (never a shard's first: 128 % 20 != 0)."""
    return DAMAGES[(i // 20) % 3] if i % 20 == 7 else None


def rewrite(path, damaged: dict) -> None:
    """Rewrite a shard with the json of some keys made invalid or a pickled member added."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    with wds.TarWriter(str(path), mtime=0) as out:
        for key, sample in samples.items():
            if damaged.get(key) == "bad json":
                sample["json"] = b'{"source": "coco", "captions": ["cut here'
            elif damaged.get(key) == "pickled member":
                sample["pyd"] = b"\x80\x04K\x01."
            out.write(sample)


def survivors_of_cut(path, keep_bytes: int) -> set:
    """Keys whose every member lies within the first ``keep_bytes`` bytes of the intact tar."""
    complete, seen = {}, set()
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            seen.add(key)
            complete[key] = complete.get(key, True) and member.offset_data + member.size <= keep_bytes
    return {k for k in seen if complete[k]}


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """The corpus (split "val"), its intact keys per source and its lost-sample count per source."""
    root = tmp_path_factory.mktemp("soak")
    good, lost = {}, {}
    for source, n in SIZES.items():
        damaged = {}
        with ShardWriter(root, "val", source, max_samples=128) as writer:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (12, 10), (i % 256, (7 * i) % 256, 99)).save(buf, format="JPEG")
                image = buf.getvalue()
                key = f"{source}_{i:04d}"
                if damage_of(i) == "flipped image":
                    image = bytes(255 - b for b in image)
                elif damage_of(i):
                    damaged[key] = damage_of(i)
                writer.write(key, image, "jpg", meta(source, i))
        keys = {f"{source}_{i:04d}" for i in range(n) if damage_of(i) is None}
        for entry in writer.entries:
            rewrite(root / entry.path, damaged)
        if source == CUT[0]:
            path = root / writer.entries[CUT[1]].path
            data = path.read_bytes()
            keep = int(0.6 * len(data))
            shard_keys = {m.name.split(".")[0] for m in tarfile.open(path).getmembers()}
            cut_off = shard_keys - survivors_of_cut(path, keep)
            keys -= cut_off
            path.write_bytes(data[:keep])
        good[source], lost[source] = keys, n - len(keys)
    damaged = sum(1 for s, n in SIZES.items() for i in range(n) if damage_of(i))
    assert damaged == 50 and 40 <= len(cut_off) <= 60  # 5 % damaged; the cut loses ~50 more
    return root, good, lost


def read(root, *, world=1, workers=1, **kw):
    """Every rank's batches of one pass, through real DataLoaders."""
    index = ShardIndex.load(root)
    out = []
    for rank in range(world):
        stream = ShardStream(root, index.shards("val"), preprocess=PRE, rank=rank, world=world,
                             num_workers=workers, **{"train": False, "batch_size": 16, **kw})
        out += list(DataLoader(stream, batch_size=None, num_workers=workers if workers > 1 else 0))
    return out


@pytest.mark.parametrize("world,workers", [(1, 1), (5, 2)])  # 5 x 2 > 8 shards: sample stride
def test_validation_reads_every_intact_sample_once_and_counts_every_lost_one(soak, world, workers, caplog):
    root, good, lost = soak
    with caplog.at_level(logging.WARNING, logger="tokensel.data"):
        batches = read(root, world=world, workers=workers)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) and set(keys) == set().union(*good.values())
    assert sum(b["n_skipped"] for b in batches) == sum(lost.values())  # e.g. 50 damaged + the cut's loss
    assert len(keys) + sum(lost.values()) == 1000
    if workers == 1:  # (workers log in their own processes) the cut shard is named, with both counts
        cut = f"val/{CUT[0]}-{CUT[1]:06d}.tar"
        warned = [r.getMessage() for r in caplog.records if "index.json lists" in r.getMessage()]
        assert len(warned) == 1 and re.search(cut + r" yielded \d\d of the 128 samples", warned[0]), warned


def test_training_epoch_counts_every_lost_sample(soak):
    # One reader, one source, batch 1, no shuffle buffer: an epoch one sample longer than the
    # source's intact samples reads every shard once (the last batch is the next pass's first
    # sample, a shard's first, never damaged), so it meets each lost sample exactly once.
    root, good, lost = soak
    n = len(good[CUT[0]])
    batches = read(root, train=True, batch_size=1, weights={CUT[0]: 1}, samples_per_epoch=n + 1, shuffle_buffer=1)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == n + 1 and set(keys[:n]) == good[CUT[0]] and keys[n] in good[CUT[0]]
    assert sum(b["n_skipped"] for b in batches) == lost[CUT[0]]


@pytest.mark.parametrize("done", [5, 8])
def test_a_reader_resumed_mid_epoch_yields_exactly_the_rest(soak, done):
    # two workers (round-robin), a shuffle buffer and damaged samples: after `done` batches the
    # resumed pass equals the rest of the uninterrupted one, batch for batch, skip counts included
    root, _, _ = soak
    kw = dict(train=True, batch_size=4, weights={}, samples_per_epoch=120, shuffle_buffer=8, epoch=3)
    full = read(root, workers=2, **kw)
    index = ShardIndex.load(root)
    stream = ShardStream(root, index.shards("val"), preprocess=PRE, num_workers=2, **kw)
    stream.seek(3, done)
    rest = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(full) == len(stream) == 30 and len(rest) == 30 - done
    for a, b in zip(full[done:], rest):
        assert a["keys"] == b["keys"] and a["target"] == b["target"] and a["n_skipped"] == b["n_skipped"]
        assert torch.equal(a["pixels"], b["pixels"])
    assert sum(b["n_skipped"] for b in full) > 0  # the stretch had damage in it
