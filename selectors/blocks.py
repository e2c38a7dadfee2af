"""Plain ``nn.Module`` building blocks that the selector objectives compose.

Nothing here knows about Lightning, losses or the encoder: a transformer stack, a 2-D
positional embedding, the per-token keep head, and the image decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def heads_for(width: int, head_dim: int) -> int:
    """Attention heads for a width: ``width // head_dim``, at least 1; ``width`` must divide."""
    heads = max(1, width // head_dim)
    if width % heads:
        raise ValueError(f"width {width} is not divisible into {heads} heads of {head_dim}")
    return heads


class TransformerStack(nn.Module):
    """``depth`` pre-LN Transformer encoder layers (self-attention + GELU MLP), then a LayerNorm.

    ``attn_mask`` follows ``nn.MultiheadAttention``: True where attention is *not* allowed.
    """

    def __init__(self, width: int, depth: int, head_dim: int = 64, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads_for(width, head_dim), int(width * mlp_ratio), dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_mask=attn_mask)
        return self.norm(x)


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding (MAE), ``(h * w, width)`` in raster order."""
    h, w = grid
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)


class KeepHead(nn.Module):
    """Per-token two-way logits ``(drop, keep)`` for a Gumbel/straight-through mask (Sec. 4.1.1).

    :meth:`score` is the keep-minus-drop log-odds: the "logits" ranked by top-K at inference.
    """

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., 1] - logits[..., 0]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a skip connection."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageDecoder(nn.Module):
    """Image Reconstructor R^im (Sec. 4.2): Transformer layers, then ×2 upsampling stages
    interleaved with residual blocks until the token grid reaches ``image_size``.

    Input ``(B, N, in_width)`` tokens in raster order on ``grid``; output ``(B, 3, S, S)``. The
    Transformer runs at ``width`` (default ``in_width``; otherwise a linear map comes first).
    Channels halve at every stage from ``channels`` (never below 32). If ``S`` is not the grid
    times a power of two, a final resize lands exactly on ``S``.
    """

    def __init__(self, in_width: int, grid: tuple[int, int], image_size: int, depth: int = 2, channels: int = 128,
                 head_dim: int = 64, width: Optional[int] = None):
        super().__init__()
        self.grid = grid
        self.image_size = image_size
        width = width or in_width
        self.to_width = nn.Linear(in_width, width) if width != in_width else nn.Identity()
        self.transformer = TransformerStack(width, depth, head_dim)
        self.to_map = nn.Linear(width, channels)
        stages = max(0, math.floor(math.log2(image_size / min(grid))))
        layers: list[nn.Module] = [ResBlock(channels)]
        ch = channels
        for _ in range(stages):
            out = max(32, ch // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1), ResBlock(out)]
            ch = out
        self.up = nn.Sequential(*layers)
        self.to_rgb = nn.Sequential(nn.GroupNorm(math.gcd(32, ch), ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        h, w = self.grid
        x = self.to_map(self.transformer(self.to_width(tokens)))
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        x = self.up(x)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.to_rgb(x)


class DiagonalDenoiser(nn.Module):
    """Train-only Denoiser of AutoSelect (DiffPrune, arXiv 2605.28051, Sec. 4.4): one pre-LN Transformer block
    whose attention mask is the identity, so every token is transformed on its own.

    The attention and MLP output projections are zero-initialised: the block starts as the exact
    identity. No final LayerNorm.
    """

    def __init__(self, width: int, head_dim: int = 64, mlp_ratio: float = 4.0):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(width, heads_for(width, head_dim), int(width * mlp_ratio), 0.0,
                                                activation="gelu", batch_first=True, norm_first=True)
        for proj in (self.block.self_attn.out_proj, self.block.linear2):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        return self.block(x, src_mask=~torch.eye(n, dtype=torch.bool, device=x.device))
