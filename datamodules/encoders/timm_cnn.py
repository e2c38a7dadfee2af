"""``timm_cnn:<model>``: a timm convolutional network whose final feature map is the token grid
(e.g. ``timm_cnn:tf_efficientnet_lite0``: 1280 channels on 7x7 at 224 px, so 49 tokens x 1280).

The tokens are ``forward_features(x)`` ``(B, C, h, w)`` flattened in raster order to ``(B, h*w, C)``:
the map after the head convolution, batch norm and activation, before global pooling. Only that
map is offered (``encoder.layer=-1``): earlier stages have other widths and grids. ``encoder.norm``
means nothing here (there is no final LayerNorm; the head's batch norm is always applied), and
there is no CLS token, so no CLS attention. Any input size works; the grid is measured once at
build time. Weights as for ``timm:`` (``""``, a local file, a hub tag, or ``package:...``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tokensel.common.attention import ClsRow
from tokensel.datamodules.encoders.base import Backbone, EncoderError, no_cls_token
from tokensel.datamodules.encoders.timm_vit import create_timm
from tokensel.datamodules.samples import Preprocess


class TimmCNN(Backbone):
    """A timm CNN's final feature map as tokens."""

    depth = 1
    layer_help = "feature map (timm_cnn returns only the final one: use encoder.layer=-1)"

    def __init__(self, model: nn.Module, preprocess: Preprocess, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.dim = dim
        self.grid = grid

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        return self.model.forward_features(pixels).flatten(2).transpose(1, 2)

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        raise no_cls_token(name, " (a convolutional network)")


def build_timm_cnn(model_name: str, pretrained: str, image_size: Optional[int]) -> TimmCNN:
    import timm

    model = create_timm("timm_cnn", model_name, pretrained, {"num_classes": 0})
    if not hasattr(model, "forward_features") or hasattr(model, "patch_embed"):
        raise EncoderError(f"encoder.name='timm_cnn:{model_name}': not a convolutional network "
                           f"(a ViT? use encoder.name=timm:{model_name})")
    cfg = timm.data.resolve_model_data_config(model)
    size = (image_size, image_size) if image_size else tuple(int(v) for v in cfg["input_size"][1:])
    with torch.no_grad():  # the geometry, measured on a blank image of the input size
        fmap = model.eval().forward_features(torch.zeros(1, 3, *size))
    if fmap.ndim != 4:
        raise EncoderError(f"encoder.name='timm_cnn:{model_name}': its features are {tuple(fmap.shape)}, "
                           "not a (B, C, h, w) feature map")
    preprocess = Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))
    return TimmCNN(model, preprocess, int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3])))
