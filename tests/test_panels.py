"""Image panels: every image at its own resolution (an integer scale, no smoothing), one column per
sample, and the keep mask drawn over the target."""

from __future__ import annotations

import numpy as np
import torch

from tokensel.callbacks.panels import mask_overlay, render_panel


def solid(colour: tuple[float, float, float], n: int, side: int) -> torch.Tensor:
    return torch.tensor(colour).view(1, 3, 1, 1).expand(n, 3, side, side).clone()


def test_a_panel_draws_each_image_at_an_integer_scale_without_smoothing():
    red, blue = solid((1.0, 0.0, 0.0), 3, 16), solid((0.0, 0.0, 1.0), 3, 16)
    panel = render_panel([("target", red), ("reconstruction", blue)], ["a", "b", "c"], scale=2)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    for colour in ([255, 0, 0], [0, 0, 255]):
        hit = np.all(panel == colour, axis=-1)
        rows, cols = np.nonzero(hit.any(axis=1))[0], np.nonzero(hit.any(axis=0))[0]
        # three 32 x 32 blocks side by side: 16 px images at scale 2, nothing blended at the edges
        assert hit.sum() == 3 * 32 * 32 and rows.max() - rows.min() + 1 == 32
        assert len(cols) == 3 * 32


def test_the_mask_overlay_dims_dropped_tokens_and_keeps_kept_ones():
    image = torch.ones(1, 3, 8, 8)
    keep = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # 2 x 2 grid: top-left kept
    out = mask_overlay(image, keep, (2, 2), dim=0.25)
    assert torch.allclose(out[0, :, 6, 6], torch.full((3,), 0.25))  # a dropped patch, away from the edge
    assert torch.allclose(out[0, :, 1, 1], torch.ones(3))  # a kept patch, away from the edge
