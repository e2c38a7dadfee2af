"""The ablation report of a sweep (``report: ablation``, ``experiments/sweep.py``): from the runs'
``status.json`` records, ``runs.csv`` (every run x budget), ``results.csv``/``results.md`` (one
row per grid point x budget, mean ± std over seeds) and one PNG per swept axis.

``sweep`` below is a ``sweep.Sweep``; the labels here also name the sweep's run folders.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from tokensel.common.stats import aggregate, t_quantile
from tokensel.experiments.report import failed_runs_section, markdown_table, new_figure, save_figure, write_table
from tokensel.experiments.sweep_runner import EVAL_METRICS

# Where a metric lives; a CI drawn beyond it is clipped (None: unbounded on that side).
METRIC_RANGES = {"recall": (0.0, 1.0), "coverage": (0.0, 1.0), "psnr": (0.0, None), "val/keep_ratio": (0.0, 1.0),
                 "val/keep_prob": (0.0, 1.0)}


def ci_error_bars(metric: str, mean: float, std: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """``(below, above)`` error-bar lengths of the ``confidence`` CI of a mean over ``n`` seeds
    (Student's t on the seeds' std), clipped to the metric's range (:data:`METRIC_RANGES`); 0 for
    a single seed."""
    if n < 2 or math.isnan(std):
        return 0.0, 0.0
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    low, high = METRIC_RANGES.get(metric, (None, None))
    lower = mean - half if low is None else max(low, mean - half)
    upper = mean + half if high is None else min(high, mean + half)
    return mean - lower, upper - mean


def short_keys(keys: list[str]) -> dict[str, str]:
    """Swept keys as run and plot names show them: each key's last part (``selector.depth`` ->
    ``depth``) unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def label(value: Any) -> str:
    """A value (or key) as a file-name-safe label: ``0.001`` -> ``0.001``, ``[1, 2]`` -> ``1-2``."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "x"


def run_rows(records: list[dict], val_metrics: Optional[list[str]]) -> list[dict]:
    """One flat row per finished run x budget: axis values, seed, eval metrics, val scalars, wall time."""
    rows = []
    for rec in records:
        vals = {k: v for k, v in rec["metrics"].items() if k.startswith("val/") and k != "val/samples"
                and (val_metrics is None or k in val_metrics)}
        for budget, scores in (rec["eval"] or {"-": {}}).items():
            rows.append({**rec["axes"], "seed": rec["seed"], "budget": budget,
                         **{m: scores.get(m, math.nan) for m in EVAL_METRICS}, **vals,
                         "train_s": rec["train_s"], "eval_s": rec.get("eval_s", 0.0)})
    return rows


def plot_axes(sweep, agg_rows: list[dict], random_reference: Optional[dict] = None, dpi: int = 100) -> list[Path]:
    """Per swept axis: each metric against the axis value, one line per budget, the mean and its
    95 % CI over seeds (clipped to the metric's range), and random selection's value at the same
    budget as a dashed line of the same colour (``random_reference[(budget, metric)]``). With several
    axes, one PNG per combination of the other axes' values."""
    random_reference = random_reference or {}
    metrics = [m for m in (*EVAL_METRICS, *sorted({c for r in agg_rows for c in r if c.startswith("val/")}))
               if any(r.get(m, (math.nan, 0, 0))[2] for r in agg_rows)]
    paths = []
    keys = list(sweep.axes)
    for axis in keys:
        others = [k for k in keys if k != axis]
        for combo in itertools.product(*(sweep.axes[k] for k in others)):
            fixed = dict(zip(others, combo))
            rows = [r for r in agg_rows if all(r.get(k) == v for k, v in fixed.items())]
            values = sweep.axes[axis]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            xs_of = {json.dumps(v): (v if numeric else i) for i, v in enumerate(values)}
            ncols = min(4, max(1, len(metrics)))
            nrows = math.ceil(max(1, len(metrics)) / ncols)
            fig, panels = new_figure(nrows, ncols, width=4.2, height=3.3, dpi=dpi)
            for ax in panels.flat[len(metrics):]:
                ax.axis("off")
            budgets = list(dict.fromkeys(r["budget"] for r in rows))
            for ax, metric in zip(panels.flat, metrics):
                # training's val/* scalars do not depend on the eval budget: one line
                for budget in (budgets if metric in EVAL_METRICS else budgets[:1]):
                    pts = sorted((xs_of[json.dumps(r[axis])], *r[metric][:3]) for r in rows
                                 if r["budget"] == budget and r.get(metric, (0, 0, 0))[2])
                    if not pts:
                        continue
                    x, mean, std, n = zip(*pts)
                    bars = [ci_error_bars(metric, m, sd, k) for m, sd, k in zip(mean, std, n)]
                    legend = f"budget {budget}" if metric in EVAL_METRICS and budget != "-" else None
                    line = ax.errorbar(x, mean, yerr=list(zip(*bars)), marker="o", capsize=3, label=legend,
                                       color=None if legend else "k")
                    reference = random_reference.get((budget, metric))
                    if reference is not None and not math.isnan(reference):
                        ax.axhline(reference, linestyle="--", linewidth=1, color=line.lines[0].get_color(),
                                   label=f"random, budget {budget}")
                ax.set_title(metric, fontsize=10)
                ax.set_xlabel(axis)
                if not numeric or all(isinstance(v, int) for v in values):
                    ax.set_xticks([xs_of[json.dumps(v)] for v in values], [str(v) for v in values])
                ax.grid(alpha=0.3)
            if metrics and panels[0][0].get_legend_handles_labels()[1]:
                panels[0][0].legend(fontsize=7)
            where = ", ".join(f"{k}={v}" for k, v in fixed.items())
            fig.suptitle(f"sweep {sweep.name}: {axis}" + (f" ({where})" if where else "")
                         + f" — mean and 95 % CI over seeds {sweep.seeds}; dashed: random selection", fontsize=10)
            suffix = "".join(f"__{short_keys(others)[k]}={label(v)}" for k, v in fixed.items())
            paths.append(save_figure(fig, sweep.folder / f"{label(axis)}{suffix}.png"))
    return paths


def random_reference(records: list[dict]) -> dict:
    """``{(budget, metric): mean}`` of random selection over the runs' evals (the same held-out
    samples and seed in every run, so one value per budget)."""
    values: dict[tuple, list[float]] = {}
    for rec in records:
        for budget, scores in (rec.get("eval_random") or {}).items():
            for metric, value in scores.items():
                if not math.isnan(value):
                    values.setdefault((budget, metric), []).append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def report_ablation(sweep, records: list[dict], failed: list[dict]) -> list[Path]:
    """Write the report (see the module docstring); returns its paths, ``results.md`` first."""
    keys = list(sweep.axes)
    rows = run_rows(records, sweep.val_metrics)
    all_rows = rows + [{**f["axes"], "seed": f["seed"], "status": "failed", "error": f.get("error", "")}
                       for f in failed]
    runs_csv = sweep.folder / "runs.csv"
    cols = list(dict.fromkeys(c for r in all_rows for c in r))
    with open(runs_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(all_rows)
    agg = aggregate(rows, keys + ["budget"], exclude=("seed", "eval_s"))
    plots = plot_axes(sweep, agg, random_reference(records))
    empty = [c for c in (agg[0] if agg else {}) if all(isinstance(r.get(c), tuple) and not r[c][2] for r in agg)]
    for row in agg:  # readable cells: axis values as text; no column that no run could fill
        row.update({k: (row[k] if isinstance(row[k], str) else json.dumps(row[k])) for k in keys})
        for c in empty:
            row.pop(c)
    csv_path, _ = write_table(agg, sweep.folder, "results", spread="std", key_columns=keys + ["budget"],
                              markdown=False)
    md_path = sweep.folder / "results.md"
    md_path.write_text(markdown_table(agg, title=f"sweep {sweep.name}: {sweep.selector}, seeds {sweep.seeds}",
                                      spread="std", key_columns=keys + ["budget"])
                       + "".join(line + "\n" for line in failed_runs_section(failed)))
    return [md_path, csv_path, runs_csv, *plots]
