"""The shared frozen-encoder DataModule: shards in, :class:`FeatureBatch` on the device out.

It owns the frozen encoder. Workers decode and preprocess with the encoder's own resolution,
mean and std (``pipeline.py``); after Lightning moves a batch to the device,
``on_after_batch_transfer`` runs the encoder once, under ``no_grad``, and hands the selector a
``FeatureBatch``. Selectors never see the encoder, so it is in no optimizer and no checkpoint.

A checkpoint records where the training stream is (the epoch, and the batches of it each rank has
trained on; ``loaders.py``), so a resumed run reads on from the next batch, not from the start of
the epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tokensel.datamodules.batch import FeatureBatch, FeatureDims, boxes_to_token_mask
from tokensel.datamodules.encoders import FrozenEncoder, build_encoder
from tokensel.datamodules.loaders import StreamLoader, ValLoader
from tokensel.datamodules.pipeline import ShardStream
from tokensel.datamodules.shards import ShardFormatError, ShardIndex

log = logging.getLogger("tokensel.data")
DEFAULT_DATA_ROOT = "data/default"


@dataclass
class DataConfig:
    """``data.*``: where the shards are and how they are read."""

    root: Optional[str] = None  # folder with index.json; None: the generated default corpus
    train_split: str = "train"
    val_split: str = "val"  # an absent split disables validation, with a warning
    weights: Dict[str, float] = field(default_factory=dict)  # source -> weight; {}: by sample count
    batch_size: int = 32  # per rank (the paper: 32)
    val_batch_size: Optional[int] = None  # None: batch_size
    num_workers: int = 2  # per rank
    samples_per_epoch: Optional[int] = None  # None: the train split's size
    shuffle_buffer: int = 1000
    recon_size: int = 64  # side of the image-reconstruction target I (the paper does not say)
    resize_mode: str = "squash"  # "squash" | "pad" (LLaVA's pad-to-square); never a crop
    # Block whose CLS->patch attention fills FeatureBatch.cls_attention (e.g. -2, VisionZip/EViT);
    # None: off, the encoder's forward is unchanged and nothing extra is computed.
    cls_attention_layer: Optional[int] = None


@dataclass
class EncoderConfig:
    """``encoder.*``: the frozen encoder (see ``encoders.py``)."""

    name: str = "timm:vit_tiny_patch16_224"
    pretrained: str = ""  # "": random init; a local file; or a hub tag
    layer: int = -1  # block output used: -1 last, -2 penultimate (LLaVA)
    norm: bool = True  # apply the final LayerNorm to that output
    image_size: Optional[int] = None  # input resolution override; None: the model's own
    precision: str = "32"  # "32" | "bf16" | "16"
    init_seed: int = 0  # random initialisation (pretrained=""): the same encoder in every process


class FeatureDataModule(L.LightningDataModule):
    """Streams shards and turns each batch into a :class:`FeatureBatch` with the frozen encoder.

    Everything a user can get wrong (data root, splits, weights, encoder name and weights) is
    checked in ``__init__``, before any selector is built.
    """

    def __init__(self, data: DataConfig, encoder: EncoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = data
        self.seed = seed
        self.root = Path(data.root or DEFAULT_DATA_ROOT)
        self.index = ShardIndex.load(self.root)
        self.train_entries = self.index.shards(data.train_split)
        self.val_entries = self.index.shards(data.val_split) if data.val_split in self.index.splits else []
        if not self.val_entries:
            log.warning("%s has no %r split: validation is off", self.root / "index.json", data.val_split)
        self.encoder: FrozenEncoder = build_encoder(
            encoder.name, encoder.pretrained, encoder.layer, encoder.norm, encoder.image_size, encoder.precision,
            encoder.init_seed,
        )
        if data.cls_attention_layer is not None:  # fail now, not at the first batch
            self.encoder.check_cls_attention(data.cls_attention_layer)
        self.dims = FeatureDims(self.encoder.num_tokens, self.encoder.dim, self.encoder.grid, data.recon_size)
        self.rank, self.world = 0, 1
        self._train_loader: Optional[StreamLoader] = None
        self._val_loader: Optional[ValLoader] = None
        self._loaded_position: dict = {}  # from a checkpoint, for the next train loader
        self._validated_before_resume = False
        # Build the streams once here so bad weights or modes fail before training starts.
        self._stream(train=True)

    @property
    def has_val(self) -> bool:
        return bool(self.val_entries)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size

    # ---- loaders ----------------------------------------------------------------------------
    def _stream(self, train: bool) -> ShardStream:
        cfg = self.cfg
        return ShardStream(
            self.root, self.train_entries if train else self.val_entries, train=train,
            batch_size=cfg.batch_size if train else (cfg.val_batch_size or cfg.batch_size),
            preprocess=self.encoder.preprocess, resize_mode=cfg.resize_mode, rank=self.rank, world=self.world,
            num_workers=cfg.num_workers, seed=self.seed, weights=cfg.weights,
            samples_per_epoch=cfg.samples_per_epoch, shuffle_buffer=cfg.shuffle_buffer,
        )

    def _loader_kwargs(self) -> dict:
        workers = self.cfg.num_workers
        return dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
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
        stream = self._stream(train=False)
        if any(stream.batches_per_worker(w) == 0 for w in range(stream.workers)):
            raise ShardFormatError(
                f"{self.root}: split {self.cfg.val_split!r} has too few samples for {stream.readers} readers "
                f"({self.world} ranks x {stream.workers} workers); lower data.num_workers"
            )
        self._val_loader = ValLoader(stream, self._validated_before_resume, **self._loader_kwargs())
        return self._val_loader

    # ---- the one place the encoder runs -----------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> FeatureBatch:
        return self.encode(batch)

    def encode(self, batch: dict) -> FeatureBatch:
        """Run the frozen encoder on a worker batch (already on the target device)."""
        pixels = batch["pixels"]
        if next(self.encoder.parameters()).device != pixels.device:
            self.encoder.to(pixels.device)
        cls_attention = None
        if self.cfg.cls_attention_layer is None:
            features = self.encoder(pixels)
        else:
            features, cls_attention = self.encoder.forward_with_cls_attention(pixels, self.cfg.cls_attention_layer)
        pre = self.encoder.preprocess
        mean = torch.tensor(pre.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=pixels.device).view(1, 3, 1, 1)
        image = (pixels.float() * std + mean).clamp(0, 1)
        image = F.interpolate(image, size=(self.cfg.recon_size, self.cfg.recon_size), mode="bilinear",
                              antialias=True, align_corners=False).clamp(0, 1)
        answer_tokens = has_box = None
        boxes = batch["boxes"]
        if not torch.isnan(boxes).all():
            answer_tokens, has_box = boxes_to_token_mask(boxes, self.encoder.grid, pre.size)
        return FeatureBatch(
            features=features, grid=self.encoder.grid, image=image, prompt=batch["prompt"], target=batch["target"],
            source=batch["source"], keys=batch["keys"], answer_tokens=answer_tokens, has_answer_box=has_box,
            n_skipped=int(batch["n_skipped"]), cls_attention=cls_attention,
        )
