"""Where a family's weights come from, and the training-time feature source every family provides.

- :func:`model_source` and :func:`read_config`: a folder or hub id, its ``config.json``, one line
  when it cannot be read (``common/hub.py`` says why);
- :func:`read_tensors`: only the tensors under given prefixes of a (sharded) safetensors
  checkpoint, read lazily, so a training encoder never loads the language model;
- :func:`processor_config`: the folder's image processor settings;
- :class:`PixelSpec` and :class:`CandidateEncoder`: the candidates of one fixed-resolution image
  batch, from pixels the data pipeline has already resized and normalised
  (``datamodules/encoders/hf.py`` wraps one as an encoder), and where its CLS attention is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tokensel.common.attention import ClsRow
from tokensel.common.errors import VLMError
from tokensel.common.hub import hf_fetch, hf_model_is_local, hf_source_error, hub_download

PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


def model_source(name: str) -> str:
    """What ``from_pretrained`` takes for ``name``: an expanded local path, or the hub id."""
    return str(Path(name).expanduser()) if hf_model_is_local(name) else name


def fetching(name: str, what: str, label: str):
    """Around a load of ``what`` that may fetch ``name`` from the hub: announce it, quiet the retries."""
    return hub_download(None if hf_model_is_local(name) else f"{label} {name}: fetching the {what} from the hub")


def read_config(name: str, label: str):
    """The transformers config of a folder or hub id; :class:`VLMError` naming ``label`` otherwise."""
    from transformers import AutoConfig

    try:
        if hf_model_is_local(name) and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"no such folder: {name}")
        with fetching(name, "config", label.split("=")[0]):
            return AutoConfig.from_pretrained(model_source(name))
    except (OSError, ValueError, KeyError) as err:
        raise VLMError(hf_source_error(f"{label}={name!r}", name, err)) from None


def read_tensors(name: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with one of ``prefixes``, prefix stripped (the
    first prefix that matches). Safetensors are read lazily: nothing else is loaded."""
    from safetensors import safe_open

    def wanted(key: str) -> Optional[str]:
        for prefix in prefixes:
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    index = hf_fetch(name, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_fetch(name, shard) for shard in sorted({f for k, f in weight_map.items() if wanted(k) is not None})]
    else:
        single = hf_fetch(name, "model.safetensors", required=False)
        if single is None:
            raise FileNotFoundError("no model.safetensors or model.safetensors.index.json")
        files = [single]
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                short = wanted(key)
                if short is not None:
                    state[short] = f.get_tensor(key)
    if not state:
        raise ValueError(f"the checkpoint has no {prefixes[-1]}* weights")
    return state


def processor_config(name: str) -> dict:
    """The image processor's settings from the folder's preprocessor (or processor) config; {} if none."""
    for filename in ("preprocessor_config.json", "processor_config.json"):
        path = hf_fetch(name, filename, required=False)
        if path is not None:
            data = json.loads(path.read_text())
            return data.get("image_processor", data)
    return {}


def load_into(module: nn.Module, state: dict, label: str) -> nn.Module:
    """``state`` into ``module`` (position-id buffers may be absent); one line when it does not fit."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise VLMError(f"{label}: the checkpoint's vision weights do not fit its vision config "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module


@dataclass(frozen=True)
class PixelSpec:
    """The input a feature source expects: ``size (H, W)``, the mean and std it was normalised
    with, and the resampling filter (``bicubic`` | ``bilinear`` | ``nearest``)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


class CandidateEncoder(nn.Module):
    """A family's candidates from a batch of images at one resolution: ``tokens(pixels, layer,
    norm)`` -> ``(B, N, C)`` on ``grid``. ``tower`` is the transformers vision model; ``depth`` is
    how many values ``layer`` may take; ``has_norm`` whether ``norm=True`` means anything."""

    pixels: PixelSpec
    grid: tuple[int, int]
    dim: int
    depth: int
    has_norm: bool = True
    layer_help = "hidden states (0 the embeddings, -1 the last block, -2 the penultimate as LLaVA uses)"

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def tokens(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        raise NotImplementedError

    def cls_attention_site(self, layer: int) -> tuple[nn.Module, ClsRow]:
        """The attention module of tower block ``layer`` and the map from its input to the CLS->patch
        attention (``common/attention.py``); :class:`VLMError` for a tower without a CLS token."""
        raise VLMError("its vision tower has no CLS token, so it has no CLS attention")
