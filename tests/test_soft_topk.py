"""AutoSelect / DiffPrune pieces: LapSum soft top-K, the tau schedule, the VP noise gate, the Denoiser."""

import math

import pytest
import torch

from tokensel.selectors.blocks import DiagonalDenoiser
from tokensel.selectors.budget import alpha_entropy, cosine_tau, soft_topk, vp_noise_gate

TAUS = (0.05, 0.1, 0.5, 2.0, 5.0)


def _ks(n: int) -> list[int]:
    return sorted({1, 2, 5, n // 4, n // 2, n - 1})


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n", [7, 576])
def test_soft_topk_sums_to_k_and_stays_in_unit_interval(n, tau):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(3, n, generator=gen) * 3.0
    for k in _ks(n):
        alpha = soft_topk(scores, k, tau)
        assert alpha.shape == (3, n) and alpha.dtype == torch.float32
        assert torch.allclose(alpha.double().sum(-1), torch.full((3,), float(k), dtype=torch.float64), atol=1e-4, rtol=0)
        assert alpha.min() >= 0 and alpha.max() <= 1
        # order preserving: a higher score never gets a lower weight
        order = scores.argsort(dim=-1)
        assert (alpha.gather(-1, order).diff(dim=-1) >= 0).all()


def test_soft_topk_per_row_budget():
    scores = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([1, 17, 150, 299])
    for tau in TAUS:
        sums = soft_topk(scores, k, tau).double().sum(-1)
        assert torch.allclose(sums, k.double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_topk_low_precision_inputs_are_solved_in_fp32_or_better(dtype):
    scores = (torch.randn(2, 2880, generator=torch.Generator().manual_seed(2)) * 4.0).to(dtype)
    for tau in TAUS:
        alpha = soft_topk(scores, 320, tau)
        assert alpha.dtype == torch.float32
        assert torch.allclose(alpha.double().sum(-1), torch.full((2,), 320.0, dtype=torch.float64), atol=1e-4, rtol=0)


def test_soft_topk_extreme_scales_and_ties():
    gen = torch.Generator().manual_seed(3)
    for tau in (0.01, 1.0, 10.0):
        for scores in (torch.randn(2, 3000, generator=gen) * 1e3 / tau,  # |z| up to ~1e7 at tau = 0.01
                       torch.randint(0, 3, (2, 3000), generator=gen).float() * 1e3 / tau,  # massive ties
                       torch.full((2, 3000), 5.0)):  # all equal
            for k in (1, 1500, 2999):
                alpha = soft_topk(scores, k, tau)
                assert torch.isfinite(alpha).all()
                assert torch.allclose(alpha.double().sum(-1), torch.full((2,), float(k), dtype=torch.float64),
                                      atol=1e-4, rtol=0)
    assert torch.allclose(soft_topk(torch.zeros(1, 10), 3, 1.0), torch.full((1, 10), 0.3))


@pytest.mark.parametrize("tau", [0.3, 2.0])
def test_soft_topk_backward_matches_finite_differences(tau):
    scores = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    k = torch.tensor([1, 4, 11])
    assert soft_topk(scores, k, tau).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, k, tau), (scores,), eps=1e-6, atol=1e-7)


def test_soft_topk_backward_in_float32_matches_a_central_difference():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 40, generator=gen, requires_grad=True)
    weights = torch.randn(2, 40, generator=gen)
    tau, k, h = 0.5, 8, 1e-3
    (soft_topk(scores, k, tau) * weights).sum().backward()
    for row, col in [(0, 0), (0, 17), (1, 5), (1, 39)]:
        plus, minus = scores.detach().double().clone(), scores.detach().double().clone()
        plus[row, col] += h
        minus[row, col] -= h
        numeric = ((soft_topk(plus, k, tau) - soft_topk(minus, k, tau)) * weights.double()).sum() / (2 * h)
        assert abs(scores.grad[row, col].item() - numeric.item()) < 1e-5
    assert torch.allclose(scores.grad.sum(-1), torch.zeros(2), atol=1e-6)  # the budget is a constant


def test_soft_topk_low_temperature_is_the_hard_top_k():
    gen = torch.Generator().manual_seed(6)
    scores = torch.stack([torch.randperm(50, generator=gen).float() for _ in range(3)])  # gaps of 1, no ties
    for k in (1, 10, 49):
        alpha = soft_topk(scores, k, 1e-3)
        hard = torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=-1).indices, 1.0)
        assert (alpha - hard).abs().max() < 1e-3


@pytest.mark.parametrize("k", [0, -1, 50, 51])
def test_soft_topk_rejects_budgets_outside_zero_n(k):
    with pytest.raises(ValueError, match=rf"k={k}.*N=50"):
        soft_topk(torch.randn(2, 50), k, 1.0)
    with pytest.raises(ValueError, match=r"N=50"):
        soft_topk(torch.randn(2, 50), torch.tensor([3, k]), 1.0)


def test_soft_topk_rejects_non_positive_tau():
    with pytest.raises(ValueError, match="tau"):
        soft_topk(torch.randn(2, 50), 3, 0.0)


def test_cosine_tau_schedule():
    assert cosine_tau(0) == pytest.approx(2.0)
    assert cosine_tau(1000) == pytest.approx(1.05)
    assert cosine_tau(500) == pytest.approx(0.1 + 0.95 * (1 + math.cos(math.pi / 4)))
    for step in (2000, 2001, 10**6):
        assert cosine_tau(step) == pytest.approx(0.1)
    taus = [cosine_tau(s) for s in range(0, 2001, 50)]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert cosine_tau(5, start=1.0, end=0.5, steps=10) == pytest.approx(0.75)


@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_vp_gate_preserves_unit_variance(a):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 1000, 64, generator=gen)
    out = vp_noise_gate(x, torch.full((4, 1000), a))
    assert out.shape == x.shape
    assert abs(out.var().item() - 1.0) < 0.02
    assert abs(out.mean().item()) < 0.01


def test_vp_gate_formula_dtype_and_fresh_noise():
    gen = torch.Generator().manual_seed(8)
    x, eps = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    alpha = torch.rand(2, 5, generator=gen) * 0.8 + 0.1
    expected = alpha.sqrt()[..., None] * x + (1 - alpha).sqrt()[..., None] * eps
    assert torch.allclose(vp_noise_gate(x, alpha, eps), expected, atol=1e-6)
    assert torch.equal(vp_noise_gate(x, torch.ones(2, 5), eps), x + 1e-3 * eps)  # alpha = 1 keeps the token
    out = vp_noise_gate(x.to(torch.bfloat16), alpha)
    assert out.dtype == torch.bfloat16
    assert not torch.equal(vp_noise_gate(x, alpha), vp_noise_gate(x, alpha))


def test_vp_gate_gradients_reach_alpha_and_stay_finite_at_the_ends():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 8, generator=gen)
    alpha = torch.tensor([[0.0, 1e-9, 0.3, 0.7, 1.0 - 1e-9, 1.0]] * 2, requires_grad=True)
    (vp_noise_gate(x, alpha) * torch.randn(2, 6, 8, generator=gen)).sum().backward()
    assert torch.isfinite(alpha.grad).all()
    assert (alpha.grad != 0).all()


def test_vp_gate_gradient_flows_into_the_scores_through_soft_topk():
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(10), requires_grad=True)
    out = vp_noise_gate(torch.randn(2, 30, 4), soft_topk(scores, 5, 0.1))
    out.square().sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_alpha_entropy():
    assert alpha_entropy(torch.tensor([[0.0, 1.0, 1.0, 0.0]])).item() == 0.0
    assert alpha_entropy(torch.full((3, 7), 0.5)).item() == pytest.approx(math.log(2))
    soft = soft_topk(torch.randn(2, 100, generator=torch.Generator().manual_seed(11)), 10, 2.0)
    sharp = soft_topk(torch.randn(2, 100, generator=torch.Generator().manual_seed(11)), 10, 0.1)
    assert 0 < alpha_entropy(sharp) < alpha_entropy(soft) < math.log(2)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [True, False])  # eval without grad takes PyTorch's fused fast path
def test_denoiser_is_identity_at_init_and_per_token_after_training(mode, grad):
    torch.manual_seed(12)
    den = DiagonalDenoiser(64, head_dim=16)
    getattr(den, mode)()
    x = torch.randn(3, 9, 64)
    with torch.set_grad_enabled(grad):
        assert torch.equal(den(x), x)
        _perturb(den, 13)
        y = den(x)
        assert (y - x).abs().max() > 1e-2  # no longer the identity
        for j in (0, 4, 8):
            moved = x.clone()
            moved[:, j] += 10.0 * torch.randn(3, 64)
            others = [i for i in range(9) if i != j]
            y2 = den(moved)
            assert (y2[:, others] - y[:, others]).abs().max() < 1e-6
            assert (y2[:, j] - y[:, j]).abs().max() > 1e-2
        alone = torch.cat([den(x[:, i:i + 1]) for i in range(9)], dim=1)  # each token as its own sequence
        assert (alone - y).abs().max() < 1e-5


def test_denoiser_train_and_eval_agree_and_it_trains():
    torch.manual_seed(14)
    den = DiagonalDenoiser(32, head_dim=8, mlp_ratio=2.0)
    _perturb(den, 15)
    x = torch.randn(2, 5, 32)
    y_train = den.train()(x)
    with torch.no_grad():
        y_eval = den.eval()(x)
    assert (y_train - y_eval).abs().max() < 1e-5
    den = DiagonalDenoiser(32, head_dim=8).train()
    den(x).square().sum().backward()  # zero-init output projections still receive gradients
    assert den.block.linear2.weight.grad.abs().sum() > 0
    assert den.block.self_attn.out_proj.weight.grad.abs().sum() > 0
    assert not any(isinstance(m, torch.nn.LayerNorm) and m not in (den.block.norm1, den.block.norm2)
                   for m in den.modules())
