"""The feature cache: cached batches equal online ones, stale caches are never read, a second run
never runs the encoder, corrupt cache shards are skipped and counted, concurrent builds are safe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, run_module
from tokensel.datamodules.config import DataConfig, EncoderConfig
from tokensel.datamodules.datamodule import FeatureDataModule
from tokensel.common.errors import ConfigError
from tokensel.datamodules.feature_cache import FeatureCacheError

FP16_ATOL = 2e-3  # |x| <~ 4 for LayerNorm-ed features: fp16's half-ulp there is 2e-3


def data_config(root: Path, cache: Path, **kw) -> DataConfig:
    base = dict(root=str(root), batch_size=8, num_workers=0, shuffle_buffer=16, recon_size=32,
                feature_cache_dir=str(cache))
    return DataConfig(**{**base, **kw})


ENCODER = EncoderConfig(image_size=64)


def train_batches(datamodule: FeatureDataModule, epoch: int = 0) -> list:
    datamodule.prepare_features("train")
    stream = datamodule._stream(train=True)
    stream.seek(epoch)
    return [datamodule.features(raw, "train") for raw in stream]


def test_cached_batches_equal_online_ones_text_included(tiny_corpus, tmp_path):
    online = FeatureDataModule(data_config(tiny_corpus, tmp_path, feature_cache="off"), ENCODER, seed=3)
    cached = FeatureDataModule(data_config(tiny_corpus, tmp_path, feature_cache="auto"), ENCODER, seed=3)
    for epoch in (0, 1):  # epoch 1: another order and other caption/answer draws
        ref, got = train_batches(online, epoch), train_batches(cached, epoch)
        assert len(ref) == len(got) == 10
        for a, b in zip(ref, got):
            assert (a.keys, a.prompt, a.target, a.source) == (b.keys, b.prompt, b.target, b.source)
            assert torch.allclose(a.features, b.features, atol=FP16_ATOL, rtol=1e-3)
            assert torch.allclose(a.image, b.image, atol=1e-3)
            assert (a.answer_tokens is None) == (b.answer_tokens is None)
            if a.answer_tokens is not None:
                assert torch.equal(a.answer_tokens, b.answer_tokens) and torch.equal(a.has_answer_box, b.has_answer_box)
    assert cached.feature_report()["encoder_batches"]["train"] == 0
    assert cached.cache_build_batches == 13  # one batch per shard: 13 shards of <= 7 samples
    # fp32 storage is exact
    exact = FeatureDataModule(data_config(tiny_corpus, tmp_path, feature_cache_precision="32"), ENCODER, seed=3)
    for a, b in zip(train_batches(online), train_batches(exact)):
        assert torch.equal(a.features, b.features)


def test_cls_attention_is_cached_when_configured(tiny_corpus, tmp_path):
    cfg = data_config(tiny_corpus, tmp_path, cls_attention_layer=-2)
    online = FeatureDataModule(replace(cfg, feature_cache="off"), ENCODER)
    cached = FeatureDataModule(cfg, ENCODER)
    raw_online = next(iter(online.val_dataloader()))
    raw_cached = next(iter(cached.val_dataloader()))
    a, b = online.features(raw_online), cached.features(raw_cached)
    assert b.cls_attention.shape == a.cls_attention.shape and torch.allclose(a.cls_attention, b.cls_attention, atol=1e-6)


def test_a_second_datamodule_does_not_build_the_encoder(tiny_corpus, tmp_path):
    first = FeatureDataModule(data_config(tiny_corpus, tmp_path), ENCODER)
    first.prepare_features("train"), first.prepare_features("val")
    again = FeatureDataModule(data_config(tiny_corpus, tmp_path, feature_cache="required"), ENCODER)
    assert again.encoder is None and again.dims == first.dims
    assert all(s.kind == "cached" for s in again.sources.values())


@pytest.mark.parametrize("change, field", [
    (lambda d, e: (d, replace(e, init_seed=1)), "encoder.weights"),
    (lambda d, e: (replace(d, recon_size=16), e), "data.recon_size"),
    (lambda d, e: (d, replace(e, layer=-2)), "encoder.layer"),
])
def test_a_stale_cache_is_refused_naming_the_field(tiny_corpus, tmp_path, change, field):
    data = data_config(tiny_corpus, tmp_path)
    FeatureDataModule(data, ENCODER).prepare_features("train")
    data2, encoder2 = change(replace(data, feature_cache="required"), ENCODER)
    with pytest.raises(FeatureCacheError) as err:
        FeatureDataModule(data2, encoder2)
    message = str(err.value)
    assert "\n" not in message and field in message and "data.feature_cache=required" in message
    # auto builds a new cache for the new fingerprint instead; the old one stays
    rebuilt = FeatureDataModule(replace(data2, feature_cache="auto"), encoder2)
    assert rebuilt.prepare_features("train").kind == "cached" and len(list(tmp_path.glob("train-*"))) == 2


def test_changed_weights_file_and_changed_shards_are_detected(tiny_corpus, tmp_path):
    from tokensel.datamodules.encoders import build_encoder

    weights = tmp_path / "enc.pth"
    torch.save(build_encoder("timm:vit_tiny_patch16_224", image_size=64).model.state_dict(), weights)
    encoder = replace(ENCODER, pretrained=str(weights))
    data = data_config(tiny_corpus, tmp_path / "cache")
    built = FeatureDataModule(data, encoder)
    built.prepare_features("train"), built.prepare_features("val")
    state = torch.load(weights, weights_only=True)
    state["cls_token"] += 1
    torch.save(state, weights)
    with pytest.raises(FeatureCacheError, match="encoder.weights"):
        FeatureDataModule(replace(data, feature_cache="required"), encoder)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    built = FeatureDataModule(replace(data, root=str(corpus)), ENCODER)
    built.prepare_features("train"), built.prepare_features("val")
    shard = corpus / "val" / "coco-000000.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)  # same index, other bytes on disk
    with pytest.raises(FeatureCacheError, match="data.shards"):
        FeatureDataModule(replace(data, root=str(corpus), feature_cache="required"), ENCODER)


def test_required_without_any_cache_says_how_to_build_one(tiny_corpus, tmp_path):
    with pytest.raises(FeatureCacheError, match="none built yet.*data.feature_cache=auto"):
        FeatureDataModule(data_config(tiny_corpus, tmp_path, feature_cache="required"), ENCODER)


def test_a_corrupt_cache_shard_is_skipped_and_counted(tiny_corpus, tmp_path):
    data = data_config(tiny_corpus, tmp_path)
    FeatureDataModule(data, ENCODER).prepare_features("val")
    (folder,) = tmp_path.glob("val-*")
    shard = folder / "val" / "coco-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated mid-sample
    datamodule = FeatureDataModule(data, ENCODER)  # auto: the val cache exists and is read as it is
    assert datamodule.sources["val"].kind == "cached"
    batches = [datamodule.features(raw) for raw in datamodule.val_dataloader()]
    seen, skipped = sum(len(b) for b in batches), sum(b.n_skipped for b in batches)
    assert skipped > 0 and seen + skipped == 18


def test_two_processes_building_the_same_cache_at_once_leave_a_valid_cache(tiny_corpus, tmp_path):
    script = ("import sys; from tokensel.datamodules.config import DataConfig, EncoderConfig; "
              "from tokensel.datamodules.datamodule import FeatureDataModule; "
              f"d = DataConfig(root={str(tiny_corpus)!r}, batch_size=4, num_workers=0, recon_size=32, "
              f"feature_cache_dir={str(tmp_path)!r}); "
              "FeatureDataModule(d, EncoderConfig(image_size=64)).prepare_features('train')")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    datamodule = FeatureDataModule(data_config(tiny_corpus, tmp_path, batch_size=4), ENCODER)
    assert datamodule.sources["train"].kind == "cached"  # found as built, not rebuilt
    batches = train_batches(datamodule)
    assert sum(b.n_skipped for b in batches) == 0 and sum(len(b) for b in batches) == 80
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_second_make_train_runs_the_encoder_zero_times(tiny_corpus, tmp_path):
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_epochs=2",
                        f"data.feature_cache_dir={tmp_path / 'cache'}"]
    records = []
    for _ in range(2):
        result = run_module("tokensel.experiments.train", "gumbel_ae", *args)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "features train: cached" in result.stdout
        runs = sorted((tmp_path / "gumbel_ae").iterdir())
        records.append(json.loads((runs[-1] / "metrics.json").read_text())["features"])
    first, second = records
    assert first["encoder_built"] and first["cache_build_batches"] > 0
    assert first["encoder_batches"] == {"train": 0, "val": 0}  # training itself read the cache
    assert not second["encoder_built"] and second["cache_build_batches"] == 0
    assert second["encoder_batches"] == {"train": 0, "val": 0}



VIEW_PINPOINTS = [[64, 128], [128, 64], [128, 128]]  # LLaVA-NeXT's grid shape, scaled to a 64 px encoder


def test_anyres_views_reach_the_selector_one_row_per_view_and_are_cached(tiny_corpus, tmp_path):
    from tokensel.datamodules.anyres import anyres_layout

    cfg = data_config(tiny_corpus, tmp_path, views="anyres", view_pinpoints=VIEW_PINPOINTS, batch_size=4)
    online = FeatureDataModule(replace(cfg, feature_cache="off"), ENCODER)
    cached = FeatureDataModule(cfg, ENCODER)
    raws = list(online.val_dataloader())
    batches = [online.features(raw) for raw in raws]
    from tokensel.datamodules.shards import ShardIndex
    sizes = {}
    for entry in ShardIndex.load(tiny_corpus).shards("val"):
        import webdataset as wds
        for sample in wds.WebDataset(str(tiny_corpus / entry.path), shardshuffle=False).decode("pil"):
            image = sample.get("jpg") or sample.get("png")
            sizes[sample["__key__"]] = anyres_layout((image.height, image.width), VIEW_PINPOINTS, 64).num_views
    first = batches[0]
    assert first.view_of is not None and len(first) == len(first.view_index) == first.features.shape[0]
    keys = [k.split("/v")[0] for k in first.keys]
    assert [keys.count(k) for k in dict.fromkeys(keys)] == [sizes[k] for k in dict.fromkeys(keys)]
    assert first.view_index.tolist()[:sizes[keys[0]]] == list(range(sizes[keys[0]]))
    assert sum(len(b) for b in batches) == sum(sizes.values())  # every view of every held-out image once
    boxed = next(b for b in batches if b.answer_tokens is not None)
    assert boxed.has_answer_box.any() and not boxed.has_answer_box.all()  # a box lies in some views only
    for raw_batch, ref in zip(cached.val_dataloader(), batches):
        got = cached.features(raw_batch)
        assert got.keys == ref.keys and torch.equal(got.view_of, ref.view_of)
        assert torch.allclose(got.features, ref.features, atol=FP16_ATOL, rtol=1e-3)
    assert cached.sources["val"].kind == "cached"


def test_anyres_config_mistakes_are_one_line():
    from tokensel.experiments.config import load_config

    with pytest.raises(ConfigError, match=r"data.views='crops'"):
        load_config("gumbel_ae", overrides=["data.views=crops"])
    with pytest.raises(ConfigError, match=r"pinpoint \[336, 0\]"):
        load_config("gumbel_ae", overrides=["data.views=anyres", "data.view_pinpoints=[[336,0]]"])
    with pytest.raises(ConfigError, match="data.resize_mode='pad'"):
        load_config("gumbel_ae", overrides=["data.views=anyres", "data.resize_mode=pad"])


def test_a_shard_rewritten_in_place_at_the_same_size_is_another_cache(tiny_corpus, tmp_path):
    import os

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)  # copy2 keeps the mtimes: the same fingerprint as the original
    data = data_config(corpus, tmp_path / "cache")
    before = FeatureDataModule(data, ENCODER).fingerprints["val"]
    shard = corpus / "val" / "coco-000000.tar"
    stat = shard.stat()
    shard.write_bytes(shard.read_bytes())  # same bytes count, rewritten
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert FeatureDataModule(data, ENCODER).fingerprints["val"]["data.shards"] != before["data.shards"]
