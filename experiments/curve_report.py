"""Learning curves over seeds: ``make curve SELECTOR=<name> SEEDS=0,1,2 [ARGS=...]``.

``make curve`` is the sweep ``experiments/sweeps/curve.yaml`` (``report: curve``) run for one
selector: each seed trains with ``run.curve_steps`` log-spaced measurements of the learning-curve
callback (``callbacks/learning_curve.py``), which appends them to the run's ``curve.jsonl``.
This module reads those files and writes:

- ``curve.png``: one panel per metric (evidence AUROC; recall and the objective's own loss vs
  random at each budget) against the optimiser step, the mean over seeds with a 95 % CI band over
  seeds (Student t; none for one seed), and the baselines' lines (dashed; flat where they do not
  depend on training). The x-axis is symmetric-log, so step 0 (before training) is on it;
- ``steps_to_beat.md`` / ``.csv``: per seed, metric and reference (random; DivPrune), the first
  measured step at which the selector is better with 95 % confidence, i.e. the paired CI over
  held-out samples lies entirely on the better side of zero (above it for recall and AUROC, below
  it for a loss), or ``not within N steps``. A last column says whether the curve was still moving
  at the end: the mean over seeds changed between the last two measurements by more than the last
  measurement's CI over seeds (or, with one seed, its CI over samples).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tokensel.callbacks.learning_curve import CURVE_FILE
from tokensel.common.stats import mean_ci
from tokensel.experiments.report import failed_runs_section, markdown_table, new_figure, save_figure, write_table


def read_curve(path: Path) -> list[dict]:
    """The records of one ``curve.jsonl``, by step (a resumed run's repeated step keeps the last)."""
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def measured(value) -> bool:
    """Does a ``curve.jsonl`` value ``[mean, half, n]`` hold a measurement (n > 0)?"""
    return bool(value) and value[0] is not None and bool(value[2])


def series(records: list[dict], metric: str) -> list[tuple[int, float, float]]:
    """``(step, mean, CI half-width over samples)`` of one metric, where it was measured."""
    out = []
    for r in records:
        value = r["metrics"].get(metric)
        if measured(value):
            out.append((r["step"], float(value[0]), float(value[1]) if value[1] is not None else math.nan))
    return out


def budgets_of(records: list[dict]) -> list[str]:
    names = {m for r in records for m in r["metrics"]}
    return sorted({m.split("@")[1].split("_")[0].split("/")[0] for m in names if m.startswith("recall@")}, key=float)


def beats(value: tuple, higher_is_better: bool) -> bool:
    """Is a paired difference ``(mean, half, n)`` on the better side of zero with 95 % confidence?"""
    mean, half = value[0], value[1]
    if mean is None or half is None or not math.isfinite(half):
        return False
    return mean - half > 0 if higher_is_better else mean + half < 0


def comparisons(budgets: list[str]) -> list[tuple[str, str, str, bool]]:
    """``(label, reference, metric name in curve.jsonl, higher is better)`` of the steps-to-beat table."""
    out = [("auroc", "random", "auroc_vs_chance", True), ("auroc", "divprune", "auroc_vs_divprune", True)]
    for b in budgets:
        for ref in ("random", "divprune"):
            out.append((f"recall@{b}", ref, f"recall@{b}_vs_{ref}", True))
        for ref in ("random", "divprune"):
            out.append((f"objective loss@{b}", ref, f"objective@{b}_vs_{ref}", False))
    return out


def first_step(records: list[dict], metric: str, higher_is_better: bool) -> str:
    steps = [r for r in records if measured(r["metrics"].get(metric))]
    if not steps:
        return "n/a"
    for r in steps:
        if beats(r["metrics"][metric], higher_is_better):
            return str(r["step"])
    return f"not within {steps[-1]['step']} steps"


def run_summary(records: list[dict]) -> list[str]:
    """What ``make train`` prints at the end of a run: per metric, the selector's last measured value,
    its paired differences from the references of :func:`comparisons` (chance for the AUROC) and
    the first step that beat each with 95 % confidence (:func:`first_step`)."""
    if not records:
        return []
    last = records[-1]
    metrics = last["metrics"]
    groups: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for label, _, name, higher in comparisons(budgets_of(records)):
        groups.setdefault((label, name.split("_vs_")[0]), []).append((name, higher))
    lines = [f"learning curve at step {last['step']} (held-out, paired 95 % CI; every measurement in {CURVE_FILE}):"]
    for (label, base), diffs in groups.items():
        if not measured(metrics.get(base)):
            continue
        refs = ", ".join(f"{ref} {metrics[f'{base}/{ref}'][0]:.3f}" for ref in ("random", "divprune")
                         if measured(metrics.get(f"{base}/{ref}")))
        lines.append(f"  {label} {metrics[base][0]:.3f}" + (f" ({refs})" if refs else "") + ":")
        for name, higher in diffs:
            if measured(metrics.get(name)):
                mean, half = metrics[name][:2]
                beat = first_step(records, name, higher)
                when = f"first better at step {beat}" if beat.isdigit() else beat.replace("not within", "not better within")
                lines.append(f"    vs {name.split('_vs_')[1]} {mean:+.3f} ± {half:.3f} ({when})")
    return lines


def seed_band(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width over seeds (nan half-width for one seed)."""
    mean, half, _ = mean_ci(values)
    return mean, half


def curve_over_seeds(curves: dict[int, list[dict]], metric: str) -> list[tuple[int, float, float, int]]:
    """``(step, mean over seeds, CI half-width over seeds, seeds)`` at each step measured in every seed
    (one seed: the CI over samples)."""
    per_seed = {seed: {s: (m, h) for s, m, h in series(records, metric)} for seed, records in curves.items()}
    steps = sorted(set.intersection(*(set(v) for v in per_seed.values()))) if per_seed else []
    out = []
    for step in steps:
        values = [per_seed[seed][step][0] for seed in per_seed]
        mean, half = seed_band(values)
        if len(values) == 1:
            half = per_seed[next(iter(per_seed))][step][1]
        out.append((step, mean, half, len(values)))
    return out


def still_moving(points: list[tuple[int, float, float, int]]) -> str:
    if len(points) < 2:
        return "n/a"
    (_, previous, _, _), (_, last, half, _) = points[-2], points[-1]
    if not math.isfinite(half):
        return "n/a"
    return "yes" if abs(last - previous) > half else "no"


def budget_words(budget: str) -> str:
    """``"0.222"`` -> ``22.2 % kept``; ``"64"`` -> ``64 tokens kept``."""
    return f"{float(budget):.1%} kept" if "." in budget else f"{budget} tokens kept"


REFERENCE_COLORS = {"random": "C1", "uniform": "C2", "l2norm": "C3", "divprune": "C4", "cls_attention": "C5"}


def plot_curves(curves: dict[int, list[dict]], budgets: list[str], selector: str, path: Path, dpi: int = 110) -> Path:
    panels = [("auroc", "evidence AUROC (0.5 = chance)", [("auroc/" + b, b) for b in
                                                          ("random", "l2norm", "divprune", "cls_attention")], 0.5)]
    for b in budgets:
        panels.append((f"recall@{b}", f"answer-evidence recall, {budget_words(b)}",
                       [(f"recall@{b}/{n}", n) for n in ("random", "uniform", "l2norm", "divprune", "cls_attention")],
                       None))
        panels.append((f"objective@{b}_vs_random", f"own objective loss vs random, {budget_words(b)} (lower = better)",
                       [("divprune-random", "divprune")], 0.0))
    fig, axes = new_figure(1, len(panels), width=4.6, height=3.6, dpi=dpi)
    for ax, (metric, title, references, zero) in zip(axes[0], panels):
        points = curve_over_seeds(curves, metric)
        if points:
            steps, means, halves, n = zip(*points)
            steps = np.array(steps, dtype=float)
            means, halves = np.array(means), np.nan_to_num(np.array(halves), nan=0.0)
            ax.plot(steps, means, color="C0", lw=1.8, marker="o", ms=3, label=f"{selector} ({n[0]} seeds)")
            low, high = (0.0, 1.0) if not metric.startswith("objective") else (-np.inf, np.inf)  # AUROC, recall
            ax.fill_between(steps, np.clip(means - halves, low, high), np.clip(means + halves, low, high),
                            color="C0", alpha=0.2, lw=0)
            if len(curves) > 1:  # each seed thin: a band over 3 seeds hides where each one went
                for i, records in enumerate(curves.values()):
                    own = series(records, metric)
                    if own:
                        ax.plot([p[0] for p in own], [p[1] for p in own], color="C0", lw=0.7, alpha=0.45,
                                label="each seed" if i == 0 else None)
        for ref, label in references:
            ref_points = reference_curve(curves, metric, ref)
            if ref_points:
                xs, ys = zip(*ref_points)
                ax.plot(xs, ys, color=REFERENCE_COLORS[label], lw=1.1, ls="--", label=label)
        if zero is not None:
            ax.axhline(zero, color="grey", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)  # steps are never negative; flat reference lines would otherwise widen the axis
        ax.set(title=title, xlabel="optimiser step")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{selector}: held-out learning curves, mean and 95 % CI band over seeds", fontsize=10)
    return save_figure(fig, path)


def reference_curve(curves: dict[int, list[dict]], metric: str, ref: str) -> list[tuple[float, float]]:
    """A baseline's line: its logged mean (flat for recall and AUROC), or, for the objective panel,
    DivPrune's loss minus random's (which moves as the objective trains); averaged over seeds."""
    if ref == "divprune-random":
        budget = metric.split("@")[1].split("_")[0]
        a = curve_over_seeds(curves, f"objective@{budget}/divprune")
        b = {s: m for s, m, _, _ in curve_over_seeds(curves, f"objective@{budget}/random")}
        return [(s, m - b[s]) for s, m, _, _ in a if s in b]
    return [(s, m) for s, m, _, _ in curve_over_seeds(curves, ref)]


def report_curve(sweep, records: list[dict], failed: list[dict]) -> list[Path]:
    """The figure and the steps-to-beat table (see the module docstring); table path first."""
    curves_by_point: dict[str, dict[int, list[dict]]] = {}
    for rec in records:
        point = "_".join(f"{k}={v}" for k, v in rec["axes"].items()) or sweep.selector
        run_dir = sweep.folder / "runs" / rec["run_id"] / "train"
        curves_by_point.setdefault(point, {})[rec["seed"]] = read_curve(run_dir / CURVE_FILE)
    rows, outputs = [], []
    for point, curves in curves_by_point.items():
        budgets = budgets_of(next(iter(curves.values())))
        for label, ref, metric, higher in comparisons(budgets):
            row = {"point": point, "metric": label, "beats": ref}
            for seed, records_of_seed in sorted(curves.items()):
                row[f"seed {seed}"] = first_step(records_of_seed, metric, higher)
            row["still moving at the end"] = still_moving(curve_over_seeds(curves, metric))
            rows.append(row)
        name = "curve.png" if len(curves_by_point) == 1 else f"curve_{point}.png"
        outputs.append(plot_curves(curves, budgets, sweep.selector, sweep.folder / name))
    keys = ("point", "metric", "beats")
    csv_path, _ = write_table(rows, sweep.folder, "steps_to_beat", key_columns=keys, markdown=False)
    lines = [f"# Learning curves: {sweep.selector}, {len(records)} runs, seeds {sweep.seeds}", "",
             "Steps to beat: the first measured step at which the paired 95 % CI over held-out samples lies on the "
             "better side of zero (AUROC vs random: vs chance, 0.5).", "",
             markdown_table(rows, key_columns=keys, legend=False).rstrip("\n"), *failed_runs_section(failed)]
    md_path = sweep.folder / "steps_to_beat.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, *outputs, csv_path]
