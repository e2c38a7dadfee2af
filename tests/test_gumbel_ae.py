"""The gumbel_ae / straight_through objective as a module: shapes, gradients, schedule."""

from dataclasses import asdict

import pytest
import torch

from tokensel.datamodules.batch import FeatureBatch, FeatureDims
from tokensel.selectors.base import OptimConfig, lr_multiplier
from tokensel.selectors.blocks import ImageDecoder
from tokensel.selectors.gumbel_ae import GumbelAEConfig
from tokensel.selectors.catalog import selector_entry, trained_names

DIMS = FeatureDims(num_tokens=16, dim=32, grid=(4, 4), image_size=24)


def make_module(name="gumbel_ae", **overrides):
    entry = selector_entry(name)
    config = entry.make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    small = dict(depth=1, reconstructor_depth=1, image_decoder_depth=1, image_decoder_channels=32, head_dim=16)
    for key, value in small.items():
        setattr(config, key, value)
    return entry.module_cls(selector=asdict(config), dims=DIMS.as_dict())


def make_batch(n=3):
    torch.manual_seed(0)
    return FeatureBatch(torch.randn(n, 16, 32), (4, 4), torch.rand(n, 3, 24, 24), [""] * n, ["a cat"] * n,
                        ["coco"] * n, [f"k{i}" for i in range(n)])


def test_registry_lists_both_objectives():
    assert {"gumbel_ae", "straight_through"} <= set(trained_names())
    assert selector_entry("straight_through").make_config().estimator == "straight_through"
    assert selector_entry("gumbel_ae").make_config().estimator == "gumbel"


@pytest.mark.parametrize("name", ["gumbel_ae", "straight_through"])
def test_eq8_loss_trains_every_part_and_reaches_the_selector(name):
    module = make_module(name).train()
    out = module.step(make_batch())
    expected = out.scalars["feat_recon"] + out.scalars["img_recon"] + out.scalars["reg"]
    assert torch.allclose(out.loss, expected)
    assert out.keep.shape == (3, 16) and out.recon.shape == (3, 3, 24, 24)
    out.loss.backward()
    net = module.net
    for part in (net.selector, net.keep_head, net.reconstructor, net.image_decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert net.masked_embedding.grad.abs().sum() > 0


def test_validation_mask_is_deterministic_and_matches_inference_ranking():
    module = make_module("gumbel_ae").eval()
    batch = make_batch()
    a, b = module.step(batch).keep, module.step(batch).keep
    assert torch.equal(a, b)
    assert torch.equal(a.bool(), module.net.scores(batch.features) > 0)


def test_plain_regulariser_is_alpha1_times_keep_ratio():
    module = make_module("straight_through", regulariser="plain", alpha1=0.3).train()
    out = module.step(make_batch())
    assert torch.allclose(out.scalars["reg"], 0.3 * out.scalars["keep_ratio"])


def test_config_rejects_an_inverted_band():
    with pytest.raises(ValueError, match="selector.q"):
        GumbelAEConfig(p=0.1, q=0.6)


@pytest.mark.parametrize("grid, size", [((4, 4), 24), ((14, 14), 224), ((24, 24), 336), ((7, 7), 7)])
def test_image_decoder_reaches_the_target_size(grid, size):
    decoder = ImageDecoder(32, grid, size, depth=1, channels=32, head_dim=16)
    out = decoder(torch.randn(2, grid[0] * grid[1], 32))
    assert out.shape == (2, 3, size, size)


def test_lr_schedule_warms_up_then_cosines_per_stage():
    cfg = OptimConfig(warmup=0.1, stages=[60, 20, 20])
    total = 1000
    lr = [lr_multiplier(s, total, cfg) for s in range(total)]
    assert lr[0] == pytest.approx(1 / 60)  # warm-up over 10 % of the 600-step first stage
    assert lr[59] == pytest.approx(1.0)
    assert lr[599] < 1e-3 and lr[600] == pytest.approx(1 / 20)  # restart at the stage boundary
    assert lr[800] == pytest.approx(1 / 20) and lr[999] < 1e-2
    single = OptimConfig(warmup=0.05)
    assert lr_multiplier(500, 1000, single) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 450 / 950)).item()))
    assert lr_multiplier(123, 1000, OptimConfig(schedule="constant")) == 1.0


def test_the_panel_shows_a_budget_trained_net_as_deployed_and_the_paper_band_by_its_noiseless_gate():
    batch = make_batch(4)
    matched = make_module("gumbel_ae", budget=0.25)
    shown = matched.visualise(batch)
    k = 4  # 25 % of 16 tokens
    assert shown.keep.dtype == torch.bool and shown.keep.sum(1).tolist() == [k] * 4
    top = matched.net.scores(batch.features).topk(k, dim=1).indices
    assert torch.equal(shown.keep, torch.zeros_like(shown.keep).scatter_(1, top, True))
    assert matched.training  # visualise leaves the module as it found it
    with torch.no_grad():
        assert torch.allclose(shown.recon, matched.eval().net.image_from_kept(batch.features, shown.keep))
    band = make_module("gumbel_ae").eval()
    assert torch.equal(band.visualise(batch).keep.bool(), band.net.scores(batch.features) > 0)
