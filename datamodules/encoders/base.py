"""What every encoder family shares: the frozen wrapper, the family interface, CLS attention.

A family (``timm_vit.py``, ``open_clip_vit.py``, ``hf.py``) is a :class:`Backbone`: a thin
``nn.Module`` around the library's model that knows its input preprocessing, token grid, width
and depth, how to return the patch tokens of one layer, and where its CLS attention is.
:class:`FrozenEncoder` wraps any backbone the same way: eval mode, no grad, one layer, prefix
tokens dropped. Families are picked by name in ``encoders/__init__.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from tokensel.common.attention import ClsRow, capture_cls_row
from tokensel.common.errors import TokenselError
from tokensel.datamodules.samples import Preprocess



class EncoderError(TokenselError):
    """A user-facing problem building the encoder (bad name, missing weights, offline hub)."""


class Backbone(nn.Module):
    """One family's model. Subclasses set the geometry in ``__init__`` and implement
    :meth:`tokens` and :meth:`cls_attention_site`."""

    preprocess: Preprocess
    grid: tuple[int, int]
    dim: int
    depth: int  # how many values ``layer`` may take: -depth <= layer < depth
    layer_help = "blocks (use -1 for the last, -2 for the penultimate)"

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        """Patch tokens ``(B, N, C)`` of ``layer``, prefix (CLS, register) tokens dropped."""
        raise NotImplementedError

    def cls_attention_site(self, name: str, layer: int) -> tuple[nn.Module, ClsRow]:
        """The attention module of block ``layer`` and the function that maps its input to the
        CLS->patch attention; :class:`EncoderError` for a model without a CLS token."""
        raise EncoderError(f"cls_attention not supported for {name}")


class FrozenEncoder(nn.Module):
    """A frozen backbone that returns patch tokens ``(B, N, C)`` of one chosen layer.

    ``layer`` indexes from the end (-1 the last, -2 the penultimate as LLaVA uses). ``norm``
    applies the model's final LayerNorm to that layer's output. The encoder is ``eval()``,
    ``requires_grad_(False)`` and runs under ``no_grad``; it is never a submodule of a selector.
    """

    def __init__(self, name: str, backbone: Backbone, layer: int, norm: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not -backbone.depth <= layer < backbone.depth:
            raise EncoderError(f"encoder.layer={layer}: {name} has {backbone.depth} {backbone.layer_help}")
        self.name = name
        self.backbone = backbone
        self.layer = layer
        self.norm = norm
        self.dtype = dtype
        self.backbone.to(dtype)
        self.requires_grad_(False)
        self.eval()

    @property
    def model(self) -> nn.Module:
        """The library's own model (timm, open_clip or transformers)."""
        return self.backbone.model

    @property
    def preprocess(self) -> Preprocess:
        return self.backbone.preprocess

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.grid

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen means frozen: no dropout, whatever the caller asks

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.backbone.tokens(pixels.to(self.dtype), self.layer, self.norm)
        if out.shape[1] != self.num_tokens:
            raise RuntimeError(f"{self.name}: got {out.shape[1]} tokens, expected {self.num_tokens} for grid {self.grid}")
        return out.float()

    def check_cls_attention(self, layer: int) -> None:
        """Raise :class:`EncoderError` now if :meth:`forward_with_cls_attention` cannot work."""
        self.backbone.cls_attention_site(self.name, layer)

    @torch.no_grad()
    def forward_with_cls_attention(self, pixels: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The usual features ``(B, N, C)`` plus the CLS->patch attention ``(B, N)`` float32 of
        block ``layer``, from the same forward pass.

        A forward pre-hook on that block's attention module takes its input and recomputes
        ``softmax(q_cls . k / sqrt(d))`` for the CLS query row only (the model keeps its fused
        attention everywhere). The row is averaged over heads and the prefix keys are dropped; it
        is not renormalised, so each row sums to ``1 - (CLS->prefix mass)`` <= 1.
        """
        module, cls_row = self.backbone.cls_attention_site(self.name, layer)
        return capture_cls_row(module, cls_row, lambda: self(pixels), f"{self.name} block {layer}")


# ---- CLS attention helpers shared by the families -------------------------------------------------
def pick_block(name: str, blocks: list, layer: int) -> nn.Module:
    """Block ``layer`` (a Python list index) of ``blocks``, or a one-line error."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(blocks) <= layer < len(blocks):
        raise EncoderError(f"data.cls_attention_layer={layer!r}: {name} has {len(blocks)} blocks "
                           "(-1 the last, -2 the penultimate)")
    return blocks[layer]


def no_cls_token(name: str, example: str = "") -> EncoderError:
    return EncoderError(f"encoder {name}: has no CLS token{example}, so it has no CLS attention; "
                        "unset data.cls_attention_layer or use a selector that needs none")


def hub_tag_error(label: str, tag: str, err: Exception) -> EncoderError:
    """The one line for a hub tag that could not be fetched (offline, or no such tag)."""
    return EncoderError(
        f"encoder {label!r}: could not fetch weights for tag {tag!r} from the hub (no network, or no such "
        f"tag: {type(err).__name__}); download them elsewhere and pass encoder.pretrained=/path/to/weights"
    )


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
