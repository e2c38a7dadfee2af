"""Evaluation: per-sample metrics (metrics.py), CIs (stats.py), Sec. 5.3 FLOPs (flops.py), reports (report.py)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tokensel.experiments.flops import GEOMETRIES, flops_report, llm_flops, sampler_flops
from tokensel.selectors.metrics import evidence_recall, keep_mask, kept_indices, psnr, token_coverage
from tokensel.experiments.report import plot_metrics, write_table
from tokensel.common.stats import MetricAccumulator, mean_ci, t_quantile

# ---------------------------------------------------------------- keep_mask / evidence recall


def test_keep_mask():
    mask = keep_mask(torch.tensor([[0, 3], [2, 2]]), 5)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, False, False, True, False], [False, False, True, False, False]]
    assert keep_mask(torch.empty(2, 0, dtype=torch.long), 4).sum() == 0
    with pytest.raises(ValueError):
        keep_mask(torch.tensor([[5]]), 5)


def test_kept_indices_invert_keep_mask_in_positional_order():
    indices = torch.tensor([[4, 0, 2], [1, 3, 2]])
    assert kept_indices(keep_mask(indices, 5)).tolist() == [[0, 2, 4], [1, 2, 3]]
    with pytest.raises(ValueError, match="one size per batch"):
        kept_indices(keep_mask(torch.tensor([[0, 1], [2, 2]]), 5))


def _answer_batch():
    # 3 samples, 6 tokens; sample 1 has no box
    answer = torch.zeros(3, 6, dtype=torch.bool)
    answer[0, [1, 2]] = True
    answer[2, [0, 4, 5]] = True
    has_box = torch.tensor([True, False, True])
    return answer, has_box


def test_evidence_recall_keeping_the_box_is_one_and_missing_it_is_zero():
    answer, has_box = _answer_batch()
    perfect = evidence_recall(answer.clone(), answer, has_box)
    assert perfect.tolist() == [1.0, 1.0]  # the no-box sample is excluded, not 0
    miss = evidence_recall(~answer, answer, has_box)
    assert miss.tolist() == [0.0, 0.0]
    partial = evidence_recall(keep_mask(torch.tensor([[1, 3], [0, 1], [0, 1]]), 6), answer, has_box)
    assert partial.tolist() == pytest.approx([0.5, 1 / 3])
    assert perfect.dtype == torch.float64


def test_evidence_recall_excludes_no_box_samples():
    answer, has_box = _answer_batch()
    keep = torch.ones(3, 6, dtype=torch.bool)
    # a box flag without answer tokens is not scorable either
    has_box_all = torch.tensor([True, True, True])
    assert evidence_recall(keep, answer, has_box_all).numel() == 2
    none = evidence_recall(keep, torch.zeros(3, 6, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    assert none.shape == (0,)
    assert evidence_recall(keep, None, None).shape == (0,)  # FeatureBatch.answer_tokens is None
    mean, half, n = mean_ci(none)
    assert n == 0 and math.isnan(mean) and math.isnan(half)


# ---------------------------------------------------------------- token coverage


def test_coverage_keep_all_is_one():
    feats = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(0))
    cov = token_coverage(feats, torch.ones(4, 10, dtype=torch.bool))
    assert cov.shape == (4,)
    assert torch.allclose(cov, torch.ones(4, dtype=torch.float64))


def test_coverage_hand_made():
    # token 0 = e1 (kept); token 1 at 60 degrees from it (cos 0.5); token 2 = -e1 (cos -1), scaled
    t0 = torch.tensor([1.0, 0.0])
    t1 = torch.tensor([0.5, math.sqrt(3) / 2]) * 3.0
    t2 = torch.tensor([-2.0, 0.0])
    feats = torch.stack([t0, t1, t2])[None]
    keep = torch.tensor([[True, False, False]])
    assert token_coverage(feats, keep).item() == pytest.approx((0.5 + -1.0) / 2, abs=1e-6)
    # keeping token 1 too: token 2's best coverer is now token 1 (cos -0.5)
    keep2 = torch.tensor([[True, True, False]])
    assert token_coverage(feats, keep2).item() == pytest.approx(-0.5, abs=1e-6)
    # batched rows are independent and match the per-sample values; chunking does not matter
    both = token_coverage(torch.cat([feats, feats]), torch.cat([keep, keep2]), chunk=1)
    assert both.tolist() == pytest.approx([-0.25, -0.5], abs=1e-6)


def test_recall_and_coverage_with_kept_shares():
    feats = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) > 0.5
    answer = torch.zeros(3, 10, dtype=torch.bool)
    answer[:, 2:6] = True
    # a 0/1 share is the keep mask: the same recall, and the same coverage given the kept tokens
    assert torch.equal(evidence_recall(keep.float(), answer), evidence_recall(keep, answer))
    kept = [feats[b, keep[b]] for b in range(3)]
    merged = torch.cat([token_coverage(feats[b:b + 1], keep[b:b + 1].float(), kept=kept[b][None]) for b in range(3)])
    assert torch.allclose(merged, token_coverage(feats, keep), atol=1e-6)
    # a box of 4 tokens holding 1/4 of a kept token each: recall 1/4
    assert evidence_recall(torch.full((1, 10), 0.25), answer[:1]).tolist() == [0.25]
    # two tokens, e1 and e2, merged into one kept token (e1 + e2) / 2: each half kept, half dropped,
    # each covered at cos 45 degrees
    pair = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    cov = token_coverage(pair, torch.tensor([[0.5, 0.5]]), kept=pair.mean(dim=1, keepdim=True))
    assert cov.item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_coverage_nothing_kept_is_nan():
    feats = torch.randn(1, 3, 4)
    assert math.isnan(token_coverage(feats, torch.zeros(1, 3, dtype=torch.bool)).item())


# ---------------------------------------------------------------- PSNR


def test_psnr_known_mse():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    assert psnr(pred, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-6)
    assert psnr(pred * 255, target * 255, max_value=255.0).tolist() == pytest.approx([20.0, 40.0], abs=1e-6)
    assert math.isinf(psnr(target, target)[0].item())  # identical -> +inf, documented


# ---------------------------------------------------------------- FLOPs (Sec. 5.3)

NEXT = dict(d=4096, m=11008, layers=32)


def test_llm_flops_llava_next():
    assert llm_flops(2880, **NEXT) / 1e12 == pytest.approx(20.8, abs=0.1)  # gated, 3 matrices
    assert llm_flops(2880, **NEXT, ffn_matrices=2) / 1e12 == pytest.approx(16.7, abs=0.1)  # as printed
    # Table 1 headers: ~21 / ~10 / ~8 / ~4 / ~2 / ~1 TFLOPs
    for n, approx in [(2880, 21), (1440, 10), (1152, 8), (640, 4), (320, 2), (160, 1)]:
        assert llm_flops(n, **NEXT) / 1e12 == pytest.approx(approx, rel=0.1, abs=0.3), n
    d, m = 4096, 11008
    assert llm_flops(10, d, m, 1) == 4 * 10 * d * d + 2 * 100 * d + 3 * 10 * d * m


def test_sampler_flops_is_per_crop():
    d, m, nc = 4096, 11008, 576
    per_crop = (4 * nc * d**2 + 2 * nc**2 * d + 3 * nc * d * m) * 4
    assert sampler_flops(2880, nc, d, m, 4) == pytest.approx(5 * per_crop, rel=1e-12)
    per_crop2 = (4 * nc * d**2 + 2 * nc**2 * d + 2 * nc * d * m) * 4
    assert sampler_flops(2880, nc, d, m, 4, ffn_matrices=2) == pytest.approx(5 * per_crop2, rel=1e-12)


def test_flops_report():
    r = flops_report("llava_next", 0.5, sampler_d=4096, sampler_m=11008, sampler_ffn_matrices=3)  # LLM width
    assert r["kept_tokens"] == 1440
    assert r["llm_tflops_full"] == pytest.approx(llm_flops(2880, **NEXT) / 1e12)
    assert r["llm_tflops_kept"] == pytest.approx(llm_flops(1440, **NEXT) / 1e12)
    assert r["sampler_tflops"] == pytest.approx(sampler_flops(2880, 576, 4096, 11008, 4) / 1e12)
    assert r["total_tflops"] == pytest.approx(r["llm_tflops_kept"] + r["sampler_tflops"])
    assert r["prefill_reduction"] == pytest.approx(1 - r["total_tflops"] / r["llm_tflops_full"])
    g = GEOMETRIES["llava_next"]
    narrow = flops_report(g, 0.5, sampler_d=g.vision_d, sampler_m=g.vision_m, sampler_ffn_matrices=2)
    assert narrow["total_tflops"] == pytest.approx(10.0, abs=0.1)  # the paper's "~21 -> ~10"
    assert flops_report(g, 0.5) == narrow  # the default: the vision-width reading, as make eval prints
    none = flops_report("llava15", 1.0, sampler_layers=0)
    assert none["sampler_tflops"] == 0.0 and none["prefill_reduction"] == pytest.approx(0.0)
    assert none["kept_tokens"] == 576


# ---------------------------------------------------------------- mean_ci / accumulator


def test_t_quantile_table_values():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-4)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7))


def test_mean_ci_hand_computed():
    mean, half, n = mean_ci([1, 2, 3, 4, 5])
    std = math.sqrt(2.5)
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.776 * std / math.sqrt(5), rel=1e-3)
    assert mean_ci(torch.tensor([1.0, 2, 3, 4, 5]))[1] == pytest.approx(half)
    m1, h1, n1 = mean_ci([7.0])
    assert m1 == 7.0 and math.isnan(h1) and n1 == 1
    m0, h0, n0 = mean_ci([])
    assert math.isnan(m0) and math.isnan(h0) and n0 == 0


def test_accumulator():
    acc = MetricAccumulator()
    acc.add("psnr", torch.tensor([1.0, 2.0]))
    acc.add("recall", torch.empty(0))
    acc.add("psnr", torch.tensor([[3.0], [4.0], [5.0]]))
    s = acc.summary()
    assert list(s) == ["psnr", "recall"]
    assert s["psnr"] == pytest.approx(mean_ci([1, 2, 3, 4, 5]))
    assert s["recall"][2] == 0


# ---------------------------------------------------------------- reports


def _rows():
    rows = []
    for sel, base in [("random", 0.3), ("gumbel_ae", 0.6)]:
        for ratio, k in [(0.25, 16), (0.5, 32)]:
            rows.append({
                "selector": sel, "budget": f"{int(ratio * 100)}%", "keep_ratio": ratio, "k": k,
                "coverage": (base + ratio / 10, 0.0123, 40),
                "evidence_recall": (math.nan, math.nan, 0),
                "llm_tflops": flops_report("llava_next", ratio)["llm_tflops_kept"],
            })
    return rows


def test_write_table(tmp_path):
    csv_path, md_path = write_table(_rows(), tmp_path / "out", "eval")
    assert csv_path.exists() and md_path.exists()
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    assert {"selector", "budget", "keep_ratio", "k", "coverage_mean", "coverage_ci", "coverage_n",
            "evidence_recall_mean", "evidence_recall_n", "llm_tflops"} <= set(table[0])
    assert float(table[3]["coverage_mean"]) == pytest.approx(0.65)
    assert table[0]["evidence_recall_mean"] == "" and table[0]["evidence_recall_n"] == "0"
    md = md_path.read_text()
    assert "95 %" in md and "coverage n=40" in md and "evidence_recall n=0" in md
    assert "0.625 ± 0.012" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| gumbel_ae")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert cells[header.index("evidence_recall")] == "n/a"  # never 0 for missing
    expected = flops_report("llava_next", 0.25)["llm_tflops_kept"]  # 720 tokens
    assert cells[header.index("llm_tflops")] == f"{expected:.3f}"


def test_plot_metrics(tmp_path):
    paths = plot_metrics(_rows(), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["coverage.png", "evidence_recall.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = plot_metrics(_rows(), tmp_path / "plots2")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]  # deterministic


def test_plot_metrics_draws_one_bar_per_selector_when_each_has_one_budget(tmp_path, monkeypatch):
    from tokensel.experiments import report

    rows = [{"selector": s, "budget": b, "keep_ratio": r, "cider": (m, 0.05, 20)}
            for s, b, r, m in [("full", "all", 1.0, 0.3), ("random", "0.25", 0.25, 0.1), ("divprune", "0.25", 0.25, 0.2)]]
    drawn = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: (drawn.append(fig.axes[0]), save(fig, path))[1])
    report.plot_metrics(rows, tmp_path)
    bars = [p.get_height() for p in drawn[0].patches]
    assert bars == pytest.approx([0.3, 0.1, 0.2])
    assert [t.get_text().split("\n")[0] for t in drawn[0].get_xticklabels()] == ["full", "random", "divprune"]
    report.plot_metrics(rows + [{**rows[1], "budget": "0.5", "keep_ratio": 0.5}], tmp_path / "two")
    assert not drawn[1].patches and len(drawn[1].lines) > 0  # two budgets: lines against keep ratio
