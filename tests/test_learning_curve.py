"""Learning curves: the callback in a real training run, and `make curve` with its steps-to-beat table."""

import json
import subprocess

import pytest

from conftest import FAST_ARGS, REPO, read_scalars
from tokensel.callbacks.learning_curve import log_spaced_steps
from tokensel.experiments.curve_report import first_step, run_summary, still_moving


def test_log_spaced_steps_start_at_zero_and_end_at_the_last_step():
    steps = log_spaced_steps(800, 12)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 800 and steps == sorted(set(steps))
    assert len(steps) <= 13 and log_spaced_steps(0, 5) == [0]


def record(step, mean, half):
    return {"step": step, "metrics": {"recall@0.2_vs_random": [mean, half, 30],
                                      "objective@0.2_vs_random": [-mean, half, 30]}}


def test_steps_to_beat_is_the_first_step_whose_paired_ci_clears_zero_on_the_better_side():
    records = [record(0, -0.1, 0.05), record(10, 0.04, 0.05), record(20, 0.08, 0.05), record(40, 0.02, 0.05)]
    assert first_step(records, "recall@0.2_vs_random", higher_is_better=True) == "20"
    assert first_step(records, "objective@0.2_vs_random", higher_is_better=False) == "20"  # a loss: below zero
    assert first_step(records[:2], "recall@0.2_vs_random", True) == "not within 10 steps"
    assert first_step(records, "auroc_vs_chance", True) == "n/a"
    assert still_moving([(10, 0.5, 0.01, 3), (20, 0.6, 0.02, 3)]) == "yes"
    assert still_moving([(10, 0.5, 0.01, 3), (20, 0.51, 0.02, 3)]) == "no"


def test_the_end_of_run_summary_gives_the_last_values_and_the_first_step_that_beat_each_reference():
    def measured(step, recall_gain, loss_gain):
        return {"step": step, "samples": 30, "metrics": {
            "recall@0.2": [0.3 + recall_gain, 0.05, 30], "recall@0.2/random": [0.3, 0.04, 30],
            "recall@0.2/divprune": [0.5, 0.05, 30], "recall@0.2_vs_random": [recall_gain, 0.05, 30],
            "recall@0.2_vs_divprune": [recall_gain - 0.2, 0.05, 30],
            "objective@0.2": [1.0 + loss_gain, 0.1, 30], "objective@0.2_vs_random": [loss_gain, 0.05, 30],
            "auroc": [float("nan"), float("nan"), 0]}}
    lines = run_summary([measured(0, 0.0, 0.0), measured(10, 0.1, -0.1), measured(20, 0.03, -0.2)])
    text = "\n".join(lines)
    assert lines[0].startswith("learning curve at step 20")
    assert "recall@0.2 0.330 (random 0.300, divprune 0.500):" in text
    assert "vs random +0.030 ± 0.050 (first better at step 10)" in text  # beat at 10, level again at 20
    assert "vs divprune -0.170 ± 0.050 (not better within 20 steps)" in text
    assert "objective loss@0.2 0.800:" in text and "vs random -0.200 ± 0.050 (first better at step 10)" in text
    assert "auroc" not in text  # not measured: no line
    assert run_summary([]) == []


@pytest.mark.slow
def test_the_callback_logs_the_selector_against_flat_baseline_lines(tiny_corpus, tmp_path):
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_epochs=-1",
                        "trainer.max_steps=6", "run.curve_steps=3", "run.curve_samples=12", "selector.budget=0.25",
                        "run.curve_random_draws=2"]
    result = subprocess.run(["make", "--no-print-directory", "train", "SELECTOR=gumbel_ae", f"ARGS={' '.join(args)}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "learning curve at step 6" in result.stdout and "vs divprune" in result.stdout  # the end-of-run summary
    run_dir = tmp_path / "gumbel_ae" / "version_0"
    records = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == log_spaced_steps(6, 3)
    first = records[0]
    assert first["samples"] == 12
    for metric in ("recall@0.25", "auroc", "objective@0.25", "recall@0.25_vs_random", "recall@0.25_vs_divprune",
                   "objective@0.25_vs_random", "auroc_vs_chance", "auroc/divprune", "recall@0.25/uniform"):
        mean, half, n = first["metrics"][metric]
        assert n > 0 and mean == mean, metric
    scalars = read_scalars(run_dir)
    reference = [v for _, v in scalars["curve/recall@0.25/divprune"]]
    assert len(reference) == len(records) and len(set(reference)) == 1  # measured once: a flat line
    assert len(scalars["curve/recall@0.25/selector"]) == len(records)
    assert "curve/objective@0.25_vs_random/ci_low" in scalars
    assert b"custom_scalars" in b"".join(p.read_bytes() for p in run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_make_curve_writes_its_figure_and_the_steps_to_beat_table(tiny_corpus, tmp_path):
    args = [a for a in FAST_ARGS if not a.startswith("run.panels")] + [
        f"--out {tmp_path}", f"data.root={tiny_corpus}", "trainer.max_steps=4", "run.curve_steps=2",
        "run.curve_samples=12", "run.curve_random_draws=2"]
    result = subprocess.run(["make", "--no-print-directory", "curve", "SELECTOR=gumbel_ae", "SEEDS=0,1",
                             f"ARGS={' '.join(args)}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "curve_gumbel_ae"
    assert (folder / "curve.png").stat().st_size > 5000
    table = (folder / "steps_to_beat.md").read_text()
    assert "seed 0" in table and "seed 1" in table and "still moving at the end" in table
    # four steps of a random-init selector do not beat DivPrune's recall: the table says so
    assert "not within 4 steps" in table
    assert "recall@0.222" in table and "objective loss@0.222" in table
