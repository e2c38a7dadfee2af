"""LLaVA-NeXT "anyres" views: one base view plus the crops of the best-fitting grid resolution.

LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") shows the
model the whole image squashed to ``view_size`` x ``view_size`` (the 336 px CLIP input of
"Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744), followed by the
``view_size`` crops of the image resized, keeping its aspect ratio, into the best of a few grid
resolutions (``image_grid_pinpoints``) and padded, centred, with black.

Conventions, as in the Hugging Face ``LlavaNextImageProcessor`` (its PIL and torchvision backends):
  - sizes are (height, width), and so are the pinpoints: ``[336, 672]`` is 336 tall, 672 wide,
    a 1 x 2 grid of crops;
  - the resize keeps the aspect ratio, the long side (relative to the target) fills the target and
    the other side is ``ceil(side * scale)``, capped at the target;
  - the padding is split in two, the extra pixel of an odd remainder going to the bottom / right,
    and its value is 0 (black, before normalisation);
  - the base view is a plain resize of the whole image to view_size x view_size (no crop, no pad);
  - crops follow in raster order (row by row, left to right); all resizes are bicubic.

Pure functions of PIL and numpy; boxes mapped here feed ``batch.boxes_to_token_mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tokensel.common.errors import ConfigError

# llava-v1.6's grid, (height, width): at 336 px at most 1 + 4 = 5 views, 5 x 576 = 2880 tokens.
LLAVA_NEXT_PINPOINTS: list[tuple[int, int]] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def check_pinpoints(pinpoints, view_size: int | None = None) -> list[tuple[int, int]]:
    """The pinpoints as (height, width) int pairs; ConfigError naming the first bad value."""
    if view_size is not None and (not isinstance(view_size, int) or view_size <= 0):
        raise ConfigError(f"anyres view_size={view_size!r} must be a positive int")
    if not pinpoints:
        raise ConfigError("anyres image_grid_pinpoints is empty: give at least one [height, width]")
    out = []
    for p in pinpoints:
        shown = list(p) if isinstance(p, (list, tuple)) else p
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(v, (int, np.integer)) for v in p) or min(p) <= 0):
            raise ConfigError(f"anyres pinpoint {shown!r} must be [height, width] of positive ints")
        if view_size is not None and (p[0] % view_size or p[1] % view_size):
            raise ConfigError(f"anyres pinpoint {shown!r} is not a multiple of view_size={view_size}")
        out.append((int(p[0]), int(p[1])))
    return out


def check_image_hw(image_hw) -> tuple[int, int]:
    """The image size as a positive (height, width) int pair, else ConfigError."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if h <= 0 or w <= 0:
        raise ConfigError(f"anyres image size {tuple(image_hw)!r} must be a positive (height, width)")
    return h, w


def select_best_resolution(image_hw: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most image pixels once the image is scaled to fit
    it (never counting more than the original pixels), ties broken by the least padded area and
    then by list order; LLaVA-NeXT's rule."""
    h, w = check_image_hw(image_hw)
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in check_pinpoints(pinpoints):
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """Where an image of ``image_hw`` goes among the views; all sizes (height, width)."""

    image_hw: tuple[int, int]
    best_hw: tuple[int, int]  # the chosen pinpoint: the padded canvas the crops are cut from
    resized_hw: tuple[int, int]  # the image resized into it, aspect ratio kept
    pad_tl: tuple[int, int]  # (top, left) offset of the resized image in the canvas
    grid: tuple[int, int]  # (rows, cols) of crops
    num_views: int  # 1 base view + rows * cols crops


def anyres_layout(image_hw: tuple[int, int], pinpoints, view_size: int = 336) -> AnyresLayout:
    """The LLaVA-NeXT layout of an image of ``image_hw`` = (height, width)."""
    pinpoints = check_pinpoints(pinpoints, view_size)
    h, w = check_image_hw(image_hw)
    bh, bw = select_best_resolution((h, w), pinpoints)
    scale_w, scale_h = bw / w, bh / h  # scale first, then multiply: the processor's rounding
    if scale_w < scale_h:  # width fills the canvas
        rh, rw = min(math.ceil(h * scale_w), bh), bw
    else:  # height fills it
        rh, rw = bh, min(math.ceil(w * scale_h), bw)
    grid = (bh // view_size, bw // view_size)
    return AnyresLayout((h, w), (bh, bw), (rh, rw), ((bh - rh) // 2, (bw - rw) // 2), grid,
                        1 + grid[0] * grid[1])


def max_views(pinpoints, view_size: int = 336) -> int:
    """The most views any image can get: 1 + the largest grid among the pinpoints."""
    return 1 + max(ph * pw for ph, pw in check_pinpoints(pinpoints, view_size)) // view_size**2


def anyres_views(image: Image.Image, layout: AnyresLayout, view_size: int = 336,
                 resample=Image.BICUBIC) -> list[Image.Image]:
    """The base view then the crops in raster order, each an RGB ``view_size`` square."""
    image = image.convert("RGB")
    if (image.height, image.width) != layout.image_hw:
        raise ValueError(f"image is {image.height}x{image.width} but the layout is for "
                         f"{layout.image_hw[0]}x{layout.image_hw[1]}")
    views = [image.resize((view_size, view_size), resample)]  # squash, no crop, no pad
    (bh, bw), (rh, rw), (top, left) = layout.best_hw, layout.resized_hw, layout.pad_tl
    canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
    canvas.paste(image.resize((rw, rh), resample), (left, top))
    rows, cols = layout.grid
    for r in range(rows):
        for c in range(cols):
            x, y = c * view_size, r * view_size
            views.append(canvas.crop((x, y, x + view_size, y + view_size)))
    return views


def map_box_to_views(box_xyxy, image_hw: tuple[int, int], layout: AnyresLayout,
                     view_size: int = 336) -> np.ndarray:
    """The box ``[x0, y0, x1, y1]`` (original image pixels) in each view's pixel frame, clipped to
    the view: (num_views, 4) float32, row 0 the base view, then the crops in raster order; a NaN
    row where the box covers no area of that view (or the box itself is NaN)."""
    h, w = image_hw
    if (h, w) != layout.image_hw:
        raise ValueError(f"image_hw={image_hw!r} but the layout is for {layout.image_hw!r}")
    box = np.asarray(box_xyxy, dtype=np.float64).reshape(4)
    out = np.full((layout.num_views, 4), np.nan, dtype=np.float32)
    if np.isnan(box).any():
        return out
    x0, y0, x1, y1 = box.tolist()
    x0, x1 = max(0.0, min(x0, w)), max(0.0, min(x1, w))  # clip to the image first
    y0, y1 = max(0.0, min(y0, h)), max(0.0, min(y1, h))

    def put(i, bx0, by0, bx1, by1):
        bx0, by0 = max(bx0, 0.0), max(by0, 0.0)
        bx1, by1 = min(bx1, view_size), min(by1, view_size)
        if bx1 > bx0 and by1 > by0:  # touching an edge is no overlap
            out[i] = (bx0, by0, bx1, by1)

    sx, sy = view_size / w, view_size / h  # base view: squash
    put(0, x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    (rh, rw), (top, left) = layout.resized_hw, layout.pad_tl
    sx, sy = rw / w, rh / h  # canvas: resize, then shift by the padding
    cx0, cy0, cx1, cy1 = x0 * sx + left, y0 * sy + top, x1 * sx + left, y1 * sy + top
    rows, cols = layout.grid
    for r in range(rows):
        for c in range(cols):
            ox, oy = c * view_size, r * view_size
            put(1 + r * cols + c, cx0 - ox, cy0 - oy, cx1 - ox, cy1 - oy)
    return out
