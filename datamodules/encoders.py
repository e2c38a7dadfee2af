"""The frozen vision encoder: built by name, run in exactly one place (the datamodule).

Names are ``<library>:<model>``:

- ``timm:vit_base_patch16_224`` (any timm ViT with ``forward_intermediates``);
- ``open_clip:ViT-L-14-336`` (any open_clip model with a ViT visual tower).

Weights (``encoder.pretrained``):

- ``""``: random initialisation (the CPU default, and what tests use);
- a path to a local file (``.pth``, ``.bin``, ``.safetensors``): loaded offline;
- anything else is a hub tag (timm: ``augreg_in21k_ft_in1k`` or ``default``; open_clip:
  ``openai``, ``laion2b_s32b_b82k``, ...). Without a network this fails with a one-line error
  that names the tag and says how to pass a local file instead. Set ``HF_HUB_OFFLINE=1`` to
  fail fast instead of retrying.

The encoder is ``eval()``, ``requires_grad_(False)`` and runs under ``torch.no_grad()``. It is
never a submodule of a selector, so it is never in an optimizer or a selector checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("tokensel.encoders")
LIBRARIES = ("timm", "open_clip")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


class EncoderError(ValueError):
    """A user-facing problem building the encoder (bad name, missing weights, offline hub)."""


@dataclass(frozen=True)
class Preprocess:
    """Everything a data worker needs to turn an image into this encoder's input (picklable)."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest"


def _looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or os.sep in value or value.startswith(".")


class FrozenEncoder(nn.Module):
    """A frozen ViT that returns patch tokens ``(B, N, C)`` of one chosen layer.

    ``layer`` indexes the transformer blocks from the end (-1 the last, -2 the penultimate as
    LLaVA uses). ``norm`` applies the model's final LayerNorm to that layer's output (timm
    ``norm``, open_clip ``ln_post``). Prefix tokens (CLS, registers) are always dropped.
    """

    def __init__(self, name: str, model: nn.Module, library: str, layer: int, norm: bool, preprocess: Preprocess,
                 grid: tuple[int, int], dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name = name
        self.library = library
        self.model = model
        self.layer = layer
        self.norm = norm
        self.preprocess = preprocess
        self.grid = grid
        self.dim = dim
        self.dtype = dtype
        self.model.to(dtype)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means frozen: Lightning or a caller flipping train() must not enable dropout.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.dtype)
        if self.library == "timm":
            out = self.model.forward_intermediates(
                pixels, indices=[self.layer], norm=self.norm, output_fmt="NLC", intermediates_only=True
            )[0]
        else:
            out = self.model.visual.forward_intermediates(
                pixels, indices=[self.layer], normalize_intermediates=self.norm, output_fmt="NLC",
                intermediates_only=True,
            )["image_intermediates"][0]
        if out.shape[1] != self.num_tokens:
            raise RuntimeError(f"{self.name}: got {out.shape[1]} tokens, expected {self.num_tokens} for grid {self.grid}")
        return out.float()


def build_encoder(name: str, pretrained: str = "", layer: int = -1, norm: bool = True,
                  image_size: Optional[int] = None, precision: str = "32") -> FrozenEncoder:
    """Build a :class:`FrozenEncoder` from ``library:model`` (see the module docstring)."""
    library, sep, model_name = name.partition(":")
    if not sep or library not in LIBRARIES or not model_name:
        raise EncoderError(f"encoder.name={name!r}: expected '<library>:<model>' with library one of {', '.join(LIBRARIES)}")
    if precision not in DTYPES:
        raise EncoderError(f"encoder.precision={precision!r}: expected one of {', '.join(DTYPES)}")
    if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise EncoderError(f"encoder.pretrained={pretrained!r}: no such weights file")
    builder = _build_timm if library == "timm" else _build_open_clip
    model, preprocess, grid, dim, depth = builder(model_name, pretrained, image_size)
    if not -depth <= layer < depth:
        raise EncoderError(f"encoder.layer={layer}: {name} has {depth} blocks (use -1 for the last, -2 for the penultimate)")
    return FrozenEncoder(name, model, library, layer, norm, preprocess, grid, dim, DTYPES[precision])


def _hub_error(name: str, tag: str, err: Exception) -> EncoderError:
    log.debug("hub download for %s:%s failed: %s", name, tag, err)
    return EncoderError(
        f"encoder {name!r}: could not fetch weights for tag {tag!r} from the hub (no network, or no such "
        f"tag: {type(err).__name__}); download them elsewhere and pass encoder.pretrained=/path/to/weights"
    )


@contextmanager
def _hub_download(name: str, pretrained: str):
    """Say that a hub download starts, and keep the libraries' own retry and error logs quiet:
    a failure is reported once, by ``_hub_error``."""
    if not pretrained or _looks_like_path(pretrained):
        yield
        return
    print(f"encoder {name}: fetching weights {pretrained!r} from the hub", file=sys.stderr, flush=True)
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _build_timm(model_name: str, pretrained: str, image_size: Optional[int]):
    import timm

    kwargs = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if not timm.is_model(model_name.split(".")[0]):
        raise EncoderError(f"encoder.name='timm:{model_name}': timm has no such model")
    try:
        with _hub_download(f"timm:{model_name}", pretrained):
            model = _create_timm(timm, model_name, pretrained, kwargs)
    except EncoderError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained and not _looks_like_path(pretrained):
            raise _hub_error(f"timm:{model_name}", pretrained, err) from None
        raise EncoderError(f"encoder timm:{model_name} with pretrained={pretrained!r}: {str(err).splitlines()[0][:200]}") from None
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise EncoderError(f"encoder.name='timm:{model_name}': not a ViT with patch tokens")
    cfg = timm.data.resolve_model_data_config(model)
    H, W = (int(v) for v in model.patch_embed.img_size)  # the built size (img_size may override the cfg's)
    preprocess = Preprocess((H, W), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return model, preprocess, grid, int(model.embed_dim), len(model.blocks)


def _create_timm(timm, model_name: str, pretrained: str, kwargs: dict):
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    if _looks_like_path(pretrained):
        # Runs the model's filter_fn (format conversion, pos-embed resize), unlike checkpoint_path=.
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": pretrained}, **kwargs)
    tagged = model_name if pretrained == "default" else f"{model_name.split('.')[0]}.{pretrained}"
    return timm.create_model(tagged, pretrained=True, **kwargs)


def _build_open_clip(model_name: str, pretrained: str, image_size: Optional[int]):
    import open_clip

    if model_name not in open_clip.list_models():
        raise EncoderError(f"encoder.name='open_clip:{model_name}': open_clip has no such model")
    kwargs = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    try:
        with _hub_download(f"open_clip:{model_name}", pretrained):
            model = open_clip.create_model(model_name, pretrained=pretrained or None, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained and not _looks_like_path(pretrained):
            raise _hub_error(f"open_clip:{model_name}", pretrained, err) from None
        raise EncoderError(f"encoder open_clip:{model_name} with pretrained={pretrained!r}: {str(err).splitlines()[0][:200]}") from None
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "grid_size"):
        raise EncoderError(f"encoder.name='open_clip:{model_name}': visual tower is not a ViT with patch tokens")
    # The language tower is never used: drop it so it costs no memory.
    for attr in ("transformer", "token_embedding", "ln_final", "text", "text_decoder"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    pc = visual.preprocess_cfg
    H, W = pc["size"] if isinstance(pc["size"], (tuple, list)) else (pc["size"], pc["size"])
    preprocess = Preprocess((int(H), int(W)), tuple(pc["mean"]), tuple(pc["std"]), pc.get("interpolation", "bicubic"))
    grid = tuple(int(g) for g in visual.grid_size)
    return model, preprocess, grid, int(visual.transformer.width), len(visual.transformer.resblocks)
