"""The frozen vision encoder: built by name, run in exactly one place (the datamodule).

Names are ``<library>:<model>``:

- ``timm:vit_base_patch16_224`` (any timm ViT with ``forward_intermediates``);
- ``open_clip:ViT-L-14-336`` (any open_clip model with a ViT visual tower; tokensel's own configs in
  ``datamodules/model_configs/``, e.g. ``open_clip:coca_tiny``, are registered too);
- ``hf_llava:/path/to/llava-folder`` or ``hf_llava:llava-hf/llava-1.5-7b-hf``: the vision tower of a
  Hugging Face LLaVA, giving exactly the features its projector receives (see :func:`_build_hf_llava`).

Weights (``encoder.pretrained``):

- ``""``: random initialisation (the CPU default, and what tests use);
- a path to a local file (``.pth``, ``.bin``, ``.safetensors``): loaded offline;
- anything else is a hub tag (timm: ``augreg_in21k_ft_in1k`` or ``default``; open_clip:
  ``openai``, ``laion2b_s32b_b82k``, ...). Without a network this fails with a one-line error
  that names the tag and says how to pass a local file instead. Set ``HF_HUB_OFFLINE=1`` to
  fail fast instead of retrying.
- ``hf_llava:`` takes its weights from the LLaVA folder or hub repo itself; ``encoder.pretrained``
  must stay empty.

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
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"  # tokensel's own open_clip configs
LIBRARIES = ("timm", "open_clip", "hf_llava")
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
    For ``hf_llava`` the layer indexes ``hidden_states`` as LLaVA's ``vision_feature_layer`` does
    (the same for negative layers; 0 is the embeddings) and ``norm`` is ``post_layernorm``.
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
        elif self.library == "hf_llava":
            out = self.model(pixels, self.layer, self.norm)
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
    builder = {"timm": _build_timm, "open_clip": _build_open_clip, "hf_llava": _build_hf_llava}[library]
    model, preprocess, grid, dim, depth = builder(model_name, pretrained, image_size)
    if not -depth <= layer < depth:
        if library == "hf_llava":  # layer indexes hidden_states, as LLaVA's vision_feature_layer does
            raise EncoderError(f"encoder.layer={layer}: {name} has {depth} hidden states (0 the embeddings, "
                               "-1 the last block, -2 the penultimate as LLaVA uses)")
        raise EncoderError(f"encoder.layer={layer}: {name} has {depth} blocks (use -1 for the last, -2 for the penultimate)")
    return FrozenEncoder(name, model, library, layer, norm, preprocess, grid, dim, DTYPES[precision])


def _hub_error(name: str, tag: str, err: Exception) -> EncoderError:
    log.debug("hub download for %s:%s failed: %s", name, tag, err)
    return EncoderError(
        f"encoder {name!r}: could not fetch weights for tag {tag!r} from the hub (no network, or no such "
        f"tag: {type(err).__name__}); download them elsewhere and pass encoder.pretrained=/path/to/weights"
    )


@contextmanager
def hub_download(announce: Optional[str]):
    """Around a model load that may fetch from a hub (``announce`` is not None): print
    ``announce`` and keep the libraries' own retry and error logs quiet, so a failure is
    reported once, by the caller's one-line error. With ``announce=None`` it does nothing."""
    if announce is None:
        yield
        return
    print(announce, file=sys.stderr, flush=True)
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _hub_download(name: str, pretrained: str):
    fetches = bool(pretrained) and not _looks_like_path(pretrained)
    return hub_download(f"encoder {name}: fetching weights {pretrained!r} from the hub" if fetches else None)


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

    register_model_configs()
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


# ---- tokensel's own open_clip model configs -----------------------------------------------------
_configs_registered = False


def register_model_configs() -> None:
    """Register ``datamodules/model_configs/*.json`` (e.g. ``coca_tiny``, a CPU-sized CoCa) with
    open_clip, once per process, so ``open_clip:coca_tiny`` and ``selector.vlm.model=coca_tiny``
    resolve like open_clip's built-in names."""
    global _configs_registered
    if _configs_registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _configs_registered = True


# ---- hf_llava: the vision tower of a Hugging Face LLaVA -----------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


def hf_model_is_local(name: str) -> bool:
    """True when ``name`` means a local folder (it exists, or it looks like a path: absolute,
    ``./``/``~``-relative, or more than one ``/``); False for a hub id such as ``org/model``."""
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def hf_fetch(name: str, filename: str, required: bool = True) -> Optional[Path]:
    """``filename`` of the model folder or hub repo ``name`` as a local path; None when an optional
    file is absent. Hub downloads go through the hub cache (``HF_HUB_OFFLINE=1`` uses only the cache)."""
    if hf_model_is_local(name):
        path = Path(name).expanduser() / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{path} not found")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename))
    except RemoteEntryNotFoundError:  # the repo answered: no such file
        if required:
            raise
        return None
    except FileNotFoundError:  # offline and not in the cache
        if required:
            raise
        return None


def hf_source_error(label: str, name: str, err: Exception) -> str:
    """One line saying why the Hugging Face model ``name`` (a folder or a hub id) could not be
    read; ``label`` is the config key and value to start it with (shared with the llava backend)."""
    if hf_model_is_local(name):
        if not Path(name).expanduser().is_dir():
            return f"{label}: no such local folder"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return f"{label}: {type(err).__name__}: {first}"
    log.debug("hub access for %s failed: %s", name, err)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else "no network, or no such repo"
    return (f"{label}: not a local folder, and the hub could not provide {name!r} ({why}: {type(err).__name__}); "
            f"download it elsewhere (e.g. `hf download {name} --local-dir DIR`) and pass that folder")


def load_llava_config(name: str):
    """The ``LlavaConfig`` of a folder or hub id (raises the hub's or the filesystem's errors)."""
    from transformers import AutoConfig

    if hf_model_is_local(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"no such folder: {name}")
    config = AutoConfig.from_pretrained(str(Path(name).expanduser()) if hf_model_is_local(name) else name)
    if config.model_type != "llava":
        raise ValueError(f"model_type={config.model_type!r} in its config.json: only 'llava' "
                         "(LlavaForConditionalGeneration, LLaVA-1.5 style) is supported")
    return config


def llava_feature_layer(config) -> int:
    """LLaVA's ``vision_feature_layer`` (an index into the tower's ``hidden_states``)."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    return layer


def _llava_vision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Only the vision tower's tensors of a LLaVA checkpoint, with the ``vision_tower.`` prefix
    (``vision_tower.`` in llava-hf checkpoints, ``model.vision_tower.`` as transformers 5 saves
    them) stripped. Safetensors are read lazily, so the language model is never loaded."""
    from safetensors import safe_open

    def wanted(key: str) -> Optional[str]:
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    index = hf_fetch(name, "model.safetensors.index.json", required=False)
    if index is not None:
        import json

        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if wanted(k) is not None})
        files = [hf_fetch(name, shard) for shard in shards]
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
        raise ValueError("the checkpoint has no vision_tower.* weights")
    return state


class HFVisionTower(nn.Module):
    """A LLaVA's vision tower (a transformers vision model, e.g. ``CLIPVisionModel``) that returns
    ``hidden_states[layer]`` without its prefix (CLS) token: with LLaVA's ``vision_feature_layer``
    as ``layer`` and ``vision_feature_select_strategy="default"`` these are exactly the features
    LLaVA's multi-modal projector receives. ``layer`` indexes ``hidden_states`` as LLaVA does (0:
    the embeddings, -1: the last block, -2: the penultimate). ``norm`` applies ``post_layernorm``
    (LLaVA does not)."""

    def __init__(self, tower: nn.Module, grid: tuple[int, int], interpolate: bool):
        super().__init__()
        self.tower = tower
        self.grid = grid
        self.interpolate = interpolate

    def forward(self, pixels: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.tower(pixel_values=pixels, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[layer]
        if norm:
            hidden = self.tower.vision_model.post_layernorm(hidden)
        prefix = hidden.shape[1] - self.grid[0] * self.grid[1]  # 1 (CLS) for CLIP, 0 for SigLIP
        return hidden[:, prefix:]


def _llava_preprocess(name: str, vision_config) -> Preprocess:
    """The CLIP image processor's final size, mean and std, from the folder's preprocessor config
    when there is one, else the CLIP defaults at the vision config's image size."""
    import json

    size = int(vision_config.image_size)
    cfg: dict = {}
    for filename in ("preprocessor_config.json", "processor_config.json"):
        path = hf_fetch(name, filename, required=False)
        if path is not None:
            data = json.loads(path.read_text())
            cfg = data.get("image_processor", data)
            break
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
    sz = crop or cfg.get("size") or {}
    if isinstance(sz, int):
        hw = (sz, sz)
    elif "height" in sz and "width" in sz:
        hw = (int(sz["height"]), int(sz["width"]))
    elif "shortest_edge" in sz:
        hw = (int(sz["shortest_edge"]),) * 2
    else:
        hw = (size, size)
    mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    resample = cfg.get("resample", 3)
    interpolation = _PIL_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic"
    return Preprocess(hw, mean, std, interpolation)


def _build_hf_llava(model_name: str, pretrained: str, image_size: Optional[int]):
    """Load only the vision tower of the LLaVA ``model_name`` (a local folder or a hub id): the
    ``LlavaConfig`` gives ``vision_config``, ``AutoModel.from_config`` builds the tower as LLaVA
    does, and only the checkpoint's ``vision_tower.*`` tensors are read into it (the language
    model is never loaded). Returns ``depth`` = the number of hidden states (blocks + embeddings),
    the range of LLaVA's ``vision_feature_layer``."""
    from transformers import AutoModel

    name = f"hf_llava:{model_name}"
    if pretrained:
        raise EncoderError(f"encoder.pretrained={pretrained!r}: {name} takes its weights from the LLaVA folder "
                           "or hub repo; leave encoder.pretrained empty")
    if hf_model_is_local(model_name) and not Path(model_name).expanduser().is_dir():
        raise EncoderError(f"encoder.name={name!r}: no such local folder")
    hub = not hf_model_is_local(model_name)
    if hub:
        print(f"encoder {name}: fetching the vision tower from the hub", file=sys.stderr, flush=True)
        logging.disable(logging.ERROR)  # a failure is reported once, below
    try:
        config = load_llava_config(model_name)
        vision_config = config.vision_config
        state = _llava_vision_state_dict(model_name)
        preprocess = _llava_preprocess(model_name, vision_config)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise EncoderError(hf_source_error(f"encoder.name={name!r}", model_name, err)) from None
    finally:
        if hub:
            logging.disable(logging.NOTSET)
    tower = AutoModel.from_config(vision_config)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise EncoderError(f"encoder.name={name!r}: the checkpoint's vision_tower does not fit its vision_config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    native = int(vision_config.image_size)
    side = int(image_size) if image_size else native
    if side != native:
        log.warning("%s: encoder.image_size=%d differs from the tower's %d: position embeddings are interpolated, "
                    "so the features are not the ones LLaVA was trained on", name, side, native)
        preprocess = Preprocess((side, side), preprocess.mean, preprocess.std, preprocess.interpolation)
    elif preprocess.size != (native, native):
        log.warning("%s: the preprocessor's size %s differs from the tower's image_size %d: using %d",
                    name, preprocess.size, native, native)
        preprocess = Preprocess((native, native), preprocess.mean, preprocess.std, preprocess.interpolation)
    patch = int(vision_config.patch_size)
    grid = (side // patch, side // patch)
    depth = int(vision_config.num_hidden_layers) + 1
    return HFVisionTower(tower, grid, interpolate=side != native), preprocess, grid, int(vision_config.hidden_size), depth
