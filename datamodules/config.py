"""``data.*`` and ``encoder.*``: the config of the shards, the frozen encoder and the feature cache.

Plain dataclasses, so that ``experiments/config.py`` builds its OmegaConf schema from them and the
data layer (``datamodule.py``, ``feature_cache.py``) reads them without importing ``experiments``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tokensel.datamodules.anyres import LLAVA_NEXT_PINPOINTS

FEATURE_CACHE_MODES = ("off", "auto", "required")
VIEW_MODES = ("base", "anyres")
VIEW_SELECTIONS = ("per_view", "across")
FEATURE_CACHE_PRECISIONS = ("16", "bf16", "32")


@dataclass
class DataConfig:
    """``data.*``: where the shards are, how they are read, and where their features come from."""

    root: Optional[str] = None  # folder with index.json; None: the generated corpus data/<corpus>
    # The generated corpus (datamodules/synthetic.py) used when root is None, written on first use:
    # "default" (coco, docvqa, chartqa stand-ins) or "scenes" (shape-colour questions, local evidence).
    corpus: str = "default"
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
    # "base": one view of the whole image; "anyres": LLaVA-NeXT's base view plus the crops of the
    # best-fit pinpoint (anyres.py), each at the encoder's input size and selected per view.
    views: str = "base"
    view_pinpoints: List[List[int]] = field(default_factory=lambda: [list(p) for p in LLAVA_NEXT_PINPOINTS])
    # How a budget applies to the views at selection (make eval, the pruned VLM): "per_view" keeps K
    # of each view's N tokens (the Gumbel paper selects per crop); "across" keeps K of the image's
    # V * N tokens, chosen jointly (selectors/inference.py select_across). Training reads one row
    # per view either way; the budget regulariser's batch mean is the same for both.
    view_selection: str = "per_view"
    # The feature cache (feature_cache.py): "auto" reads a matching cache and builds one first
    # when there is none; "required" refuses to run without one; "off" encodes every batch.
    feature_cache: str = "auto"
    feature_cache_dir: Optional[str] = None  # None: $TOKENSEL_CACHE/features (~/.cache/tokensel/features)
    feature_cache_precision: str = "16"  # how features and image targets are stored: "16" | "bf16" | "32"


def data_root(data: DataConfig) -> Path:
    """The shards' folder: ``data.root``, else the generated corpus ``data/<data.corpus>``."""
    return Path(data.root) if data.root else Path("data") / data.corpus


@dataclass
class EncoderConfig:
    """``encoder.*``: the frozen encoder (see ``encoders/__init__.py``)."""

    name: str = "timm:vit_tiny_patch16_224"
    pretrained: str = ""  # "": random init; a local file; a hub tag; or package:<source>
    layer: int = -1  # block output used: -1 last, -2 penultimate (LLaVA)
    norm: bool = True  # apply the final LayerNorm to that output
    image_size: Optional[int] = None  # input resolution override; None: the model's own
    precision: str = "32"  # "32" | "bf16" | "16"
    init_seed: int = 0  # random initialisation (pretrained=""): the same encoder in every process
