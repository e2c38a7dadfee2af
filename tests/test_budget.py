"""The selector math: masks, estimators, the budget regularisers, E_masked, top-K."""

import pytest
import torch

from tokensel.selectors.budget import binary_keep_mask, budget_regulariser, keep_ratio, replace_dropped
from tokensel.selectors.budget import BudgetError, resolve_budget
from tokensel.selectors.inference import gather_tokens, topk_positions


def test_gumbel_mask_is_binary_and_gradients_reach_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, 2, requires_grad=True)
    mask = binary_keep_mask(logits, "gumbel", tau=1.0)
    assert mask.shape == (4, 50)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    (mask * torch.randn(4, 50)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_mask_is_a_sample_and_noiseless_mask_is_the_argmax():
    torch.manual_seed(0)
    logits = torch.zeros(1, 4000, 2)
    logits[..., 1] = 0.5  # keep probability sigmoid(0.5) ~ 0.62
    sampled = binary_keep_mask(logits, "gumbel", noise=True)
    assert abs(sampled.mean().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.03
    assert torch.equal(binary_keep_mask(logits, "gumbel", noise=False), torch.ones(1, 4000))


def test_straight_through_gradient_equals_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, 2)
    weights = torch.randn(3, 20)
    hard_in = logits.clone().requires_grad_(True)
    (binary_keep_mask(hard_in, "straight_through") * weights).sum().backward()
    soft_in = logits.clone().requires_grad_(True)
    (torch.softmax(soft_in, dim=-1)[..., 1] * weights).sum().backward()
    assert torch.allclose(hard_in.grad, soft_in.grad, atol=1e-6)
    # and its forward value is the hard argmax, with no noise
    assert torch.equal(binary_keep_mask(logits, "straight_through"), (logits[..., 1] > logits[..., 0]).float())


def test_keep_ratio_is_mean_of_mask():
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert keep_ratio(mask).item() == pytest.approx(0.5)


@pytest.mark.parametrize("l_pr", [0.0, 0.05, 0.3, 0.6, 0.9])
def test_maxmin_value(l_pr):
    value = budget_regulariser(torch.tensor(l_pr), "maxmin", p=0.6, q=0.1, alpha1=0.1, alpha2=0.2)
    assert value.item() == pytest.approx(0.1 * max(l_pr, 0.6) - 0.2 * min(l_pr, 0.1))


def _grad(kind, l_pr):
    x = torch.tensor(l_pr, requires_grad=True)
    budget_regulariser(x, kind, p=0.6, q=0.1, alpha1=0.1, alpha2=0.1).backward()
    return x.grad.item()


@pytest.mark.parametrize("l_pr", [0.11, 0.3, 0.59])
def test_maxmin_has_zero_gradient_strictly_inside_band(l_pr):
    assert _grad("maxmin", l_pr) == 0.0


def test_maxmin_pushes_down_above_p_and_up_below_q():
    assert _grad("maxmin", 0.8) == pytest.approx(0.1)  # gradient descent lowers L_pr
    assert _grad("maxmin", 0.05) == pytest.approx(-0.1)  # gradient descent raises L_pr


def test_plain_always_pushes_down():
    for l_pr in (0.05, 0.3, 0.8):
        assert _grad("plain", l_pr) == pytest.approx(0.1)


def test_unknown_regulariser_and_estimator_raise():
    with pytest.raises(ValueError, match="regulariser"):
        budget_regulariser(torch.tensor(0.5), "nope", 0.6, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="estimator"):
        binary_keep_mask(torch.zeros(1, 2, 2), "nope")


def test_masked_embedding_replaces_exactly_the_dropped_tokens():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 4)
    e_masked = torch.randn(4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    out = replace_dropped(features, mask, e_masked)
    keep = mask.bool()
    assert torch.equal(out[keep], features[keep])
    assert torch.equal(out[~keep], e_masked.expand(int((~keep).sum()), 4))


def test_masked_embedding_passes_gradient_to_the_mask():
    features = torch.randn(1, 3, 2)
    e_masked = torch.zeros(2)
    logits = torch.randn(1, 3, 2, requires_grad=True)
    replace_dropped(features, binary_keep_mask(logits, "straight_through"), e_masked).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_topk_returns_k_sorted_positions_of_the_highest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]])
    idx = topk_positions(scores, 3)
    assert idx.tolist() == [[1, 2, 3], [0, 1, 2]]
    features = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    kept = gather_tokens(features, idx)
    assert kept.shape == (2, 3, 2)
    assert torch.equal(kept[0], features[0, [1, 2, 3]])


def test_topk_on_random_scores_is_sorted_unique_and_maximal():
    torch.manual_seed(1)
    scores = torch.randn(8, 196)
    idx = topk_positions(scores, 40)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    picked = scores.gather(1, idx)
    rest = scores.clone().scatter_(1, idx, float("-inf"))
    assert (picked.min(dim=1).values >= rest.max(dim=1).values).all()


def test_budgets_resolve_counts_and_ratios_and_reject_bad_ones():
    assert resolve_budget(64, 576) == 64
    assert resolve_budget(0.5, 576) == 288
    assert resolve_budget(1.0, 10) == 10
    assert resolve_budget(0.001, 10) == 1
    for bad in (0, -3, 577, 0.0, 1.5, "8", True):
        with pytest.raises(BudgetError):
            resolve_budget(bad, 576)


def test_per_image_keep_ratio_regularises_each_image():
    # two images: one keeps everything, one nothing; the batch mean (0.5) sits inside (q, p)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert keep_ratio(mask).item() == 0.5
    assert keep_ratio(mask, per_image=True).tolist() == [1.0, 0.0]
    batch = budget_regulariser(keep_ratio(mask), "maxmin", 0.6, 0.1, 0.1, 0.1)
    image = budget_regulariser(keep_ratio(mask, per_image=True), "maxmin", 0.6, 0.1, 0.1, 0.1)
    assert batch.item() == pytest.approx(0.1 * 0.6 - 0.1 * 0.1)  # in the band: the floor value
    # per image: (0.1 * 1.0 - 0.1 * 0.1 + 0.1 * 0.6 - 0.1 * 0.0) / 2
    assert image.item() == pytest.approx((0.1 - 0.01 + 0.06 - 0.0) / 2)


def test_budget_lists_parse_counts_and_ratios_with_one_line_errors():
    from tokensel.selectors.budget import parse_budgets

    assert parse_budgets("0.1, 0.25,64") == [0.1, 0.25, 64]
    for text, words in (("0", ["'0'", "positive"]), ("2.5", ["'2.5'", "ratio above 1"]), ("x", ["'x'"])):
        with pytest.raises(BudgetError) as err:
            parse_budgets(text)
        assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
