"""Training-free baselines (selectors/baselines*.py): the contract every registered one keeps, the
old five's rules, and the encoder's CLS->patch attention. The new baselines' hand-worked cases from
their papers are in test_baselines_papers.py."""

import pytest
import torch

from tokensel.datamodules.encoders import EncoderError, FrozenEncoder, build_encoder
from tokensel.datamodules.encoders.hf import HFBackbone
from tokensel.datamodules.encoders.open_clip_vit import OpenClipViT
from tokensel.datamodules.encoders.timm_vit import TimmViT
from tokensel.datamodules.samples import Preprocess
from tokensel.selectors.baselines import (CLSAttentionSelector, DivPruneSelector, L2NormSelector, RandomSelector,
                                          TrainingFreeSelector, UniformSelector)
from tokensel.selectors.budget import BudgetError
from tokensel.selectors.catalog import BASELINES, build_baseline  # the catalog registers every baseline
from tokensel.selectors.inference import SelectionContext


def full_context(features, cls_attention=None):
    """Everything a baseline may read: CLS attention and an instruction with its embedding."""
    B, N, _ = features.shape
    gen = torch.Generator().manual_seed(7)
    return SelectionContext(cls_attention=torch.rand(B, N, generator=gen) if cls_attention is None else cls_attention,
                            instruction=["what is the total?"] * B,
                            instruction_embedding=torch.randn(B, 6, generator=gen),
                            token_embedding=torch.randn(B, N, 6, generator=gen))


def run(selector, features, budget, cls_attention=None):
    return selector.select(features, budget, context=full_context(features, cls_attention))


# ---- every baseline: the shared contract ---------------------------------------------------------
@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("grid, budget, k", [
    ((4, 4), 1, 1), ((4, 4), 5, 5), ((4, 4), 16, 16), ((4, 4), 0.25, 4), ((4, 4), 1.0, 16),
    ((3, 5), 7, 7), ((3, 5), 0.5, 8), ((1, 1), 1, 1),
])
def test_every_baseline_returns_k_unique_sorted_valid_indices(name, grid, budget, k):
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    features = torch.randn(3, n, 8)
    selector = build_baseline(name, grid, seed=0)
    assert isinstance(selector, TrainingFreeSelector) and selector.needs_cls_attention == (
        name in ("cls_attention", "visionzip"))
    assert selector.uses_instruction == (name == "cdpruner") and selector.merges == (name in ("pool", "visionzip"))
    context = full_context(features)
    indices, kept = selector.select(features, budget, context=context)
    kept_k = indices.shape[1]
    assert indices.shape == (3, kept_k) and indices.dtype == torch.long and kept.shape == (3, kept_k, 8)
    assert kept_k == k or (name == "pool" and 1 <= kept_k <= k)  # pool: the largest cell grid within k
    assert ((indices >= 0) & (indices < n)).all()
    assert (indices[:, 1:] > indices[:, :-1]).all()  # strictly ascending: sorted and unique
    share = selector.kept_share(features, indices, context)
    assert share.shape == (3, n) and (share >= 0).all() and (share <= 1 + 1e-6).all()
    assert torch.allclose(share.sum(dim=1), torch.full((3,), float(kept_k)))  # k tokens' worth of input
    if selector.merges:
        anchors, weights = selector.merge(features, k, context)
        assert torch.equal(anchors, indices) and torch.allclose(kept, weights @ features, atol=1e-6)
    else:
        assert torch.equal(kept, features.gather(1, indices.unsqueeze(-1).expand(-1, -1, 8)))
        assert torch.equal(share, torch.zeros(3, n).scatter_(1, indices, 1.0))
    if k == n:
        assert torch.equal(indices, torch.arange(n).expand(3, n))
        assert torch.allclose(kept, features, atol=1e-6)  # everything kept, merged or not
    if name != "random":  # a row selects the same alone as in a batch
        one = selector.select(features[1:2], budget, context=context.take(torch.tensor([1])))
        assert torch.equal(one[0][0], indices[1]) and torch.allclose(one[1][0], kept[1], atol=1e-6)


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("budget", [0, -1, 17, 0.0, 1.5, True])
def test_impossible_budgets_raise_budget_error(name, budget):
    with pytest.raises(BudgetError):
        run(build_baseline(name, (4, 4)), torch.randn(2, 16, 8), budget)


def test_build_baseline_names_the_choices():
    with pytest.raises(ValueError) as err:
        build_baseline("tome", (4, 4))
    names = ("random", "uniform", "l2norm", "divprune", "cls_attention", "dart", "pool", "visionzip", "cdpruner")
    for name in names:
        assert name in str(err.value)
    assert set(BASELINES) == set(names)


# ---- divprune ----------------------------------------------------------------------------------
def brute_force_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The DivPrune greedy written naively: full min over the selected set at every step."""
    n = len(x)
    xn = x / x.norm(dim=-1, keepdim=True)
    D = 1 - xn @ xn.T
    nearest = [min(D[i, j].item() for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(D[s, i].item() for s in chosen), -i)))
    return chosen


def test_divprune_equals_the_brute_force_max_min_greedy():
    gen = torch.Generator().manual_seed(0)
    selector = DivPruneSelector()
    for n in range(2, 11):
        features = torch.randn(4, n, 6, dtype=torch.float64, generator=gen)
        for k in range(1, n + 1):
            indices, _ = selector.select(features, k)
            for b in range(4):
                assert indices[b].tolist() == sorted(brute_force_divprune(features[b], k)), (n, k, b)


def test_divprune_first_pick_is_the_token_with_the_farthest_nearest_neighbour():
    # Tokens 0-2 are near-duplicates, 3 is alone: 3 has the farthest nearest neighbour.
    x = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.98, -0.05], [0.0, 1.0]]).unsqueeze(0)
    assert DivPruneSelector().select(x, 1)[0].tolist() == [[3]]
    # then the token farthest from 3 among the duplicates: 2 (it leans away from 3)
    assert DivPruneSelector().select(x, 2)[0].tolist() == [[2, 3]]


def test_divprune_breaks_ties_by_the_lowest_index_and_never_repeats():
    same = torch.ones(2, 9, 4)  # every distance is 0: all ties
    indices, _ = DivPruneSelector().select(same, 5)
    assert torch.equal(indices, torch.arange(5).expand(2, 5))


# ---- random, uniform, l2norm, cls_attention ----------------------------------------------------
def test_random_is_reproducible_per_seed_and_independent_of_the_global_rng():
    features = torch.randn(4, 64, 8)
    a, b, c = RandomSelector(seed=0), RandomSelector(seed=0), RandomSelector(seed=1)
    first_a, second_a = a.select(features, 10)[0], a.select(features, 10)[0]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first_b = b.select(features, 10)[0]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor advanced
    torch.manual_seed(999)
    second_b = b.select(features, 10)[0]
    assert torch.equal(first_a, first_b) and torch.equal(second_a, second_b)
    assert not torch.equal(first_a, second_a)  # the sequence moves on
    assert not torch.equal(first_a, c.select(features, 10)[0])  # another seed, other draws
    assert not torch.equal(first_a[0], first_a[1])  # rows draw independently
    a.reset()
    assert torch.equal(a.select(features, 10)[0], first_a)
    counts = torch.bincount(RandomSelector(seed=3).select(torch.randn(2000, 16, 1), 4)[0].flatten(), minlength=16)
    assert counts.min() > 400 and counts.max() < 600  # each token ~ 2000 * 4 / 16 = 500 times


def test_uniform_spreads_the_tokens_evenly_over_the_grid():
    features = torch.randn(2, 16, 8)
    selector = UniformSelector(grid=(4, 4))
    indices, _ = selector.select(features, 4)
    rows, cols = indices[0] // 4, indices[0] % 4
    quadrants = sorted(((r // 2) * 2 + c // 2).item() for r, c in zip(rows, cols))
    assert quadrants == [0, 1, 2, 3]  # one token per 2x2 quadrant
    assert torch.equal(indices[0], indices[1])  # the same grid for every sample
    assert selector.select(features, 16)[0][0].tolist() == list(range(16))
    assert selector.select(features, 1)[0].tolist() == [[10], [10]]  # the centre
    # 24x24 (LLaVA-1.5) at 64 tokens: an 8x8 lattice with stride 3
    idx = UniformSelector((24, 24)).select(torch.randn(1, 576, 2), 64)[0][0]
    assert sorted(set((idx // 24).tolist())) == list(range(1, 24, 3)) == sorted(set((idx % 24).tolist()))
    # a non-square grid: every row band and column band is covered
    idx = UniformSelector((6, 12)).select(torch.randn(1, 72, 2), 8)[0][0]
    assert set((idx // 12 // 3).tolist()) == {0, 1} and set((idx % 12 // 3).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="grid"):
        selector.select(torch.randn(1, 15, 8), 4)


def test_l2norm_picks_the_largest_norms():
    features = torch.randn(2, 10, 4)
    features = features / features.norm(dim=-1, keepdim=True)
    features[0, [7, 2, 5]] *= torch.tensor([3.0, 4.0, 5.0]).unsqueeze(-1)
    features[1, [0, 9, 1]] *= 6.0
    assert L2NormSelector().select(features, 3)[0].tolist() == [[2, 5, 7], [0, 1, 9]]


def test_cls_attention_picks_the_top_attention_and_needs_it():
    features = torch.randn(2, 6, 4)
    attn = torch.tensor([[0.1, 0.3, 0.05, 0.2, 0.0, 0.25], [0.5, 0.0, 0.1, 0.1, 0.2, 0.05]])
    indices, kept = CLSAttentionSelector().select(features, 2, context=SelectionContext(cls_attention=attn))
    assert indices.tolist() == [[1, 5], [0, 4]]
    assert torch.equal(kept[1], features[1, [0, 4]])
    with pytest.raises(ValueError, match="data.cls_attention_layer"):
        CLSAttentionSelector().select(features, 2)
    with pytest.raises(ValueError, match="shape"):
        CLSAttentionSelector().select(features, 2, context=SelectionContext(cls_attention=attn[:, :5]))
    # the others ignore it
    assert torch.equal(L2NormSelector().select(features, 2, context=SelectionContext(cls_attention=attn))[0],
                       L2NormSelector().select(features, 2)[0])


# ---- CLS->patch attention from the frozen encoder ------------------------------------------------
def manual_timm_cls_attention(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Full softmax attention of block ``layer`` built by hand; its CLS row over the patch keys."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    blocks = list(model.blocks)
    for block in blocks[:layer % len(blocks)]:
        tokens = block(tokens)
    block = blocks[layer]
    y = block.norm1(tokens)
    B, L, C = y.shape
    attn = block.attn
    q, k, _ = attn.qkv(y).reshape(B, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, L, L)
    return weights[:, :, 0, model.num_prefix_tokens:].mean(dim=1)


@pytest.mark.parametrize("layer", [-2, 0])
def test_timm_cls_attention_equals_a_manual_full_attention(layer):
    torch.manual_seed(0)
    enc = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    x = torch.randn(3, 3, 64, 64)
    features, cls_attn = enc.forward_with_cls_attention(x, layer)
    assert cls_attn.shape == (3, 16) and cls_attn.dtype == torch.float32
    assert (cls_attn >= 0).all() and (cls_attn.sum(-1) <= 1 + 1e-6).all()
    assert torch.equal(features, enc(x))  # the same features as the plain forward
    with torch.no_grad():
        assert torch.allclose(cls_attn, manual_timm_cls_attention(enc.model, x, layer), atol=1e-5, rtol=0)
    assert not enc.model.blocks[layer].attn._forward_pre_hooks  # the hook is removed


def test_cls_attention_errors_name_the_encoder():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg", num_classes=0)
    pre = Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic")
    enc = FrozenEncoder("timm:vit_tiny_no_cls", TimmViT(model, pre), -1, True)
    with pytest.raises(EncoderError, match="timm:vit_tiny_no_cls.*no CLS token"):
        enc.forward_with_cls_attention(torch.randn(1, 3, 32, 32), -2)
    with pytest.raises(EncoderError, match="cls_attention_layer=12"):
        build_encoder("timm:vit_tiny_patch16_224", image_size=64).check_cls_attention(12)


def test_open_clip_cls_attention_matches_multihead_attention_weights():
    torch.manual_seed(0)
    enc = build_encoder("open_clip:ViT-B-32", layer=-2, norm=False)
    x = torch.randn(2, 3, 224, 224)
    block = enc.model.visual.transformer.resblocks[-2]
    seen = []
    handle = block.ln_1.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        features, cls_attn = enc.forward_with_cls_attention(x, -2)
    finally:
        handle.remove()
    assert features.shape == (2, 49, 768) and cls_attn.shape == (2, 49)
    assert (cls_attn >= 0).all() and (cls_attn.sum(-1) <= 1 + 1e-6).all()
    y = seen[0]  # (B, L, C), or (L, B, C) when not batch_first: the weights are (B, L, L) either way
    with torch.no_grad():
        _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    assert torch.allclose(cls_attn, weights[:, 0, 1:], atol=1e-5, rtol=0)
    assert torch.equal(features, enc(x))


def test_open_clip_custom_block_with_qk_norm():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, qk_norm=True)
    pre = Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic")
    enc = FrozenEncoder("open_clip:custom", OpenClipViT(torch.nn.ModuleDict({"visual": visual}), pre), -1, False)
    block = visual.transformer.resblocks[0]
    seen = []
    handle = block.ln_1.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        features, cls_attn = enc.forward_with_cls_attention(torch.randn(2, 3, 32, 32), 0)
    finally:
        handle.remove()
    attn, y = block.attn, seen[0]
    with torch.no_grad():
        q, k, _ = torch.nn.functional.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(2, 17, 4, 8).transpose(1, 2) for t in (q, k))
        q, k = attn.ln_q(q), attn.ln_k(k)
        reference = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 1:].mean(1)
    assert features.shape == (2, 16, 32) and torch.allclose(cls_attn, reference, atol=1e-5, rtol=0)


def test_hf_clip_tower_cls_attention_matches_its_eager_attentions():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4))
    from tokensel.vlms.llava import LlavaTower
    from tokensel.vlms.sources import PixelSpec

    pre = PixelSpec((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic")
    enc = FrozenEncoder("hf:tiny", HFBackbone(LlavaTower(tower, pre)), -2, False)
    x = torch.randn(2, 3, 32, 32)
    features, cls_attn = enc.forward_with_cls_attention(x, -2)
    assert torch.equal(features, enc(x))
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        reference = tower(pixel_values=x, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(dim=1)
    assert torch.allclose(cls_attn, reference, atol=1e-5, rtol=0)
    normed = FrozenEncoder("hf:tiny", HFBackbone(LlavaTower(tower, pre)), -2, True)
    features_normed, cls_attn_normed = normed.forward_with_cls_attention(x, -2)  # post_layernorm: transformers 4 and 5
    assert features_normed.shape == (2, 16, 32) and torch.allclose(cls_attn_normed, cls_attn)


def test_datamodule_fills_cls_attention_only_on_request(tiny_corpus):
    from tokensel.datamodules.datamodule import DataConfig, EncoderConfig, FeatureDataModule

    data = DataConfig(root=str(tiny_corpus), batch_size=4, num_workers=0, shuffle_buffer=8, recon_size=16,
                      feature_cache="off")
    datamodule = FeatureDataModule(data, EncoderConfig(image_size=64))
    raw = next(iter(datamodule.val_dataloader()))
    plain = datamodule.features(raw)
    assert plain.cls_attention is None
    data.cls_attention_layer = -2
    batch = FeatureDataModule(data, EncoderConfig(image_size=64)).features(raw)
    assert batch.cls_attention.shape == (4, 16) and torch.equal(batch.features, plain.features)
    assert torch.equal(batch.head(2).cls_attention, batch.cls_attention[:2]) and plain.head(2).cls_attention is None
    indices, _ = build_baseline("cls_attention", datamodule.dims.grid).select(
        batch.features, 4, context=SelectionContext(cls_attention=batch.cls_attention))
    assert indices.shape == (4, 4)
    bad = DataConfig(root=str(tiny_corpus), batch_size=4, num_workers=0, cls_attention_layer=12, feature_cache="off")
    with pytest.raises(EncoderError, match="cls_attention_layer=12"):
        FeatureDataModule(bad, EncoderConfig(image_size=64))


@pytest.mark.parametrize("name", list(BASELINES))
def test_select_across_views_keeps_k_of_all_view_tokens(name):
    G, V, grid = 3, 4, (4, 4)
    views = torch.randn(G, V, 16, 8)
    context = full_context(views.reshape(G * V, 16, 8))
    selector = build_baseline(name, grid)
    indices, kept = selector.select_across(views, 0.25, context=context)
    assert indices.shape == (G, 16) and kept.shape == (G, 16, 8)  # 25 % of 4 x 16 tokens (pool: 2 x 8 cells)
    assert all(len(set(row.tolist())) == 16 and row.tolist() == sorted(row.tolist()) for row in indices)
    share = selector.kept_share_across(views, indices, context)
    assert share.shape == (G, 64) and torch.allclose(share.sum(dim=1), torch.full((G,), 16.0))
    if not selector.merges:
        assert torch.equal(kept, views.reshape(G, 64, 8)[torch.arange(G)[:, None], indices])


def test_select_across_is_the_top_k_of_each_views_own_scores():
    views = torch.randn(2, 3, 16, 8)
    l2 = L2NormSelector()
    indices, _ = l2.select_across(views, 10)
    expected = views.norm(dim=-1).reshape(2, 48).topk(10).indices.sort(dim=-1).values
    assert torch.equal(indices, expected)
    uniform = build_baseline("uniform", (4, 4)).select_across(views, 3)[0]  # stacked 12 x 4 grid: one per band
    assert torch.equal(uniform[0], torch.tensor([2 * 4 + 2, 6 * 4 + 2, 10 * 4 + 2]))
