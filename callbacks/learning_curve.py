"""Learning curves: is the selector beating random yet, and is it learning the evidence?

At every validation (or at the steps of ``run.curve_steps``), :class:`LearningCurve` measures the
selector being trained on a fixed held-out set (the first ``run.curve_samples`` samples of the
validation split, read once and kept in memory), at the budgets ``run.curve_budgets``:

- ``recall@<b>``: the share of answer-box tokens it keeps (``selectors/metrics.py``);
- ``auroc``: the evidence AUROC of its ranking (``selectors/diagnostics.py``);
- ``objective@<b>``: its own objective's loss on the tokens it keeps (lower is better).

Each comes with paired differences over the same samples (mean, 95 % CI): against random
selection (the mean over ``run.curve_random_draws`` random keep sets, fixed for the whole run)
and against DivPrune (``*_vs_random``, ``*_vs_divprune``; the AUROC is compared with chance,
0.5). The training-free baselines' recall and AUROC do not change with training: they are
measured once and drawn as flat reference lines (``curve/<metric>/<baseline>``), in one
TensorBoard "Custom Scalars" chart per metric with the selector's own line. Every measurement
is also appended to ``curve.jsonl`` in the run folder (``make curve`` reads it).

On rank 0 only; every rank takes part in reading the held-out split once (the feature cache may
be built collectively). Cheap on cached features: a few selector and objective forwards per
held-out batch and budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from tokensel.common.stats import mean_ci, paired_ci
from tokensel.selectors.baselines import build_baseline
from tokensel.selectors.budget import resolve_budget
from tokensel.callbacks.rng_state import collect_rng_state, restore_rng_state
from tokensel.selectors.diagnostics import evidence_auroc, objective_losses, random_keep_masks
from tokensel.selectors.inference import SelectionContext
from tokensel.selectors.metrics import evidence_recall, keep_mask

CURVE_FILE = "curve.jsonl"
REFERENCE_BASELINES = ("random", "uniform", "l2norm", "divprune", "cls_attention")


def log_spaced_steps(last: int, points: int) -> list[int]:
    """Step 0 and ``points`` roughly log-spaced steps from 1 to ``last`` (distinct, ascending)."""
    if last < 1 or points < 1:
        return [0]
    steps = {0, last}
    for i in range(points):
        steps.add(int(round(math.exp(math.log(last) * i / max(1, points - 1)))))
    return sorted(s for s in steps if 0 <= s <= last)


def triple(values: tuple) -> list:
    """A metric triple as a JSON list (nan -> None)."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


class LearningCurve(L.Callback):
    """See the module docstring. ``budgets`` are keep ratios or counts; ``steps`` None measures
    after every validation, a list at those global steps (and once at the end of training)."""

    def __init__(self, budgets: Sequence, steps: Optional[Sequence[int]] = None, max_samples: int = 192,
                 random_draws: int = 3, seed: int = 0, baselines: Sequence[str] = REFERENCE_BASELINES):
        super().__init__()
        if random_draws < 1:
            raise ValueError(f"random_draws={random_draws}: need at least one")
        self.budgets = list(budgets)
        self.steps = None if steps is None else sorted(set(int(s) for s in steps))
        self.max_samples = max_samples
        self.random_draws = random_draws
        self.seed = seed
        self.baseline_names = list(baselines)
        self.batches: Optional[list] = None
        self.reference: dict = {}
        self.measured: set[int] = set()
        self.path: Optional[Path] = None

    # ---- when ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.log_dir:
            self.path = Path(trainer.log_dir) / CURVE_FILE
        if self.steps is not None and 0 in self.steps and trainer.global_step == 0:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.steps is not None and trainer.global_step in self.steps:
            self.measure(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.steps is None and not trainer.sanity_checking:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.steps is not None:
            self.measure(trainer, pl_module)

    # ---- what ------------------------------------------------------------------------------
    def held_out(self, trainer, device: torch.device) -> list:
        """The first ``max_samples`` held-out samples as FeatureBatches on ``device`` (read once)."""
        if self.batches is None:
            datamodule = trainer.datamodule
            split = datamodule.cfg.val_split
            batches, seen = [], 0
            for raw in datamodule.epoch_loader(split, whole=True):
                batch = datamodule.features(move_data_to_device(raw, device), split)
                batches.append(batch.head(self.max_samples - seen))
                seen += len(batches[-1])
                if seen >= self.max_samples:
                    break
            self.batches = batches
        return self.batches

    def references(self, batches: list, dims) -> dict:
        """What stays fixed for the run: random keep sets, DivPrune's keep sets, and the
        baselines' recall and AUROC."""
        generator = torch.Generator().manual_seed(self.seed)
        ks = [resolve_budget(b, dims.num_tokens) for b in self.budgets]
        ref = {"ks": ks, "random_masks": [], "divprune_masks": [], "values": {}}
        baselines = {name: build_baseline(name, dims.grid, self.seed) for name in self.baseline_names}
        values: dict[str, list] = {}
        for batch in batches:
            n, device = len(batch), batch.features.device
            ref["random_masks"].append({k: random_keep_masks(n, dims.num_tokens, k, self.random_draws, generator,
                                                             device) for k in ks})
            ref["divprune_masks"].append({k: keep_mask(baselines["divprune"].select(batch.features, k)[0],
                                                       dims.num_tokens) for k in ks})
            context = SelectionContext(cls_attention=batch.cls_attention)
            for name, selector in baselines.items():
                if selector.needs_cls_attention and batch.cls_attention is None:
                    continue
                rank = selector.ranking(batch.features, context)
                if rank is not None:
                    values.setdefault(f"auroc/{name}", []).append(
                        evidence_auroc(rank, batch.answer_tokens, batch.has_answer_box))
                for b, k in zip(self.budgets, ks):
                    if name == "random":
                        masks = ref["random_masks"][-1][k]
                        recall = torch.stack([evidence_recall(m, batch.answer_tokens, batch.has_answer_box)
                                              for m in masks]).mean(0)
                    else:
                        mask = keep_mask(selector.select(batch.features, k, context=context)[0], dims.num_tokens)
                        recall = evidence_recall(mask, batch.answer_tokens, batch.has_answer_box)
                    values.setdefault(f"recall@{b}/{name}", []).append(recall.cpu())
        ref["values"] = {key: torch.cat(parts) for key, parts in values.items()}
        return ref

    @torch.no_grad()
    def evaluate(self, pl_module, batches: list) -> dict:
        """Every metric of the module docstring, as ``{name: (mean, half, n)}``."""
        net, vlm = pl_module.net, pl_module.objective_vlm
        ref, ks = self.reference, self.reference["ks"]
        per: dict[str, list] = {}

        def add(name: str, values: torch.Tensor) -> None:
            per.setdefault(name, []).append(values.detach().double().cpu())

        for i, batch in enumerate(batches):
            rank = net.ranking(batch.features, SelectionContext(cls_attention=batch.cls_attention))
            if rank is not None:
                add("auroc", evidence_auroc(rank, batch.answer_tokens, batch.has_answer_box))
            for b, k in zip(self.budgets, ks):
                mask = keep_mask(net.select(batch.features, k)[0], net.dims.num_tokens)
                add(f"recall@{b}", evidence_recall(mask, batch.answer_tokens, batch.has_answer_box))
                own = objective_losses(net, batch, mask.unsqueeze(0), vlm)
                if own is None:
                    continue
                add(f"objective@{b}", own[0])
                add(f"objective@{b}/random", objective_losses(net, batch, ref["random_masks"][i][k], vlm).mean(0))
                add(f"objective@{b}/divprune", objective_losses(net, batch, ref["divprune_masks"][i][k].unsqueeze(0),
                                                                vlm)[0])
        values = {name: torch.cat(parts) for name, parts in per.items()}
        out = {name: mean_ci(v[torch.isfinite(v)]) for name, v in values.items()}
        fixed = ref["values"]
        if "auroc" in values:
            out["auroc_vs_chance"] = mean_ci(values["auroc"] - 0.5)
            if "auroc/divprune" in fixed:
                out["auroc_vs_divprune"] = paired_ci(values["auroc"], fixed["auroc/divprune"])
        for b in self.budgets:
            for base in ("random", "divprune"):
                if f"recall@{b}/{base}" in fixed and len(fixed[f"recall@{b}/{base}"]) == len(values[f"recall@{b}"]):
                    out[f"recall@{b}_vs_{base}"] = paired_ci(values[f"recall@{b}"], fixed[f"recall@{b}/{base}"])
                if f"objective@{b}" in values:
                    out[f"objective@{b}_vs_{base}"] = paired_ci(values[f"objective@{b}"],
                                                               values[f"objective@{b}/{base}"])
        for name, v in fixed.items():
            out[name] = mean_ci(v)
        return out

    def measure(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step in self.measured or not trainer.datamodule.has_val:
            return
        self.measured.add(step)
        trainer.datamodule.prepare_features(trainer.datamodule.cfg.val_split)  # every rank: may build the cache
        if not trainer.is_global_zero:
            return
        was_training = pl_module.net.training
        pl_module.net.eval()
        rng = collect_rng_state()  # a watcher draws nothing from training's RNGs (exact resume)
        try:
            batches = self.held_out(trainer, pl_module.device)
            if not self.reference:
                self.reference = self.references(batches, pl_module.net.dims)
                self.write_layout(trainer)
            results = self.evaluate(pl_module, batches)
        finally:
            pl_module.net.train(was_training)
            restore_rng_state(rng)
        self.write(trainer, step, results)

    # ---- where -----------------------------------------------------------------------------
    def write(self, trainer, step: int, results: dict) -> None:
        scalars = {}
        for name, (mean, half, n) in results.items():
            if not n or math.isnan(mean):
                continue
            tag = f"curve/{name}" if "/" in name else f"curve/{name}/selector"
            scalars[tag] = mean
            if name.endswith(("_vs_random", "_vs_divprune", "_vs_chance")) and not math.isnan(half):
                scalars[f"curve/{name}/ci_low"] = mean - half
                scalars[f"curve/{name}/ci_high"] = mean + half
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "samples": sum(len(b) for b in self.batches or []),
                      "metrics": {name: triple(value) for name, value in results.items()}}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def write_layout(self, trainer) -> None:
        """One TensorBoard Custom Scalars chart per metric: the selector and its flat references."""
        charts = {}
        for metric in ["auroc"] + [f"{m}@{b}" for b in self.budgets for m in ("recall", "objective")]:
            tags = [f"curve/{metric}/selector"] + [f"curve/{metric}/{name}" for name in (*self.baseline_names,)]
            charts[metric] = ["Multiline", tags]
            charts[f"{metric} (paired vs random, 95 % CI)"] = [
                "Margin", [f"curve/{metric}_vs_{'chance' if metric == 'auroc' else 'random'}/selector",
                           f"curve/{metric}_vs_{'chance' if metric == 'auroc' else 'random'}/ci_low",
                           f"curve/{metric}_vs_{'chance' if metric == 'auroc' else 'random'}/ci_high"]]
        for logger in trainer.loggers:
            writer = getattr(logger, "experiment", None)
            if hasattr(writer, "add_custom_scalars"):
                writer.add_custom_scalars({"learning curves": charts})
