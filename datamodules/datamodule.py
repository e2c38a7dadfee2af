"""The shared frozen-encoder DataModule: shards in, :class:`FeatureBatch` on the device out.

Each split gets a :class:`~tokensel.datamodules.features.FeatureSource`: the feature cache when
one matches (``feature_cache.py``; ``data.feature_cache=auto`` builds it first when there is none),
else the frozen encoder online. Workers read and decode; after Lightning moves a batch to the
device, ``on_after_batch_transfer`` hands it to the split's source, which returns the
``FeatureBatch``. Selectors never see the encoder, so it is in no optimizer and no checkpoint; with
a matching cache it is not even built.

A checkpoint records where the training stream is (the epoch, and the batches of it each rank has
trained on; ``loaders.py``), so a resumed run reads on from the next batch, not from the start of
the epoch. The cache mirrors the image shards, so that position means the same in both.
"""

from __future__ import annotations

import logging
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from tokensel.datamodules.batch import FeatureBatch
from tokensel.datamodules.config import FEATURE_CACHE_MODES, DataConfig, EncoderConfig, data_root
from tokensel.datamodules.encoders import FrozenEncoder, build_encoder
from tokensel.datamodules.feature_cache import (FeatureCacheError, build_cache, cache_base, find_cache,
                                                fingerprint, mismatch_message)
from tokensel.datamodules.features import CachedFeatures, FeatureSource, OnlineFeatures
from tokensel.datamodules.loaders import StreamLoader, ValLoader
from tokensel.datamodules.pipeline import ShardStream
from tokensel.datamodules.shards import ShardFormatError, ShardIndex

log = logging.getLogger("tokensel.data")
__all__ = ["DataConfig", "EncoderConfig", "FeatureDataModule"]


class FeatureDataModule(L.LightningDataModule):
    """Streams shards and turns each batch into a :class:`FeatureBatch` (see the module docstring).

    Everything a user can get wrong (data root, splits, weights, encoder name and weights, a
    required cache that does not match) is checked in ``__init__``, before any selector is built.
    """

    def __init__(self, data: DataConfig, encoder: EncoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = data
        self.encoder_cfg = encoder
        self.seed = seed
        self.root = data_root(data)
        self.index = ShardIndex.load(self.root)
        self.train_entries = self.index.shards(data.train_split)
        self.val_entries = self.index.shards(data.val_split) if data.val_split in self.index.splits else []
        if not self.val_entries:
            log.warning("%s has no %r split: validation is off", self.root / "index.json", data.val_split)
        if data.feature_cache not in FEATURE_CACHE_MODES:
            raise FeatureCacheError(f"data.feature_cache={data.feature_cache!r}: expected one of "
                                    f"{', '.join(FEATURE_CACHE_MODES)}")
        self.cache_base = cache_base(data)
        splits = {data.train_split: self.train_entries, data.val_split: self.val_entries}
        self.fingerprints = {}
        self.sources: dict[str, FeatureSource] = {}
        for split, entries in splits.items():
            if not entries or data.feature_cache == "off":
                continue
            self.fingerprints[split] = fp = fingerprint(data, encoder, self.root, split, entries)
            cache = find_cache(self.cache_base, fp)
            if cache is None and data.feature_cache == "required":
                raise FeatureCacheError(mismatch_message(self.cache_base, fp))
            if cache is not None:
                self.sources[split] = CachedFeatures(cache)
        self.encoder: Optional[FrozenEncoder] = None
        if len(self.sources) < sum(1 for e in splits.values() if e):  # some split is read online
            self.encoder = build_encoder(encoder.name, encoder.pretrained, encoder.layer, encoder.norm,
                                         encoder.image_size, encoder.precision, encoder.init_seed)
            if data.cls_attention_layer is not None:  # fail now, not at the first batch
                self.encoder.check_cls_attention(data.cls_attention_layer)
            for split, entries in splits.items():
                if entries and split not in self.sources:
                    self.sources[split] = self._online(entries)
        self.dims = self.sources[data.train_split].dims
        self.cache_build_batches = 0  # encoder forwards spent building caches
        self.rank, self.world = 0, 1
        self._train_loader: Optional[StreamLoader] = None
        self._val_loader: Optional[ValLoader] = None
        self._loaded_position: dict = {}  # from a checkpoint, for the next train loader
        self._validated_before_resume = False
        # Build the streams once here so bad weights or modes fail before training starts.
        self._stream(train=True)

    def _online(self, entries) -> OnlineFeatures:
        pinpoints = self.cfg.view_pinpoints if self.cfg.views == "anyres" else None
        return OnlineFeatures(self.encoder, self.root, entries, self.cfg.resize_mode, self.cfg.recon_size,
                              self.cfg.cls_attention_layer, pinpoints)

    @property
    def has_val(self) -> bool:
        return bool(self.val_entries)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size

    # ---- features -----------------------------------------------------------------------------
    def prepare_features(self, split: str) -> FeatureSource:
        """The split's source; under ``data.feature_cache=auto`` a missing cache is built first
        (its shards split across the ranks). Every rank calls this at the same point."""
        source = self.sources[split]
        if source.kind == "cached" or self.cfg.feature_cache != "auto":
            return source
        strategy = self.trainer.strategy if self.trainer is not None else None
        barrier = strategy.barrier if strategy is not None else (lambda: None)
        fp = self.fingerprints[split]
        # another run may have finished it meanwhile; rank 0 decides for all, so no rank waits alone
        cache = find_cache(self.cache_base, fp)
        found = strategy.broadcast(cache is not None, src=0) if strategy is not None else cache is not None
        if not found:
            device = strategy.root_device if strategy is not None else torch.device("cpu")
            before = source.encoder_batches
            build_cache(self.cache_base, fp, source, batch_size=self.cfg.val_batch_size or self.cfg.batch_size,
                        device=device, rank=self.rank, world=self.world, barrier=barrier,
                        progress=self.rank == 0)
            self.cache_build_batches += source.encoder_batches - before
            source.encoder_batches = before
            cache = None
        if cache is None:  # read once more only after a build
            cache = find_cache(self.cache_base, fp)
        if cache is None:
            raise FeatureCacheError(f"{self.cache_base}: the {split} feature cache is missing after its build")
        self.sources[split] = CachedFeatures(cache)
        return self.sources[split]

    def feature_report(self) -> dict:
        """For metrics.json: each split's source, and the encoder's forwards outside cache builds."""
        return {"sources": {s: src.describe() for s, src in self.sources.items()},
                "encoder_built": self.encoder is not None,
                "encoder_batches": {s: src.encoder_batches for s, src in self.sources.items()},
                "cache_build_batches": self.cache_build_batches}

    # ---- loaders ----------------------------------------------------------------------------
    def _stream(self, train: bool, whole: bool = False) -> ShardStream:
        cfg = self.cfg
        source = self.sources[cfg.train_split if train else cfg.val_split]
        rank, world = (0, 1) if whole else (self.rank, self.world)
        return ShardStream(
            source.root, source.entries, train=train, decoder=source.decoder, resize_mode=cfg.resize_mode,
            batch_size=cfg.batch_size if train else (cfg.val_batch_size or cfg.batch_size),
            rank=rank, world=world, num_workers=cfg.num_workers, seed=self.seed, weights=cfg.weights,
            samples_per_epoch=cfg.samples_per_epoch, shuffle_buffer=cfg.shuffle_buffer,
        )

    def epoch_loader(self, split: str, epoch: int = 0, whole: bool = False) -> DataLoader:
        """One pass over ``split`` outside a Trainer (the train split in ``epoch``'s order), read by
        the run's workers; features are built (or cached first) as for training. ``whole``: all of
        the split in this process, not this rank's share of it."""
        self.prepare_features(split)
        stream = self._stream(train=split == self.cfg.train_split, whole=whole)
        stream.seek(epoch)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          pin_memory=torch.cuda.is_available())

    def _loader_kwargs(self) -> dict:
        workers = self.cfg.num_workers
        return dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        self.prepare_features(self.cfg.train_split)
        self._train_loader = StreamLoader(self._stream(train=True), self._trainer_epoch, self._trainer_progress,
                                          **self._loader_kwargs())
        self._train_loader.load_state_dict(self._loaded_position)
        self._loaded_position = {}
        return self._train_loader

    def _trainer_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _trainer_progress(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.num_training_batches

    # Lightning restores a stateful loader only when it builds the loader after restoring its loops;
    # it builds ours earlier (the LR schedule asks for estimated_stepping_batches), so the position
    # also travels in the datamodule's own checkpoint state, which is restored first.
    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        return {"train_position": self._train_loader.state_dict(),
                "validated": self._val_loader is not None and self._val_loader.iterated}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded_position = dict(state_dict.get("train_position", {}))
        self._validated_before_resume = bool(state_dict.get("validated", False))

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_val:
            return []
        self.prepare_features(self.cfg.val_split)
        stream = self._stream(train=False)
        if any(stream.batches_per_worker(w) == 0 for w in range(stream.workers)):
            raise ShardFormatError(
                f"{self.root}: split {self.cfg.val_split!r} has too few samples for {stream.readers} readers "
                f"({self.world} ranks x {stream.workers} workers); lower data.num_workers"
            )
        self._val_loader = ValLoader(stream, self._validated_before_resume, **self._loader_kwargs())
        return self._val_loader

    # ---- the one place batches become features ---------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> FeatureBatch:
        training = self.trainer is not None and self.trainer.training
        return self.features(batch, self.cfg.train_split if training else self.cfg.val_split)

    def features(self, batch: dict, split: Optional[str] = None) -> FeatureBatch:
        """A reader batch of ``split`` (default: the validation split), already on the target device,
        as a ``FeatureBatch``: from the cache, or through the frozen encoder."""
        return self.sources[split or self.cfg.val_split].features(batch)
