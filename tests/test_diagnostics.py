"""Why a selector wins or loses: the evidence AUROC, headroom, paired CIs, every objective's own
loss on any kept set, rankings, the train/test gap of vp_noise and budget-matched training."""

import math

import pytest
import torch

from tokensel.common.stats import mean_ci, paired_ci
from tokensel.selectors.baselines import build_baseline
from tokensel.datamodules.batch import FeatureDims
from tokensel.selectors.catalog import build_net, selector_entry, trained_names
from tokensel.selectors.diagnostics import (evidence_auroc, headroom, headroom_verdict, objective_losses,
                                            random_keep_masks, rank_correlation)
from tokensel.selectors.gumbel_ae import GumbelAEConfig
from tokensel.selectors.inference import SelectionContext, SelectorNet, topk_positions
from tokensel.selectors.metrics import keep_mask

import test_gumbel_ae as ae
import test_vp_noise as vp


# ---------------------------------------------------------------- AUROC on hand-made rankings

def test_auroc_perfect_reversed_tied_and_random():
    answer = torch.tensor([[True, True, False, False, False]])
    assert evidence_auroc(torch.tensor([[5.0, 4, 3, 2, 1]]), answer).item() == 1.0
    assert evidence_auroc(torch.tensor([[1.0, 2, 3, 4, 5]]), answer).item() == 0.0
    assert evidence_auroc(torch.ones(1, 5), answer).item() == 0.5  # all tied: chance
    # one tie between an evidence token and another: half a pair of the 6
    assert evidence_auroc(torch.tensor([[5.0, 2, 2, 1, 0]]), answer).item() == pytest.approx(5.5 / 6)
    generator = torch.Generator().manual_seed(0)
    many = torch.rand(400, 64, generator=generator) < 0.2
    random = evidence_auroc(torch.rand(400, 64, generator=generator), many)
    mean, half, n = mean_ci(random)
    assert n == 400 and abs(mean - 0.5) < 2 * half + 0.01


def test_auroc_scores_only_images_with_a_box_and_both_labels():
    answer = torch.tensor([[True, False], [False, False], [True, True], [True, False]])
    has_box = torch.tensor([True, True, True, False])
    out = evidence_auroc(torch.tensor([[2.0, 1], [1, 2], [1, 2], [1, 2]]), answer, has_box)
    assert out.tolist() == [1.0]  # no evidence, nothing else, no box: not scored
    assert evidence_auroc(torch.ones(2, 3), None).numel() == 0


def test_rank_correlation_is_spearman_per_row():
    a = torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 3, 4], [1.0, 1, 1, 1]])
    b = torch.tensor([[10.0, 20, 30, 40], [4.0, 3, 2, 1], [1.0, 2, 3, 4]])
    rho = rank_correlation(a, b)
    assert rho[0].item() == pytest.approx(1.0) and rho[1].item() == pytest.approx(-1.0) and math.isnan(rho[2].item())
    assert rank_correlation(torch.tensor([[1.0, 4, 9, 16]]), torch.tensor([[1.0, 2, 3, 4]])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- headroom and paired CIs

def test_headroom_spread_best_gain_and_noise_floor_by_hand():
    losses = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, float("nan")]])  # 3 draws x 2 samples
    out = headroom(losses)
    assert out["spread"][0].item() == pytest.approx(1.0)  # std of 1, 3, 2
    assert out["best_gain"][0].item() == pytest.approx(1.0)  # mean 2 - min 1
    assert out["draw_difference"][0].item() == pytest.approx(-2.0)
    assert all(math.isnan(v[1].item()) for v in out.values())  # a NaN draw: the sample is NaN everywhere
    assert headroom_verdict(0.010, 0.004) == "separable"
    assert headroom_verdict(0.003, 0.004) == "within noise"
    assert headroom_verdict(float("nan"), 0.1) == "n/a"


def test_paired_ci_removes_the_samples_own_spread_and_skips_nan():
    base = torch.linspace(0, 10, 50, dtype=torch.float64)
    mean, half, n = paired_ci(base + 0.1, base)
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-9) and n == 50
    assert paired_ci([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])[2] == 2


def test_random_keep_masks_are_seeded_and_keep_k():
    a = random_keep_masks(3, 10, 4, 5, torch.Generator().manual_seed(1))
    b = random_keep_masks(3, 10, 4, 5, torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 10) and torch.equal(a, b) and (a.sum(-1) == 4).all()


# ---------------------------------------------------------------- rankings

def test_every_selector_with_scores_ranks_and_divprune_ranks_by_pick_order():
    torch.manual_seed(0)
    features = torch.randn(4, 16, 8)
    divprune = build_baseline("divprune", (4, 4))
    rank = divprune.ranking(features)
    for k in (1, 5, 15):
        first = topk_positions(rank, k)
        assert torch.equal(first, divprune.select(features, k)[0])
    for unordered in ("uniform", "dart", "pool"):  # no single order: a grid, k-dependent shares, merging
        assert build_baseline(unordered, (4, 4)).ranking(features) is None, unordered
    cdpruner, query = build_baseline("cdpruner", (4, 4)), SelectionContext(
        instruction_embedding=torch.randn(4, 8), token_embedding=features)
    rank = cdpruner.ranking(features, query)
    for k in (1, 5, 15):  # greedy MAP is nested: its order's first k are its selection at k
        assert torch.equal(topk_positions(rank, k).sort(-1).values,
                           cdpruner.select(features, k, context=query)[0].sort(-1).values)
    assert build_baseline("l2norm", (4, 4)).ranking(features).shape == (4, 16)
    for name in trained_names():  # every trained selector ranks by its scores
        entry = selector_entry(name)
        net = build_net(name, FeatureDims(16, 8, (4, 4), 16), head_dim=4, width=8, depth=1)
        assert torch.equal(net.ranking(features), net.scores(features)), entry.name
        # and can score any kept set on its own objective (make eval, the learning curves)
        assert type(net).objective_loss is not SelectorNet.objective_loss, entry.name


# ---------------------------------------------------------------- each objective's own loss

@pytest.mark.parametrize("name", ["gumbel_ae", "straight_through"])
def test_autoencoder_objective_loss_all_tokens_and_its_own_mask_reproduce_its_losses(name):
    module = ae.make_module(name).eval()
    batch = ae.make_batch(4)
    net = module.net
    with torch.no_grad():
        everything = net.objective_loss(batch, torch.ones(4, 16, dtype=torch.bool))
        f_rec, i_rec = net.reconstruct(batch.features)
        direct = ((f_rec - batch.features) ** 2).flatten(1).mean(1) + ((i_rec - batch.image) ** 2).flatten(1).mean(1)
        assert torch.allclose(everything, direct, atol=1e-6)
        out = module.step(batch)  # eval: the noiseless mask
        own = net.objective_loss(batch, out.keep.bool())
    assert own.shape == (4,)
    assert own.mean().item() == pytest.approx((out.scalars["feat_recon"] + out.scalars["img_recon"]).item(), rel=1e-5)
    assert net.objective_loss(batch, out.keep.bool(), vlm=object()).shape == (4,)  # a VLM is not needed


def test_vp_noise_objective_loss_reproduces_its_validation_ntp(tmp_path):
    from tokensel.datamodules.encoders import build_encoder

    encoder = build_encoder("open_clip:coca_tiny", layer=-1, norm=False)
    module = vp.make_module(encoder).eval()
    batch = vp.batch_of(encoder)
    net, vlm = module.net, module.objective_vlm
    with torch.no_grad():
        out = module.step(batch)
        top = keep_mask(topk_positions(net.scores(batch.features), module.k), encoder.num_tokens)
        own = net.objective_loss(batch, top, vlm)
        tokens = vlm.ntp_loss(batch.features, batch.prompt, batch.target).tokens.double()
        weighted = (own.double() * tokens).sum() / tokens.sum()
        everything = net.objective_loss(batch, torch.ones_like(top), vlm)
        full = (everything.double() * tokens).sum() / tokens.sum()
    assert weighted.item() == pytest.approx(out.scalars["ntp_topk"].item(), rel=1e-5)
    assert full.item() == pytest.approx(out.scalars["ntp_full"].item(), rel=1e-5)
    assert net.objective_loss(batch, top) is None  # no VLM, no objective
    losses = objective_losses(net, batch, top.unsqueeze(0).repeat(2, 1, 1), vlm)
    assert losses.shape == (2, 4) and torch.allclose(losses[0], own.double())
    batch.target[1] = "  "  # empty text cannot be scored: NaN, not a number
    assert math.isnan(net.objective_loss(batch, top, vlm)[1].item())
    with pytest.raises(ValueError, match="one size per batch"):
        net.objective_loss(batch, torch.eye(4, encoder.num_tokens, dtype=torch.bool).logical_or(top), vlm)


def test_vp_noise_train_test_gap_is_logged_at_validation():
    from tokensel.datamodules.encoders import build_encoder

    encoder = build_encoder("open_clip:coca_tiny", layer=-1, norm=False)
    module = vp.make_module(encoder).eval()
    batch = vp.batch_of(encoder)
    with torch.no_grad():
        out = module.step(batch)
        gap = module.train_test_gap(batch.features, batch.prompt, batch.target, tau=0.1)
        again = module.train_test_gap(batch.features, batch.prompt, batch.target, tau=0.1)
    assert {"ntp_soft", "alpha_on_topk"} <= set(out.scalars)
    assert torch.equal(gap["ntp_soft"], again["ntp_soft"])  # the gate's noise is seeded
    assert ((gap["alpha_on_topk"] > 0) & (gap["alpha_on_topk"] <= 1 + 1e-6)).all()
    assert module.tau_at(10 ** 6) == pytest.approx(module.config.tau_end)


# ---------------------------------------------------------------- budget-matched training

def test_a_budget_puts_the_band_around_it_and_explicit_keys_win():
    paper = GumbelAEConfig().band()
    assert paper == {"p": 0.6, "q": 0.1, "alpha1": 0.1, "alpha2": 0.1, "keep_ratio_reduction": "batch"}
    matched = GumbelAEConfig(budget=0.222)
    band = matched.band()
    assert band["q"] < 0.222 < band["p"] and band["p"] - band["q"] == pytest.approx(matched.budget_band)
    assert band["alpha1"] == band["alpha2"] == matched.budget_alpha and band["keep_ratio_reduction"] == "image"
    assert GumbelAEConfig(budget=0.222, alpha1=0.5).band()["alpha1"] == 0.5
    module = ae.make_module("gumbel_ae", budget=0.3)
    assert module.net.trained_budget == 0.3 and ae.make_module("gumbel_ae").net.trained_budget is None


@pytest.mark.parametrize("bad, message", [("selector.budget=1.5", "selector.budget=1.5"),
                                          ("selector.budget_band=0", "selector.budget_band=0")])
def test_a_bad_budget_is_one_line(bad, message):
    from tokensel.experiments.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("gumbel_ae", overrides=[bad])
