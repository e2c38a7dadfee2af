"""make eval-vlm end to end on a tiny random LLaVA: every selector in the same model, the table's
columns, a partial run marked as such, and one-line errors."""

import csv
import json

import pytest

from conftest import run_module


@pytest.mark.slow
def test_eval_vlm_compares_selectors_in_one_llava(tiny_llava, tiny_corpus, tmp_path):
    out = tmp_path / "eval_vlm"
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_llava), "--budgets", "4,0.5",
                        "--limit", "10", "--out", str(out), f"data.root={tiny_corpus}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["selector"], r["budget"]) for r in rows] == [
        ("full", "all"), ("random", "4"), ("random", "0.5"), ("divprune", "4"), ("divprune", "0.5")]
    assert [float(r["k"]) for r in rows] == [16, 4, 8, 4, 8]
    for r in rows:
        assert int(r["samples"]) == 10
        assert all(int(r[f"{m}_n"]) > 0 for m in ("docvqa_anls", "chartqa_relaxed", "coco_cider"))
        assert float(r["prefill_ms"]) > 0 and float(r["tflops_2ndm"]) < float(r["tflops_3ndm"])
    assert int(rows[3]["coco_cider_vs_random_n"]) > 0  # divprune at 4, paired with random at 4
    assert rows[0]["coco_cider_vs_random_n"] in ("", "0") and rows[1]["coco_cider_vs_random_n"] in ("", "0")
    assert float(rows[1]["tflops_2ndm"]) < float(rows[0]["tflops_2ndm"])  # 4 tokens cost less than 16
    assert "PARTIAL" in (out / "results.md").read_text()
    assert list(out.glob("*.png"))
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 50 and {a["selector"] for a in answers} == {"full", "random", "divprune"}
    assert all(isinstance(a["answer"], str) and a["answers"] and a["key"] for a in answers)


@pytest.mark.slow
def test_eval_vlm_runs_llava_next_with_the_papers_keep_ratios(tiny_llava_next, tiny_corpus, tmp_path):
    from tokensel.experiments.eval_vlm import NEXT_KEEP_RATIOS

    out = tmp_path / "eval_vlm_next"
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_llava_next), "--selectors",
                        "full,uniform", "--view-selection", "across", "--limit", "6", "--out", str(out),
                        f"data.root={tiny_corpus}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["budget"] for r in rows] == ["all"] + [str(b) for b in NEXT_KEEP_RATIOS]
    ratios = [float(r["keep_ratio"]) for r in rows[1:]]
    assert ratios == pytest.approx(list(NEXT_KEEP_RATIOS), abs=0.02)  # of each image's V x N tokens
    ks = [float(r["k"]) for r in rows[1:]]
    assert ks == sorted(ks) and float(rows[0]["k"]) > ks[-1]


def test_paired_difference_from_random_is_per_sample_at_the_same_budget():
    from tokensel.experiments.eval_vlm import paired_against

    rows = [{"selector": "full", "budget": "all"}, {"selector": "random", "budget": "0.25"},
            {"selector": "divprune", "budget": "0.25"}, {"selector": "divprune", "budget": "0.5"}]
    # divprune beats random by exactly 0.1 on every sample: the samples' own spread cancels
    per_sample = [{"cider": [0.9, 0.5, 0.1]}, {"cider": [0.8, 0.2, 0.0]}, {"cider": [0.9, 0.3, 0.1]},
                  {"cider": [0.9, 0.9, 0.9]}]
    out = paired_against(rows, per_sample, "random")
    mean, half, n = out[2]["cider_vs_random"]
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-12) and n == 3
    assert "cider_vs_random" not in out[0] and "cider_vs_random" not in out[1]  # no random at "all"; itself
    assert "cider_vs_random" not in out[3]  # no random row at budget 0.5


def test_retained_share_and_speed_up_are_relative_to_the_full_token_row():
    from tokensel.experiments.eval_vlm import relative_to_full

    rows = relative_to_full([{"average": 0.5, "prefill_ms": 40.0}, {"average": 0.4, "prefill_ms": 10.0}])
    assert [r["retained_pct"] for r in rows] == pytest.approx([100.0, 80.0])
    assert [r["prefill_speedup"] for r in rows] == pytest.approx([1.0, 4.0])
    zero = relative_to_full([{"average": 0.0, "prefill_ms": 1.0}, {"average": 0.0, "prefill_ms": 1.0}])
    assert all(r["retained_pct"] != r["retained_pct"] for r in zero)  # nan: no share of nothing


@pytest.mark.parametrize("args, words", [
    (["--selectors", "full,tome"], ["--selectors", "tome", "divprune"]),
    (["--budgets", "0"], ["'0'"]),
    (["data.rooot=x"], ["data.rooot"]),
])
def test_eval_vlm_mistakes_are_one_line(tiny_llava, tiny_corpus, args, words):
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_llava), *args,
                        f"data.root={tiny_corpus}", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), result.stderr


def test_a_bad_argument_fails_before_anything_heavy_is_built(tmp_path):
    """No --model: make vlm's LLaVA would be built first (minutes); every argument is checked before."""
    result = run_module("tokensel.experiments.eval_vlm", "--budgets", "0", f"data.root={tmp_path / 'none'}",
                        timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'0'" in errors[0], result.stderr
    assert "make vlm" not in result.stdout + result.stderr and not (tmp_path / "none").exists()


@pytest.mark.parametrize("args, words", [
    (["--positions", "compact"], ["positions='compact'", "1-D"]),
    (["--image-size", "56"], ["image_size=56", "llava"]),
])
def test_options_a_family_does_not_take_are_one_line(tiny_llava, tiny_corpus, args, words):
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_llava), *args, f"data.root={tiny_corpus}",
                        timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and all(w in errors[0] for w in words), result.stderr


def test_cls_attention_selectors_in_a_family_without_a_cls_token_are_one_line(tiny_qwen2_5_vl, tiny_corpus):
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_qwen2_5_vl), "--selectors",
                        "full,visionzip,cls_attention", f"data.root={tiny_corpus}", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert all(w in errors[0] for w in ("visionzip, cls_attention", "CLS attention", "qwen2_5_vl")), errors


@pytest.mark.slow
def test_eval_vlm_runs_qwen2_5_vl_at_each_images_own_grid(tiny_qwen2_5_vl, tiny_corpus, tmp_path):
    out = tmp_path / "eval_vlm_qwen"
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_qwen2_5_vl), "--selectors",
                        "full,uniform,divprune,cdpruner", "--budgets", "0.5", "--limit", "6", "--out", str(out),
                        f"data.root={tiny_corpus}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["selector"], r["budget"]) for r in rows] == [("full", "all"), ("uniform", "0.5"), ("divprune", "0.5"),
                                                            ("cdpruner", "0.5")]  # query-aware: the VLM's question
    assert float(rows[0]["keep_ratio"]) == 1.0 and float(rows[1]["keep_ratio"]) == pytest.approx(0.5, abs=0.05)
    assert float(rows[1]["k"]) < float(rows[0]["k"]) and all(int(r["samples"]) == 6 for r in rows)


@pytest.mark.slow
def test_vp_noise_trains_against_qwen2_5_vl_and_its_checkpoint_prunes_that_model(tiny_qwen2_5_vl, tiny_corpus,
                                                                                 tmp_path):
    """A few vp_noise steps against the tiny Qwen2.5-VL's NTP loss, on its own merged tokens at one
    fixed resolution (4 x 4 tokens at 112 px), then the checkpoint in that model's generation."""
    from conftest import FAST_ARGS
    from tokensel.selectors.catalog import load_selector

    side = 4 * 28
    args = [a for a in FAST_ARGS if not a.startswith(("selector.", "encoder."))] + [
        "selector.depth=1", "selector.tau_steps=10", "optim.lr=1e-3", "trainer.max_steps=3",
        f"data.root={tiny_corpus}", f"run.root={tmp_path}", f"encoder.name=hf:{tiny_qwen2_5_vl}",
        "encoder.pretrained=", "encoder.layer=-1", "encoder.norm=false", f"encoder.image_size={side}",
        "selector.vlm.backend=hf", f"selector.vlm.model={tiny_qwen2_5_vl}", "selector.vlm.pretrained=",
        f"selector.vlm.image_size={side}"]
    result = run_module("tokensel.experiments.train", "vp_noise", *args, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = tmp_path / "vp_noise" / "version_0" / "checkpoints" / "last.ckpt"
    scorer = load_selector(ckpt)
    assert (scorer.dims.num_tokens, scorer.dims.dim, scorer.dims.grid) == (16, 32, (4, 4))
    from tokensel.common.errors import VLMError
    from tokensel.vlms import open_vlm

    with pytest.raises(VLMError, match=f"set image_size={side}"):  # at each image's own grid: the one it was trained at
        open_vlm(str(tiny_qwen2_5_vl)).check_selector(scorer)
    out = tmp_path / "eval_vlm"
    result = run_module("tokensel.experiments.eval_vlm", "--model", str(tiny_qwen2_5_vl), "--selectors", "full,random",
                        "--budgets", "4", "--limit", "4", "--out", str(out), f"data.root={tiny_corpus}",
                        "--ckpts", str(ckpt), "--image-size", str(side), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["selector"], r["budget"], r["k"]) for r in rows] == [("full", "all", "16"), ("random", "4", "4"),
                                                                   ("vp_noise", "4", "4")]
