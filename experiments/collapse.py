"""The regulariser collapse study of App. B.1–B.3 of *Adaptive Vision Token Selection for
Multi-Modal Inference* (arXiv 2503.16660): ``make collapse``.

    make collapse [SEEDS=0,1,2] [ARGS="trainer.max_steps=600 ..."]

is the sweep ``experiments/sweeps/collapse.yaml``: the auto-encoder objective with
``selector.estimator`` in {gumbel, straight_through} x ``selector.regulariser`` in {maxmin,
plain}, i.e. the four objectives of App. B.1, on identical data, seed, encoder and budget. Every
run writes into one TensorBoard root (``sweeps/collapse/runs``) named after its objective and
seed, so ``train/keep_ratio``, ``train/feat_recon``, ``train/img_recon`` and ``train/reg``
overlay in one view, and each run's ``CollapseDetector`` (``callbacks/collapse.py``) dates the
collapse it sees.

This module writes the report from those runs:

- ``collapse.png``: keep ratio and reconstruction loss (feature + image, Eq. 8's first two
  terms) against step, one colour per objective, one line per seed;
- ``collapse.md``/``collapse.csv``: per run, the final training keep ratio (the mean of the last
  ``FINAL_WINDOW`` logged steps, since the Gumbel sample is noisy), the validation keep ratio
  (noiseless mask), the validation reconstruction losses and the collapse step or ``none``; then
  per objective, mean ± std over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

from tokensel.experiments.report import (failed_runs_section, markdown_table, new_figure, read_scalars, save_figure,
                                         write_table)
from tokensel.common.stats import aggregate
from tokensel.selectors.gumbel_ae import GumbelAEConfig

GUMBEL_KEYS = set(GumbelAEConfig.__dataclass_fields__)

FINAL_WINDOW = 10  # logged steps averaged for the final training keep ratio
CURVES = ("train/keep_ratio", "train/feat_recon", "train/img_recon", "train/reg")


def objective_label(axis_values: dict) -> str:
    """``{"selector.estimator": "gumbel", "selector.regulariser": "plain"}`` -> ``gumbel+plain``."""
    return "+".join(str(v) for v in axis_values.values())


def summary_rows(records: list[dict], curves: dict[str, dict]) -> list[dict]:
    """One row per finished run (see the module docstring)."""
    rows = []
    for rec in records:
        keep = [v for _, v in curves[rec["run_id"]].get("train/keep_ratio", [])][-FINAL_WINDOW:]
        m = rec["metrics"]
        step = rec.get("collapse_step")
        rows.append({
            "objective": objective_label(rec["axes"]),
            "seed": rec["seed"],
            "train_keep_ratio": sum(keep) / len(keep) if keep else math.nan,
            "val_keep_ratio": m.get("val/keep_ratio", math.nan),
            "val_feat_recon": m.get("val/feat_recon", math.nan),
            "val_img_recon": m.get("val/img_recon", math.nan),
            "collapse_step": "none" if step is None else int(step),
            "steps": rec.get("global_step"),
            "train_s": rec["train_s"],
        })
    return rows


def objective_rows(rows: list[dict]) -> list[dict]:
    """Per objective: mean ± std over seeds, and how many seeds collapsed (mean step of those)."""
    numeric = [{k: v for k, v in r.items() if k != "collapse_step"} for r in rows]
    out = aggregate(numeric, ["objective"], exclude=("seed", "steps"))
    for agg in out:
        members = [r for r in rows if r["objective"] == agg["objective"]]
        steps = [r["collapse_step"] for r in members if r["collapse_step"] != "none"]
        agg["collapsed"] = f"{len(steps)}/{len(members)} seeds" + (
            f" (mean step {sum(steps) / len(steps):.0f})" if steps else "")
    return out


SEED_STYLES = ("-", "--", ":", "-.")  # seeds of one objective: one colour, told apart by line style


def plot_collapse(curves: dict[str, dict], records: list[dict], path: Path, p: float, q: float,
                  threshold: float, dpi: int = 110) -> Path:
    """Keep ratio and reconstruction against step: one colour per objective, one line style per
    seed, the legend in its own column to the right so it covers no curve."""
    fig, axes = new_figure(1, 2, width=6.5, height=4.0, dpi=dpi)
    ax_keep, ax_rec = axes[0]
    colours: dict[str, str] = {}
    seeds = sorted({rec["seed"] for rec in records})
    for rec in records:
        label = objective_label(rec["axes"])
        colour = colours.setdefault(label, f"C{len(colours)}")
        style = SEED_STYLES[seeds.index(rec["seed"]) % len(SEED_STYLES)]
        name = f"{label}, seed {rec['seed']}"
        c = curves[rec["run_id"]]
        if "train/keep_ratio" in c:
            steps, values = zip(*c["train/keep_ratio"])
            ax_keep.plot(steps, values, color=colour, ls=style, lw=1.2, alpha=0.9, label=name)
        recon = _sum_curves(c.get("train/feat_recon", []), c.get("train/img_recon", []))
        if recon:
            steps, values = zip(*recon)
            ax_rec.plot(steps, values, color=colour, ls=style, lw=1.2, alpha=0.9)
        if rec.get("collapse_step") is not None:
            ax_keep.axvline(rec["collapse_step"], color=colour, ls=style, lw=0.8, alpha=0.6)
    for y, text, style in ((p, f"p={p:g}", "--"), (q, f"q={q:g}", "--"), (threshold, f"collapse < {threshold:g}", ":")):
        ax_keep.axhline(y, color="grey", ls=style, lw=0.8)
        ax_keep.text(1.0, y, f"{text} ", color="grey", fontsize=8, va="bottom", ha="right",
                     transform=ax_keep.get_yaxis_transform())
    ax_keep.set(title="train/keep_ratio (L_pr, Eq. 7)", xlabel="step", ylim=(-0.03, 1.03))
    ax_rec.set(title="reconstruction: train/feat_recon + train/img_recon", xlabel="step")
    ax_rec.set_yscale("log")
    for ax in (ax_keep, ax_rec):
        ax.grid(alpha=0.3)
    handles, labels = ax_keep.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.78, 0.5), fontsize=7, frameon=False)
    fig.suptitle("regulariser collapse (App. B.1): colour = objective, line style = seed; "
                 "vertical lines: detected collapse", fontsize=10)
    return save_figure(fig, path, rect=(0, 0, 0.78, 1))


def _sum_curves(a: list, b: list) -> list[tuple[int, float]]:
    bs = dict(b)
    return [(s, v + bs[s]) for s, v in a if s in bs]


def report_collapse(sweep, resolved_base: dict, records: list[dict], failed: list[dict]) -> list[Path]:
    """The study's table and plot (see the module docstring); returns their paths, table first.
    ``resolved_base`` is the sweep's shared config (``sweep.check_grid``)."""
    sel, run_cfg = resolved_base["selector"], resolved_base["run"]
    curves = {rec["run_id"]: read_scalars(sweep.folder / "runs" / rec["run_id"] / "train", CURVES) for rec in records}
    rows = summary_rows(records, curves)
    per_objective = objective_rows(rows)
    run_keys, objective_keys = ("objective", "seed"), ("objective",)
    csv_path, _ = write_table(rows, sweep.folder, "collapse_runs", key_columns=run_keys, markdown=False)
    agg_csv, _ = write_table(per_objective, sweep.folder, "collapse_objectives", spread="std",
                             key_columns=objective_keys, markdown=False)
    threshold, patience = float(run_cfg["collapse_threshold"]), run_cfg["collapse_patience"]
    band = GumbelAEConfig(**{k: v for k, v in sel.items() if k in GUMBEL_KEYS}).band()  # unset keys: derived
    p, q = band["p"], band["q"]
    lines = [
        f"# Regulariser collapse (App. B.1): {len(records)} runs, seeds {sweep.seeds}",
        "",
        f"Collapse: train/keep_ratio below {threshold:g} for {patience} consecutive steps (the step shown is "
        f"the first of them). maxmin band: p={p}, q={q}; alpha1={band['alpha1']}, alpha2={band['alpha2']}. "
        f"Final train keep ratio: the mean of the last {FINAL_WINDOW} logged steps (a Gumbel sample for "
        f"gumbel); val keep ratio: the noiseless mask on held-out data.",
        "",
        "## Per objective (mean ± std over seeds)",
        "",
        markdown_table(per_objective, spread="std", key_columns=objective_keys),
        "## Per run",
        "",
        markdown_table(rows, key_columns=run_keys, legend=False).rstrip("\n"),
        *failed_runs_section(failed),
    ]
    md_path = sweep.folder / "collapse.md"
    md_path.write_text("\n".join(lines) + "\n")
    plot = plot_collapse(curves, records, sweep.folder / "collapse.png", float(p), float(q), threshold)
    return [md_path, plot, csv_path, agg_csv]
