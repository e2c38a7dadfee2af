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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
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

    # ---- CLS -> patch attention, only on request (``data.cls_attention_layer``) ------------------
    def cls_attention_site(self, layer: int) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """The attention module of block ``layer`` and a function that maps that module's input
        (the block's normed tokens) to the CLS->patch attention ``(B, N)``.

        ``layer`` indexes the transformer blocks like a Python list (-1 the last, -2 the
        penultimate). For ``hf_llava`` it indexes ``encoder.layers``, so a negative ``layer`` is
        the block whose output is ``hidden_states[layer]`` (VisionZip's ``attentions[-2]``).
        Raises :class:`EncoderError` for an encoder without a CLS token or with an attention
        layout this does not know.
        """
        if self.library == "timm":
            model = self.model
            if getattr(model, "cls_token", None) is None or not getattr(model, "num_prefix_tokens", 0):
                raise EncoderError(f"encoder {self.name}: has no CLS token (class_token=False), so it has no CLS "
                                   "attention; unset data.cls_attention_layer or use a selector that needs none")
            block = self._cls_attention_block(list(model.blocks), layer)
            return _timm_cls_attention(self.name, block, int(model.num_prefix_tokens))
        if self.library == "open_clip":
            visual = self.model.visual
            blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
            if blocks is None:
                raise EncoderError(f"cls_attention not supported for {self.name}: its visual tower has no transformer.resblocks")
            if getattr(visual, "class_embedding", None) is None:
                raise EncoderError(f"encoder {self.name}: has no CLS token, so it has no CLS attention; "
                                   "unset data.cls_attention_layer or use a selector that needs none")
            block = self._cls_attention_block(list(blocks), layer)
            return _open_clip_cls_attention(self.name, block, 1)  # forward_intermediates drops one class token
        # hf_llava
        tower = self.model.tower
        vision = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel.vision_model
        layers = getattr(getattr(vision, "encoder", None), "layers", None)
        if layers is None:
            raise EncoderError(f"cls_attention not supported for {self.name}: its tower has no vision_model.encoder.layers")
        if getattr(vision.embeddings, "class_embedding", None) is None:
            raise EncoderError(f"encoder {self.name}: has no CLS token (e.g. SigLIP), so it has no CLS attention; "
                               "unset data.cls_attention_layer or use a selector that needs none")
        block = self._cls_attention_block(list(layers), layer)
        return _hf_clip_cls_attention(self.name, block, 1)

    def _cls_attention_block(self, blocks: list, layer: int) -> nn.Module:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(blocks) <= layer < len(blocks):
            raise EncoderError(f"data.cls_attention_layer={layer!r}: {self.name} has {len(blocks)} blocks "
                               "(-1 the last, -2 the penultimate)")
        return blocks[layer]

    def check_cls_attention(self, layer: int) -> None:
        """Raise :class:`EncoderError` now if :meth:`forward_with_cls_attention` cannot work."""
        self.cls_attention_site(layer)

    @torch.no_grad()
    def forward_with_cls_attention(self, pixels: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The usual features ``(B, N, C)`` (the same as :meth:`forward`) plus the CLS->patch
        attention ``(B, N)`` float32 of block ``layer``, from the same forward pass.

        A forward pre-hook on that block's attention module takes its input and recomputes
        ``softmax(q_cls . k / sqrt(d))`` for the CLS query row only (the model keeps its fused /
        SDPA attention everywhere). The row is averaged over heads, then the keys of the prefix
        tokens (CLS, registers) are dropped; it is *not* renormalised, so each row sums to
        ``1 - (CLS->prefix mass)`` <= 1.
        """
        module, cls_row = self.cls_attention_site(layer)
        captured: list[torch.Tensor] = []

        def hook(_module, args, kwargs):
            x = args[0] if args else next(kwargs[k] for k in ("x", "hidden_states", "query", "q_x") if k in kwargs)
            captured.append(cls_row(x))

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            features = self(pixels)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{self.name}: the attention of block {layer} ran {len(captured)} times, expected once")
        return features, captured[0]


def _cls_softmax(q_cls: torch.Tensor, k: torch.Tensor, scale: float, prefix: int) -> torch.Tensor:
    """``q_cls (B, H, 1, d)``, ``k (B, H, L, d)`` -> head-mean softmax attention of the CLS query to
    the patch keys ``(B, L - prefix)``, in float32 (the prefix keys' mass is dropped, not renormalised)."""
    logits = (q_cls.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, L)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, prefix:]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, heads, -1).transpose(1, 2)  # (B, H, L, d)


def _timm_cls_attention(name: str, block: nn.Module, prefix: int):
    """timm ``Block.attn`` (``timm.layers.Attention``): fused ``qkv``, then optional ``q_norm``/``k_norm``."""
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    known = isinstance(qkv, nn.Linear) and hasattr(attn, "num_heads") and hasattr(attn, "scale")
    if not known or any(hasattr(attn, a) for a in ("q_bias", "rope")):  # e.g. EVA: separate biases, RoPE
        raise EncoderError(f"cls_attention not supported for {name}: its blocks' attention is not timm's qkv Attention")
    heads = int(attn.num_heads)
    width = qkv.out_features // 3

    def cls_row(x: torch.Tensor) -> torch.Tensor:
        w, b = qkv.weight, qkv.bias
        q = F.linear(x[:, :1], w[:width], None if b is None else b[:width])
        k = F.linear(x, w[width:2 * width], None if b is None else b[width:2 * width])
        q, k = attn.q_norm(_split_heads(q, heads)), attn.k_norm(_split_heads(k, heads))
        return _cls_softmax(q, k, float(attn.scale), prefix)

    return attn, cls_row


def _open_clip_cls_attention(name: str, block: nn.Module, prefix: int):
    """open_clip ``ResidualAttentionBlock.attn`` (``nn.MultiheadAttention``, input ``ln_1(x)``,
    ``(L, B, C)`` unless ``batch_first``) or ``CustomResidualAttentionBlock.attn`` (open_clip's
    ``Attention``, batch-first, optional ``ln_q``/``ln_k``; scaled-cosine attention included)."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        dim, heads = attn.embed_dim, attn.num_heads
        if attn._qkv_same_embed_dim:
            wq, wk = attn.in_proj_weight[:dim], attn.in_proj_weight[dim:2 * dim]
        else:
            wq, wk = attn.q_proj_weight, attn.k_proj_weight
        b = attn.in_proj_bias
        bq, bk = (None, None) if b is None else (b[:dim], b[dim:2 * dim])
        scale = float(attn.head_dim) ** -0.5

        def cls_row(x: torch.Tensor) -> torch.Tensor:
            if not attn.batch_first:
                x = x.transpose(0, 1)
            q, k = _split_heads(F.linear(x[:, :1], wq, bq), heads), _split_heads(F.linear(x, wk, bk), heads)
            return _cls_softmax(q, k, scale, prefix)

        return attn, cls_row
    if attn is not None and hasattr(attn, "in_proj_weight") and hasattr(attn, "ln_q"):
        heads = int(attn.num_heads)

        def cls_row(x: torch.Tensor) -> torch.Tensor:
            dim = x.shape[-1]
            w, b = attn.in_proj_weight, attn.in_proj_bias
            q = _split_heads(F.linear(x[:, :1], w[:dim], None if b is None else b[:dim]), heads)
            k = _split_heads(F.linear(x, w[dim:2 * dim], None if b is None else b[dim:2 * dim]), heads)
            if attn.logit_scale is not None:  # scaled cosine attention
                scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp().float().view(1, heads, 1, 1)
                return _cls_softmax(F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), 1.0, prefix)
            return _cls_softmax(attn.ln_q(q), attn.ln_k(k), float(attn.scale), prefix)

        return attn, cls_row
    raise EncoderError(f"cls_attention not supported for {name}: its blocks' attention is neither "
                       "nn.MultiheadAttention nor open_clip's Attention")


def _hf_clip_cls_attention(name: str, block: nn.Module, prefix: int):
    """transformers ``CLIPEncoderLayer.self_attn`` (``CLIPAttention``: ``q_proj``/``k_proj``, input
    ``layer_norm1(x)``)."""
    attn = getattr(block, "self_attn", None)
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
        raise EncoderError(f"cls_attention not supported for {name}: its layers' self_attn has no q_proj/k_proj")
    heads = int(attn.num_heads)

    def cls_row(x: torch.Tensor) -> torch.Tensor:
        q, k = _split_heads(attn.q_proj(x[:, :1]), heads), _split_heads(attn.k_proj(x), heads)
        return _cls_softmax(q, k, float(attn.scale), prefix)

    return attn, cls_row


def build_encoder(name: str, pretrained: str = "", layer: int = -1, norm: bool = True,
                  image_size: Optional[int] = None, precision: str = "32", init_seed: int = 0) -> FrozenEncoder:
    """Build a :class:`FrozenEncoder` from ``library:model`` (see the module docstring).

    Random initialisation is drawn from ``init_seed`` alone, never from the global RNG, so a
    random-init encoder is the same network in training, evaluation and every DDP rank.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return _build_encoder(name, pretrained, layer, norm, image_size, precision)


def _build_encoder(name: str, pretrained: str, layer: int, norm: bool, image_size: Optional[int],
                   precision: str) -> FrozenEncoder:
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


def weights_download(label: str, pretrained: str):
    """``hub_download`` around loading ``pretrained`` weights for ``label``: silent unless
    ``pretrained`` is a hub tag (not empty, not a local file)."""
    fetches = bool(pretrained) and not _looks_like_path(pretrained)
    return hub_download(f"{label}: fetching weights {pretrained!r} from the hub" if fetches else None)


def _build_timm(model_name: str, pretrained: str, image_size: Optional[int]):
    import timm

    kwargs = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if not timm.is_model(model_name.split(".")[0]):
        raise EncoderError(f"encoder.name='timm:{model_name}': timm has no such model")
    try:
        with weights_download(f"encoder timm:{model_name}", pretrained):
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
        with weights_download(f"encoder open_clip:{model_name}", pretrained):
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
            vision = getattr(self.tower, "vision_model", self.tower)  # transformers 5: no .vision_model wrapper
            hidden = vision.post_layernorm(hidden)
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
