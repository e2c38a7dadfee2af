"""LLaVA-NeXT anyres views (datamodules/anyres.py) against transformers' own LlavaNextImageProcessor."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokensel.common.errors import ConfigError
from tokensel.datamodules.anyres import (
    LLAVA_NEXT_PINPOINTS,
    anyres_layout,
    anyres_views,
    map_box_to_views,
    max_views,
    select_best_resolution,
)
from tokensel.datamodules.batch import boxes_to_token_mask

hf_utils = pytest.importorskip("transformers.image_processing_utils")
from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import (  # noqa: E402
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import (  # noqa: E402
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

V = 336
HF_PINPOINTS = [list(p) for p in LLAVA_NEXT_PINPOINTS]
# wide, tall, tiny (both sides < 336), huge, exactly one view, fits 1x3 with no padding, ~square
SIZES = [(400, 900), (1200, 300), (100, 80), (3000, 4000), (336, 336), (333, 1000), (701, 702)]


@pytest.fixture(scope="module")
def processors():
    # As llava-hf/llava-v1.6-*'s preprocessor_config.json: shortest_edge 336, 336 crop, center crop on.
    kw = dict(size={"shortest_edge": V}, crop_size={"height": V, "width": V}, do_center_crop=True,
              image_grid_pinpoints=HF_PINPOINTS)
    return LlavaNextImageProcessorPil(**kw), LlavaNextImageProcessor(**kw)


def noise_image(h, w, seed=0):
    # Noise is the worst case for resampling differences (every pixel is an edge).
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def normalise(views, proc):
    mean = np.asarray(proc.image_mean)[:, None, None]
    std = np.asarray(proc.image_std)[:, None, None]
    return np.stack([(np.asarray(v, np.float64).transpose(2, 0, 1) / 255 - mean) / std for v in views])


def test_default_pinpoints_are_llava_v1_6():
    assert HF_PINPOINTS == LlavaNextImageProcessor.image_grid_pinpoints
    assert max_views(LLAVA_NEXT_PINPOINTS, V) == 5  # 5 x 576 = 2880 tokens at most
    assert max_views([(336, 336)], V) == 2


def test_select_best_resolution_matches_transformers():
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(500)] + SIZES
    odd = [[672, 1008], [336, 336], [1008, 672], [336, 672], [672, 336]]  # a grid in another order
    for hw in sizes:
        for pins in (HF_PINPOINTS, odd):
            assert select_best_resolution(hw, pins) == tuple(hf_utils.select_best_resolution(hw, pins)), hw


@pytest.mark.parametrize("hw", SIZES)
def test_geometry_and_pixels_match_processor(processors, hw):
    pil_proc, tv_proc = processors
    h, w = hw
    layout = anyres_layout(hw, LLAVA_NEXT_PINPOINTS, V)
    # Pinpoints and sizes are (height, width) in transformers too: the grid is (rows, cols).
    assert layout.best_hw == tuple(hf_utils.select_best_resolution(hw, HF_PINPOINTS))
    assert layout.grid == tuple(get_anyres_image_grid_shape(hw, HF_PINPOINTS, V))
    assert layout.num_views == image_size_to_num_patches(hw, HF_PINPOINTS, V)
    fake = np.zeros((3, h, w), np.uint8)
    assert layout.resized_hw == tuple(hf_utils.get_patch_output_size(fake, layout.best_hw, "channels_first"))
    (bh, bw), (rh, rw), (top, left) = layout.best_hw, layout.resized_hw, layout.pad_tl
    assert 0 <= (bh - rh) - 2 * top <= 1 and 0 <= (bw - rw) - 2 * left <= 1  # centred, odd pixel last

    image = noise_image(h, w)
    views = anyres_views(image, layout, V)
    assert len(views) == layout.num_views and all(v.size == (V, V) for v in views)
    ours = normalise(views, pil_proc)

    # PIL backend: the same uint8 PIL bicubic resizes, so equal up to float32 rounding.
    ref = pil_proc(image, return_tensors="np")["pixel_values"][0]
    assert ref.shape == (layout.num_views, 3, V, V)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)

    # torchvision backend (the default LlavaNextImageProcessor): its antialiased bicubic on uint8
    # tensors rounds differently from PIL's; on noise we measured at most 2 grey levels apart on a
    # few pixels, mean ~0.01 level. Bound in grey levels: max <= 2, mean <= 0.05.
    ref = tv_proc(image, return_tensors="np")["pixel_values"][0]
    assert ref.shape == (layout.num_views, 3, V, V)
    levels = np.abs(ours - ref) * np.asarray(tv_proc.image_std)[:, None, None] * 255
    assert levels.max() <= 2 + 1e-3 and levels.mean() <= 0.05


def test_padding_is_black_and_base_view_is_a_squash():
    image = Image.new("RGB", (80, 100), (200, 100, 50))  # 100 tall, 80 wide: tiny
    layout = anyres_layout((100, 80), LLAVA_NEXT_PINPOINTS, V)
    assert layout.best_hw == (336, 672) and layout.resized_hw == (336, 269) and layout.pad_tl == (0, 201)
    base, left, right = (np.asarray(v) for v in anyres_views(image, layout, V))
    assert (base == (200, 100, 50)).all()  # the whole image squashed to 336 x 336, no pad
    assert (left[:, :201] == 0).all() and (left[:, 202:] == (200, 100, 50)).all()
    assert (right[:, 134:] == 0).all() and (right[:, :133] == (200, 100, 50)).all()  # 201 + 269 = 470


# 400 x 900 -> pinpoint (336, 1008), 1 x 3 crops; resized 336 x 756 (scale 0.84), left pad 126.
WIDE = (400, 900)


def test_box_inside_one_crop():
    layout = anyres_layout(WIDE, LLAVA_NEXT_PINPOINTS, V)
    assert layout.grid == (1, 3) and layout.resized_hw == (336, 756) and layout.pad_tl == (0, 126)
    boxes = map_box_to_views([300, 100, 400, 200], WIDE, layout, V)
    assert boxes.shape == (4, 4)
    # base: x * 336/900, y * 336/400; crop 1: x * 0.84 + 126 - 336, y * 0.84
    np.testing.assert_allclose(boxes[0], [112, 84, 400 * 336 / 900, 168], atol=1e-4)
    np.testing.assert_allclose(boxes[2], [42, 84, 126, 168], atol=1e-4)
    assert np.isnan(boxes[1]).all() and np.isnan(boxes[3]).all()


def test_box_spanning_two_crops_and_touching_edges():
    layout = anyres_layout(WIDE, LLAVA_NEXT_PINPOINTS, V)
    boxes = map_box_to_views([200, 0, 500, 400], WIDE, layout, V)  # canvas x 294 .. 546
    np.testing.assert_allclose(boxes[1], [294, 0, 336, 336], atol=1e-4)
    np.testing.assert_allclose(boxes[2], [0, 0, 210, 336], atol=1e-4)
    assert np.isnan(boxes[3]).all()
    boxes = map_box_to_views([100, 0, 250, 50], WIDE, layout, V)  # ends at canvas x 336 exactly
    np.testing.assert_allclose(boxes[1], [210, 0, 336, 42], atol=1e-4)
    assert np.isnan(boxes[2:]).all()  # touching crop 1's left edge is no overlap
    assert np.isnan(map_box_to_views([np.nan] * 4, WIDE, layout, V)).all()


@pytest.mark.parametrize("hw", [WIDE, (1200, 300), (3000, 4000), (100, 80)])
def test_mapped_boxes_frame_the_drawn_box(hw):
    h, w = hw
    box = [w * 0.3, h * 0.45, w * 0.62, h * 0.7]
    arr = np.zeros((h, w, 3), np.uint8)
    arr[round(box[1]):round(box[3]), round(box[0]):round(box[2])] = 255
    layout = anyres_layout(hw, LLAVA_NEXT_PINPOINTS, V)
    views = anyres_views(Image.fromarray(arr), layout, V)
    boxes = map_box_to_views(box, hw, layout, V)
    for view, b in zip(views, boxes):
        ys, xs = np.nonzero(np.asarray(view)[..., 0] > 127)
        if np.isnan(b).any():
            assert len(xs) == 0
            continue
        found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_allclose(found, b, atol=2)  # bicubic edges and pixel rounding
    # each view's box becomes that view's token mask; NaN rows mean "no box"
    mask, has_box = boxes_to_token_mask(torch.from_numpy(boxes), (24, 24), (V, V))
    assert has_box.tolist() == (~np.isnan(boxes).any(1)).tolist()
    assert mask[has_box].any(1).all() and not mask[~has_box].any()


@pytest.mark.parametrize("bad, word", [
    ([(336, 500)], "500"), ([(0, 336)], r"\[0, 336\]"), ([(-336, 336)], "-336"),
    ([(336,)], r"\[336\]"), ([], "empty"),
])
def test_bad_pinpoint_is_a_config_error(bad, word):
    with pytest.raises(ConfigError, match=word):
        anyres_layout((400, 900), bad, V)
    with pytest.raises(ConfigError, match=word):
        max_views(bad, V)


def test_bad_view_size_and_image_size_are_config_errors():
    with pytest.raises(ConfigError, match="view_size=0"):
        anyres_layout((400, 900), LLAVA_NEXT_PINPOINTS, 0)
    with pytest.raises(ConfigError, match="not a multiple of view_size=224"):
        anyres_layout((400, 900), LLAVA_NEXT_PINPOINTS, 224)
    with pytest.raises(ConfigError, match=r"\(0, 900\)"):
        anyres_layout((0, 900), LLAVA_NEXT_PINPOINTS, V)
