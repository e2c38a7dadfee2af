"""pool, VisionZip, DART and CDPruner on small cases worked by hand from their papers' definitions,
each at batch 1 and inside a batch of 4 (the other rows random) with identical outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokensel.common.cli import run_main
from tokensel.common.errors import TokenselError
from tokensel.selectors.metrics import evidence_recall, token_coverage
from tokensel.selectors.baselines import DARTOptions, DARTSelector
from tokensel.selectors.baselines_merging import PoolSelector, VisionZipOptions, VisionZipSelector, pool_cells
from tokensel.selectors.baselines_query import CDPrunerSelector, greedy_map_dpp, instruction_relevance
from tokensel.selectors.budget import BudgetError
from tokensel.selectors.catalog import build_baseline
from tokensel.selectors.inference import ContextError, SelectionContext


def in_batch_of_4(selector, features, budget, context_fields: dict, row: int = 2):
    """select() on the hand case alone and as row ``row`` of a batch of 4; both must agree."""
    alone = selector.select(features, budget, context=SelectionContext(**context_fields))
    gen = torch.Generator().manual_seed(1)

    def pad(x):
        if x is None:
            return None
        others = torch.rand(4, *x.shape[1:], generator=gen, dtype=x.dtype) * 2 - 1
        others[row] = x[0]
        return others

    batch_context = SelectionContext(**{key: pad(value) for key, value in context_fields.items()})
    batched = selector.select(pad(features), budget, context=batch_context)
    assert torch.equal(batched[0][row], alone[0][0]) and torch.allclose(batched[1][row], alone[1][0], atol=1e-12)
    return alone


# ---- pool: the cells -------------------------------------------------------------------------------
def test_pool_averages_the_quadrants_of_a_4x4_grid_and_names_them_by_their_centre():
    features = torch.arange(16 * 2, dtype=torch.float64).reshape(1, 16, 2)
    indices, kept = in_batch_of_4(PoolSelector((4, 4)), features, 4, {})
    assert indices.tolist() == [[5, 7, 13, 15]]  # the centre tokens uniform keeps at k=4
    for cell, tokens in enumerate([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]):
        assert torch.allclose(kept[0, cell], features[0, tokens].mean(dim=0))
    # 5 does not make a grid on 4x4: still the 2x2 cells (never more than the budget)
    assert PoolSelector((4, 4)).select(features, 5)[0].tolist() == [[5, 7, 13, 15]]
    share = PoolSelector((4, 4)).kept_share(features, indices)
    assert torch.allclose(share, torch.full((1, 16), 0.25, dtype=torch.float32))  # each token: 1/4 of a cell


def test_pool_cells_are_adaptive_average_pooling_with_overlapping_bins():
    # 5x5 to 3x3: row bins [0,2), [1,4), [3,5) (lengths 2, 3, 2), the same for columns
    anchors, weights = pool_cells((5, 5), 3, 3)
    assert anchors.tolist() == [0 * 5 + 0, 0 * 5 + 2, 0 * 5 + 4, 2 * 5 + 0, 12, 14, 20, 22, 24]
    share = weights.sum(dim=0).reshape(5, 5)
    by_row = torch.tensor([1 / 2, 1 / 2 + 1 / 3, 1 / 3, 1 / 3 + 1 / 2, 1 / 2])
    assert torch.allclose(share, by_row[:, None] * by_row[None, :])  # e.g. token (1, 1): (5/6)^2 of a cell
    assert math.isclose(float(share.sum()), 9.0, rel_tol=1e-6)
    for grid, k in [((5, 5), 9), ((24, 24), 64), ((24, 24), 128), ((3, 5), 7), ((6, 12), 8), ((24, 24), 576)]:
        x = torch.randn(2, grid[0] * grid[1], 3)
        _, kept = PoolSelector(grid).select(x, k)
        rows = len({int(a) // grid[1] for a in PoolSelector(grid).select(x, k)[0][0]})
        ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 3, *grid), (rows, kept.shape[1] // rows))
        assert torch.allclose(kept, ref.flatten(2).transpose(1, 2), atol=1e-6), (grid, k)


def test_pool_recall_counts_a_box_in_proportion_to_its_cells():
    features = torch.randn(1, 16, 4)
    box = torch.zeros(1, 16, dtype=torch.bool)
    box[0, [0, 1, 4, 5]] = True  # the top-left quadrant: one 2x2 cell at k=4
    pool = PoolSelector((4, 4))
    indices, kept = pool.select(features, 4)
    share = pool.kept_share(features, indices)
    assert evidence_recall(share, box).tolist() == [0.25]  # one kept token spent on 4 box tokens
    indices, kept = pool.select(features, 16)
    assert evidence_recall(pool.kept_share(features, indices), box).tolist() == [1.0]
    assert token_coverage(features, pool.kept_share(features, indices), kept=kept).tolist() == [1.0]


def test_pool_with_a_budget_larger_than_the_grid_is_one_line():
    with pytest.raises(BudgetError, match="4x4 token grid"):
        PoolSelector((4, 4)).select(torch.randn(1, 16, 2), 17)
    assert run_main(lambda argv: PoolSelector((4, 4)).select(torch.randn(1, 16, 2), 17)) == 2


# ---- VisionZip: the dominant / contextual split ---------------------------------------------------
def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest_into_uniform_targets():
    e = torch.eye(6, dtype=torch.float64)
    x = torch.stack([e[0], e[3], e[0] + 0.1 * e[2], e[4], e[1], e[5], e[1] + 0.1 * e[2], e[1] - 0.1 * e[2]])
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.05, 0.7, 0.3, 0.0]], dtype=torch.float64)
    selector = VisionZipSelector(VisionZipOptions(contextual_ratio=0.4))
    assert selector.split(5) == (3, 2)  # c = round(5 * 0.4) = 2 contextual, d = 3 dominant
    indices, kept = in_batch_of_4(selector, x[None], 5, {"cls_attention": attention})
    # dominant: top-3 attention = tokens 1, 3, 5. Remaining 0, 2, 4, 6, 7 (R = 5): every 5 // 2 = 2nd is a
    # target, so 0 and 4; token 2 joins 0 (the closer), 6 and 7 join 4.
    assert indices.tolist() == [[0, 1, 3, 4, 5]]
    expected = torch.stack([x[0] + x[2], x[1], x[3], x[4] + (x[6] + x[7]) / 2, x[5]])  # target + mean(group)
    assert torch.allclose(kept[0], expected)
    share = selector.kept_share(x[None], indices, SelectionContext(cls_attention=attention))
    assert torch.allclose(share[0].double(), torch.tensor([0.5, 1, 0.5, 1, 0.5, 1, 0.25, 0.25], dtype=torch.float64))
    mean = VisionZipSelector(VisionZipOptions(contextual_ratio=0.4, merge="mean"))
    _, kept = mean.select(x[None], 5, context=SelectionContext(cls_attention=attention))
    assert torch.allclose(kept[0, 0], (x[0] + x[2]) / 2) and torch.allclose(kept[0, 3], (x[4] + x[6] + x[7]) / 3)


def test_visionzip_splits_llava_budgets_as_the_paper_does_and_needs_cls_attention():
    selector = VisionZipSelector()
    assert [selector.split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert selector.split(1) == (1, 0)
    with pytest.raises(ContextError, match="data.cls_attention_layer"):
        selector.select(torch.randn(1, 16, 4), 4)


# ---- DART: the duplicate rule -----------------------------------------------------------------------
def test_dart_keeps_the_pivots_and_the_tokens_least_duplicated_with_them():
    x = torch.tensor([[3.0, 0, 0], [0, 2.5, 0], [0, 1.0, 0], [-1.0, 0, 0], [0, -1.0, 0], [0.7, 0.7, 0]],
                     dtype=torch.float64)
    selector = DARTSelector(DARTOptions(pivots=2))
    # pivots: the two largest L1 norms, 0 (3.0) then 1 (2.5); one more token each.
    # pivot 0: cosines 2: 0, 3: -1, 4: 0, 5: 0.71 -> 3. Pivot 1 among 2, 4, 5: 1, -1, 0.71 -> 4.
    # Token 2 (a duplicate of pivot 1) and 5 (close to both) are dropped.
    indices, kept = in_batch_of_4(selector, x[None], 4, {})
    assert indices.tolist() == [[0, 1, 3, 4]] and torch.equal(kept[0], x[[0, 1, 3, 4]])
    # one pivot, two more: 3 (cosine -1), then 1, 2 and 4 tie at 0: the lowest index, 1
    assert DARTSelector(DARTOptions(pivots=1)).select(x[None], 3)[0].tolist() == [[0, 1, 3]]
    # a budget below the pivot count keeps the top pivots only
    assert DARTSelector(DARTOptions(pivots=4)).select(x[None], 2)[0].tolist() == [[0, 1]]


# ---- CDPruner: the DPP's greedy order on a 4-token kernel ----------------------------------------------
def test_greedy_map_dpp_order_on_a_4_token_kernel():
    # L: tokens 0 and 1 near-duplicates (similarity 0.9), 2 and 3 independent with weights 0.64 and 0.25.
    L = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 0.64, 0.0], [0.0, 0.0, 0.0, 0.25]],
                     dtype=torch.float64)
    # step 1: det{i} = L_ii -> 0 and 1 tie at 1.0 -> 0 (lowest index).
    # step 2: det{0,1} = 1 - 0.81 = 0.19, det{0,2} = 0.64, det{0,3} = 0.25 -> 2.
    # step 3: det{0,2,1} = 0.64 * 0.19 = 0.1216, det{0,2,3} = 0.64 * 0.25 = 0.16 -> 3.  step 4: 1.
    assert greedy_map_dpp(L[None], 4).tolist() == [[0, 2, 3, 1]]
    batch = torch.stack([torch.eye(4, dtype=torch.float64), L, L * 0.5, torch.eye(4, dtype=torch.float64)])
    assert greedy_map_dpp(batch, 4)[1].tolist() == [0, 2, 3, 1]


def test_cdpruner_conditions_the_dpp_on_the_instruction():
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], 0.9 * e[0] + math.sqrt(0.19) * e[1], e[2], e[3]])[None]  # cos(x0, x1) = 0.9
    selector = CDPrunerSelector()
    # A question no token matches better than another: r = 1 for all, L = S -> the plain DPP keeps 0, 2, 3.
    flat = {"instruction_embedding": torch.ones(1, 2, dtype=torch.float64),
            "token_embedding": torch.ones(1, 4, 2, dtype=torch.float64)}
    assert in_batch_of_4(selector, x, 3, flat)[0].tolist() == [[0, 2, 3]]
    # A question about e0, e2 (and a little e3): cos 0.667, 0.6, 0.667, 0.333 -> r = 1, 0.8, 1, ~0.
    # L00 = L22 = 1, L11 = 0.64, L01 = 0.72, L33 ~ 0: order 0, 2, then 1 (gain 0.64 - 0.72^2 = 0.1216 > ~0).
    query = {"instruction_embedding": (e[0] + e[2] + 0.5 * e[3])[None]}
    r = instruction_relevance(x, SelectionContext(**query))
    assert torch.allclose(r, torch.tensor([[1.0, 0.8, 1.0, 0.0]], dtype=torch.float64), atol=1e-5)
    assert in_batch_of_4(selector, x, 3, query)[0].tolist() == [[0, 1, 2]]


def test_cdpruner_without_an_instruction_is_one_line():
    with pytest.raises(ContextError, match="cdpruner is query-aware"):
        build_baseline("cdpruner", (4, 4)).select(torch.randn(1, 16, 4), 4)
    assert issubclass(ContextError, TokenselError)
    assert run_main(lambda argv: build_baseline("cdpruner", (4, 4)).select(torch.randn(1, 16, 4), 4)) == 2
