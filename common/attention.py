"""A ViT's CLS->patch attention of one block, read beside its normal forward pass.

EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022, Sec. 3.1) and VisionZip
(arXiv 2412.04467, Sec. 3.1) rank patch tokens by the attention the CLS query pays them. The
models keep their fused attention kernels; a forward pre-hook on the block's attention module
takes that module's input and recomputes only the CLS query's row. Both the training encoders
(``datamodules/encoders/``) and the pruned VLMs (``vlms/``) read it through :func:`capture_cls_row`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ClsRow = Callable[[torch.Tensor], torch.Tensor]  # a block's attention input -> CLS->patch attention (B, N)
T = TypeVar("T")


def cls_softmax(q_cls: torch.Tensor, k: torch.Tensor, scale: float, prefix: int) -> torch.Tensor:
    """``q_cls (B, H, 1, d)``, ``k (B, H, L, d)`` -> head-mean softmax attention of the CLS query to
    the patch keys ``(B, L - prefix)``, in float32 (the prefix keys' mass is dropped, not renormalised)."""
    logits = (q_cls.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, L)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, prefix:]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, heads, -1).transpose(1, 2)  # (B, H, L, d)


def fused_qk(x: torch.Tensor, weight: torch.Tensor, bias, width: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query ``(B, H, 1, d)`` and all keys ``(B, H, L, d)`` from a fused ``[q; k; v]`` projection."""
    q = F.linear(x[:, :1], weight[:width], None if bias is None else bias[:width])
    k = F.linear(x, weight[width:2 * width], None if bias is None else bias[width:2 * width])
    return split_heads(q, heads), split_heads(k, heads)


def capture_cls_row(module: nn.Module, cls_row: ClsRow, run: Callable[[], T], label: str) -> tuple[T, torch.Tensor]:
    """``(run(), the CLS row of module's input)``: ``module`` (a block's attention) must run exactly
    once inside ``run``; its input is read by a forward pre-hook, its output is untouched."""
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else next(kwargs[k] for k in ("x", "hidden_states", "query", "q_x") if k in kwargs)
        captured.append(cls_row(x))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{label}: the attention block ran {len(captured)} times, expected once")
    return out, captured[0]
