"""Prefill FLOPs attributable to vision tokens, after Sec. 5.3 of *Adaptive Vision Token Selection
for Multi-Modal Inference* (arXiv 2503.16660), which follows FastV / PDrop: :func:`llm_flops`,
:func:`sampler_flops`, the VLM geometries :data:`GEOMETRIES` and :func:`flops_report`, which
``make eval`` prints per selector x budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["llm_flops", "sampler_flops", "Geometry", "GEOMETRIES", "flops_report"]


def llm_flops(n_tokens: float, d: int, m: int, layers: int, ffn_matrices: int = 3) -> float:
    """FLOPs of the LLM attributable to ``n_tokens`` vision tokens (Sec. 5.3, after FastV/PDrop).

    ``(4 n d^2 + 2 n^2 d + ffn_matrices * n d m) * layers``: the q/k/v/o projections
    (``4 n d^2``), attention scores and weighted values among the vision tokens (``2 n^2 d``) and
    the FFN (``ffn_matrices`` matrices of ``d x m``), counting one multiply-add as one FLOP, as the
    paper does.

    The paper writes the FFN term as ``2 n d m`` (``ffn_matrices=2``), which gives ~16.7 TFLOPs at
    2880 tokens for LLaVA-NeXT (d=4096, m=11008, 32 layers), but its Table 1 headers (~21 T at
    2880 tokens, ~10 at 1440, ~8 at 1152, ~4 at 640, ~2 at 320, ~1 at 160) match ``3 n d m``:
    LLaMA's gated (SwiGLU) FFN has three ``d x m`` matrices (gate, up, down). Hence the default
    ``ffn_matrices=3`` for LLaMA-family LLMs (Vicuna, Mistral, ...); pass ``ffn_matrices=2`` for
    the paper's formula as printed or for a plain two-matrix MLP.
    """
    n = float(n_tokens)
    return (4.0 * n * d * d + 2.0 * n * n * d + float(ffn_matrices) * n * d * m) * layers


def sampler_flops(n_tokens: float, crop_tokens: int, d: int, m: int, layers: int, ffn_matrices: int = 3) -> float:
    """FLOPs of the sampler's per-crop stage (Sec. 5.3): ``n / n_c`` crops of ``n_c`` tokens, each
    through ``layers`` transformer layers of the same MHA+FFN form as :func:`llm_flops`:
    ``(n / n_c) * (4 n_c d^2 + 2 n_c^2 d + ffn_matrices * n_c d m) * layers`` (the paper uses
    ``layers = l_s = 4``). Attention is within a crop, so this is linear in ``n``."""
    if crop_tokens <= 0:
        raise ValueError(f"crop_tokens must be positive, got {crop_tokens}")
    return float(n_tokens) / crop_tokens * llm_flops(crop_tokens, d, m, layers, ffn_matrices)


@dataclass(frozen=True)
class Geometry:
    """A VLM's vision-token geometry for FLOPs accounting.

    ``tokens``: vision tokens per image into the LLM (n); ``crop_tokens``: tokens per crop (n_c);
    ``d``, ``m``, ``layers``: the LLM's hidden size, FFN intermediate size and depth.
    ``vision_d`` / ``vision_m``: the vision encoder's width and MLP size, i.e. the width at which
    *this repository's* selectors run (``selector.width=None`` -> feature width C, ``mlp_ratio=4``).
    """

    name: str
    tokens: int
    crop_tokens: int
    d: int
    m: int
    layers: int
    vision_d: int = 1024
    vision_m: int = 4096


GEOMETRIES: dict[str, Geometry] = {
    # LLaVA-NeXT / Open-LLaVA-Next (Vicuna-7B): 1 + 4 crops of 576 CLIP ViT-L/14-336 tokens
    "llava_next": Geometry("llava_next", tokens=2880, crop_tokens=576, d=4096, m=11008, layers=32),
    # LLaVA-1.5 (7B): one 336 px view, 576 tokens
    "llava15": Geometry("llava15", tokens=576, crop_tokens=576, d=4096, m=11008, layers=32),
}


def flops_report(
    geometry: Union[str, Geometry],
    keep_ratio: float,
    sampler_layers: int = 4,
    sampler_d: Optional[int] = None,
    sampler_m: Optional[int] = None,
    ffn_matrices: int = 3,
    sampler_ffn_matrices: int = 2,
) -> dict:
    """Prefill FLOPs of the vision tokens, in TFLOPs (1e12), for a selector keeping ``keep_ratio``.

    - ``llm_tflops_full``: the LLM over all ``n`` tokens; ``llm_tflops_kept``: over
      ``round(keep_ratio * n)`` tokens (:func:`llm_flops`, ``ffn_matrices`` for the LLM).
    - ``sampler_tflops``: :func:`sampler_flops` over all ``n`` tokens, per crop, with
      ``sampler_layers`` layers (the paper's ``l_s = 4``; pass ``0`` for selectors without a
      learned per-crop stage, e.g. random or training-free baselines).
    - ``total_tflops = llm_tflops_kept + sampler_tflops``;
      ``prefill_reduction = 1 - total / llm_full``.

    **Sampler width.** Sec. 5.3 prices the sampler with "the same MHA+FFN form" as the LLM and
    reuses the symbols ``d`` and ``m``, which it defined as the LLM's hidden and FFN sizes; the
    formula leaves open whether the sampler runs at that width. Two readings:

    - *vision width* (the default, what ``make eval`` prints): ``sampler_d=None`` ->
      ``g.vision_d``, ``sampler_m=None`` -> ``g.vision_m``, two FFN matrices (a GELU MLP). For
      LLaVA-NeXT with 4 layers that is 0.16 T, total 10.0 T at 50 %: it matches the paper's
      "~21 -> ~10 TFLOPs at 50 % including sampler overhead", and it is how this repository's
      selectors are built (``selector.width=None``: the encoder's feature width, ``mlp_ratio=4``).
    - *LLM width*: ``sampler_d=g.d, sampler_m=g.m, sampler_ffn_matrices=ffn_matrices``: 2.39 T,
      total 12.3 T at 50 %; an upper bound for a sampler as wide as the LLM.
    """
    g = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    n = g.tokens
    kept = int(round(keep_ratio * n))
    s_d = g.vision_d if sampler_d is None else sampler_d
    s_m = g.vision_m if sampler_m is None else sampler_m
    full = llm_flops(n, g.d, g.m, g.layers, ffn_matrices) / 1e12
    kept_f = llm_flops(kept, g.d, g.m, g.layers, ffn_matrices) / 1e12
    samp = sampler_flops(n, g.crop_tokens, s_d, s_m, sampler_layers, sampler_ffn_matrices) / 1e12 if sampler_layers > 0 else 0.0
    total = kept_f + samp
    return {
        "geometry": g.name,
        "tokens": n,
        "kept_tokens": kept,
        "keep_ratio": float(keep_ratio),
        "llm_tflops_full": full,
        "llm_tflops_kept": kept_f,
        "sampler_tflops": samp,
        "total_tflops": total,
        "prefill_reduction": 1.0 - total / full,
    }
