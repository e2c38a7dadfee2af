"""Reader batch → :class:`FeatureBatch`: the one seam where a selector's features come from.

A :class:`FeatureSource` says which shards a split's stream reads, how each sample decodes, and how
a batch of them becomes a ``FeatureBatch`` on the device. There are two:

- :class:`OnlineFeatures` reads the image shards and runs the frozen encoder on every batch, under
  ``no_grad`` (the only place outside a cache build where the encoder runs);
- :class:`CachedFeatures` reads a feature cache (``feature_cache.py``) built once by the same
  :meth:`OnlineFeatures.encode`, so the encoder does not run at all.

The cache mirrors the image shards one for one (same paths, same order, same counts), and both
decoders draw the text with the same RNG calls, so a seeded run reads the same samples in the same
order whichever source serves it; only the features' storage precision differs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tokensel.common.errors import ConfigError
from tokensel.datamodules.anyres import check_pinpoints
from tokensel.datamodules.batch import FeatureBatch, FeatureDims, boxes_to_token_mask
from tokensel.datamodules.encoders import FrozenEncoder
from tokensel.datamodules.samples import ImageSampleDecoder, SampleDecoder
from tokensel.datamodules.shards import ShardEntry


def answer_mask(boxes: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int]):
    """``(answer_tokens, has_answer_box)`` from the boxes in encoder-input pixels, or ``(None, None)``
    when no sample of the batch has a box."""
    if torch.isnan(boxes).all():
        return None, None
    return boxes_to_token_mask(boxes, grid, input_size)


def check_view_geometry(encoder: FrozenEncoder, pinpoints) -> tuple:
    """Anyres views need a square encoder input that divides every pinpoint (LLaVA-NeXT: 336)."""
    h, w = encoder.preprocess.size
    if h != w:
        raise ConfigError(f"data.views=anyres: {encoder.name} takes {h}x{w} inputs; anyres views are square")
    return tuple(check_pinpoints([tuple(p) for p in pinpoints], h))


def _synchronised_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class FeatureSource:
    """Where one split's features come from (see the module docstring)."""

    kind: str  # "online" | "cached"
    root: Path  # the folder the stream reads shards from
    entries: list[ShardEntry]
    decoder: SampleDecoder
    dims: FeatureDims
    input_size: tuple[int, int]  # (H, W) of the encoder input the boxes are in

    def __init__(self):
        self.encoder_batches = 0  # batches this source ran the encoder on

    def features(self, batch: dict) -> FeatureBatch:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class OnlineFeatures(FeatureSource):
    """The frozen encoder on every batch of the image shards."""

    kind = "online"

    def __init__(self, encoder: FrozenEncoder, root: Path, entries: list[ShardEntry], resize_mode: str,
                 recon_size: int, cls_attention_layer: Optional[int] = None, pinpoints=None):
        super().__init__()
        self.encoder = encoder
        self.root, self.entries = Path(root), entries
        if pinpoints is not None:
            pinpoints = check_view_geometry(encoder, pinpoints)
        self.decoder = ImageSampleDecoder(encoder.preprocess, resize_mode, pinpoints)
        self.recon_size = recon_size
        self.cls_attention_layer = cls_attention_layer
        self.dims = FeatureDims(encoder.num_tokens, encoder.dim, encoder.grid, recon_size)
        self.input_size = tuple(encoder.preprocess.size)
        self.timed = False  # make bench-train: record each forward's wall time (synchronised)
        self.encode_seconds: list[float] = []

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """Features (B, N, C), the reconstruction target (B, 3, S, S) in [0, 1] and, when
        configured, the CLS attention (B, N) of a batch of encoder inputs."""
        if next(self.encoder.parameters()).device != pixels.device:
            self.encoder.to(pixels.device)
        self.encoder_batches += 1
        started = _synchronised_clock(pixels.device) if self.timed else 0.0
        cls_attention = None
        if self.cls_attention_layer is None:
            features = self.encoder(pixels)
        else:
            features, cls_attention = self.encoder.forward_with_cls_attention(pixels, self.cls_attention_layer)
        if self.timed:
            self.encode_seconds.append(_synchronised_clock(pixels.device) - started)
        pre = self.encoder.preprocess
        mean = torch.tensor(pre.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=pixels.device).view(1, 3, 1, 1)
        image = (pixels.float() * std + mean).clamp(0, 1)
        image = F.interpolate(image, size=(self.recon_size, self.recon_size), mode="bilinear",
                              antialias=True, align_corners=False).clamp(0, 1)
        return {"features": features, "image": image, "cls_attention": cls_attention}

    def features(self, batch: dict) -> FeatureBatch:
        out = self.encode(batch["pixels"])
        answer_tokens, has_box = answer_mask(batch["boxes"], self.dims.grid, self.input_size)
        return FeatureBatch(
            features=out["features"], grid=self.dims.grid, image=out["image"], prompt=batch["prompt"],
            target=batch["target"], source=batch["source"], keys=batch["keys"], answer_tokens=answer_tokens,
            has_answer_box=has_box, n_skipped=int(batch["n_skipped"]), cls_attention=out["cls_attention"],
            view_of=batch.get("view_of"), view_index=batch.get("view_index"),
        )

    def describe(self) -> str:
        return f"online ({self.encoder.name} runs on every batch)"


class CachedFeatures(FeatureSource):
    """Stored features of a feature cache; the encoder is not built."""

    kind = "cached"

    def __init__(self, cache):  # a feature_cache.FeatureCache
        super().__init__()
        self.cache = cache
        self.root, self.entries = cache.folder, cache.entries
        self.decoder = cache.decoder()
        self.dims = cache.dims
        self.input_size = cache.input_size

    def features(self, batch: dict) -> FeatureBatch:
        answer_tokens, has_box = answer_mask(batch["boxes"], self.dims.grid, self.input_size)
        cls_attention = batch.get("cls_attention")
        return FeatureBatch(
            features=batch["features"].float(), grid=self.dims.grid, image=batch["image"].float(),
            prompt=batch["prompt"], target=batch["target"], source=batch["source"], keys=batch["keys"],
            answer_tokens=answer_tokens, has_answer_box=has_box, n_skipped=int(batch["n_skipped"]),
            cls_attention=None if cls_attention is None else cls_attention.float(),
            view_of=batch.get("view_of"), view_index=batch.get("view_index"),
        )

    def describe(self) -> str:
        return f"cached ({self.cache.folder})"
