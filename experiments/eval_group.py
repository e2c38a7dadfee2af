"""One encoder group of ``make eval``: every selector's rows at every budget, and the diagnostics
that say why a selector wins or loses (``selectors/diagnostics.py``).

Per selector x budget, besides the outcome metrics (recall, coverage, ntp_increase, psnr):

- ``auroc``: the evidence AUROC of the selector's ranking (budget-free, repeated on each row;
  ``n/a`` for a selector without an order, such as ``uniform``); ``norm_spearman``: how much that
  ranking follows the tokens' feature norm (Spearman's rho per image);
- ``<objective>_loss_vs_random``: for every trained objective of the group, that objective's own
  loss on this selector's kept tokens minus its loss on random ones (the mean over the first
  ``RANDOM_REFERENCE_DRAWS`` random keep sets), paired per sample. Negative means better than
  random *on that objective*. The objective's own row says whether it learned what it optimises;
  the other rows say how that objective values the baselines' choices;
- for an objective that trains through a soft selection (vp_noise), at its budget:
  ``alpha_on_topk`` (the share of the soft top-K mass on the hard top-K) and
  ``ntp_soft_minus_hard`` (its VLM's NTP as trained, through the gate, minus as deployed).

Recall and coverage use each token's kept share (``SelectorNet.kept_share``), so a merging
selector (``pool``, ``visionzip``) is scored in proportion to the cells that cover a box; an
objective's loss scores a subset, so it is ``n/a`` for a merging selector. A query-aware selector
(``cdpruner``) reads each sample's question embedded by the group encoder's text tower
(:func:`selection_context`); without one its rows are ``n/a``.

A trained selector with a training budget (:attr:`SelectorNet.trained_budget`) is scored at that
budget only, unless budgets are given; rows off a selector's training budget say so in
``trained_at``.

Headroom, per loss (``ntp_increase`` and each objective's loss) and budget, from ``draws`` random
keep sets per sample: the loss's spread over them, the best-of-``draws`` gain, the noise floor
(95 % CI half-width of the difference between two random draws) and a verdict
(:func:`~tokensel.selectors.diagnostics.headroom_verdict`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from tokensel.common.errors import TokenselError
from tokensel.common.stats import MetricAccumulator, mean_ci
from tokensel.datamodules.datamodule import FeatureDataModule
from tokensel.datamodules.encoders import build_text_tower
from tokensel.experiments.config import encoder_mismatch
from tokensel.experiments.flops import GEOMETRIES, flops_report
from tokensel.experiments.teacher import find_teacher
from tokensel.selectors.base import SelectorModule
from tokensel.selectors.baselines import BASELINES
from tokensel.selectors.budget import resolve_budget
from tokensel.selectors.catalog import baseline_names, build_baseline, load_module, selector_entry
from tokensel.selectors.diagnostics import (evidence_auroc, evidence_rows, headroom, headroom_verdict, objective_losses,
                                            random_keep_masks, rank_correlation)
from tokensel.selectors.inference import CheckpointError, SelectionContext, gather_tokens
from tokensel.selectors.metrics import evidence_recall, keep_mask, kept_indices, psnr, token_coverage
from tokensel.selectors.vlm import VLMConfig
from tokensel.selectors.vlm_backends import build_vlm, required_encoder
from tokensel.vlms.ntp import CAPTION_INSTRUCTION

DEFAULT_RATIOS = (0.056, 0.111, 0.222, 0.4, 0.5)  # the Gumbel paper's Table 1 keep ratios
LLAVA15_COUNTS = (64, 128, 192)  # AutoSelect's budgets, for 576-token encoders
METRICS = ("recall", "coverage", "ntp_increase", "psnr", "auroc", "norm_spearman")
FLOPS_COLUMNS = ("llm_tflops_kept", "sampler_tflops", "total_tflops", "prefill_reduction")
RANDOM_REFERENCE_DRAWS = 3  # random keep sets averaged into the "vs random" reference


class EvalError(TokenselError):
    """A user mistake on the eval command line: one line, exit status 2."""


class Recorder:
    """Per-sample values by (selector, k, metric): the accumulators behind the table, and the long
    list behind ``samples.csv`` (so every paired test can be redone)."""

    def __init__(self) -> None:
        self.acc: dict[tuple, MetricAccumulator] = {}
        self.samples: list[tuple] = []
        self.kept: dict[tuple, int] = {}  # (selector, k) -> tokens it returned (a merging one may return fewer)

    def add(self, selector: str, k: int, metric: str, values: torch.Tensor, keys: list[str]) -> None:
        values = values.detach().double().cpu()
        if len(values) != len(keys):
            raise ValueError(f"{metric}: {len(values)} values for {len(keys)} samples")
        finite = torch.isfinite(values)
        self.acc.setdefault((selector, k), MetricAccumulator()).add(metric, values[finite])
        self.samples += [(selector, k, metric, key, float(v)) for key, v, ok in zip(keys, values.tolist(), finite)
                         if ok]

    def summary(self, selector: str, k: int) -> dict:
        return self.acc.get((selector, k), MetricAccumulator()).summary()


def resolve_budget_list(budgets: Optional[list], num_tokens: int, counts: bool = True) -> list:
    if budgets is not None:
        return budgets
    return list(DEFAULT_RATIOS) + (list(LLAVA15_COUNTS) if num_tokens == 576 and counts else [])


def ntp_vlm(config, trained: list) -> tuple:
    """(the frozen VLM of the ``ntp_increase`` column or None, what it is in words): a trained
    vp_noise's own VLM, else the corpus teacher of the group's encoder when one is built
    (``make teacher``, or the first ``make train SELECTOR=vp_noise``)."""
    vlm_cfg = next((copy.deepcopy(t["net"].vlm_config) for t in trained if t["net"].vlm_config is not None), None)
    if vlm_cfg is None:
        teacher = find_teacher(config)
        if teacher is None:
            return None, "n/a (no corpus teacher for this encoder and corpus yet: make teacher)"
        vlm_cfg = VLMConfig(backend="coca", model=config.teacher.model, pretrained=str(teacher))
    what = f"{vlm_cfg.backend}:{vlm_cfg.model}" + (f" ({vlm_cfg.pretrained})" if vlm_cfg.pretrained else "")
    if encoder_mismatch(required_encoder(vlm_cfg), config.encoder) is not None:
        return None, f"{what} n/a (it needs another encoder)"
    return build_vlm(vlm_cfg), what


def score_across_views(batch, candidates: list, budget_of_k: dict, rec: Recorder, context) -> None:
    """``data.view_selection=across``: each image's views are one selection (``select_across``);
    recall and coverage are measured over all of the image's V x N tokens."""
    for rows in batch.image_groups():
        G, V = rows.shape
        views = batch.features[rows]  # (G, V, N, C)
        flat = views.reshape(G, -1, views.shape[-1])
        keys = [batch.keys[int(r)] for r in rows[:, 0]]
        group_context = context.take(rows.reshape(-1))
        answer = None if batch.answer_tokens is None else batch.answer_tokens[rows].reshape(G, -1)
        has_box = None if batch.has_answer_box is None else batch.has_answer_box[rows].any(dim=1)
        boxed = [keys[i] for i in evidence_rows(answer, has_box).nonzero().flatten().tolist()] if answer is not None else []
        for name, selector, ks in candidates:
            for k in ks:
                indices, kept = selector.select_across(views, budget_of_k[k], context=group_context)
                share = selector.kept_share_across(views, indices, group_context)
                if answer is not None:
                    rec.add(name, k, "recall", evidence_recall(share, answer, has_box), boxed)
                rec.add(name, k, "coverage", token_coverage(flat, share, kept=kept if selector.merges else None), keys)


def text_tower_for(config, candidates: list, log=print):
    """The text tower of the group's encoder when a candidate is query-aware and the encoder has one
    (``open_clip:``), else None; the query-aware candidates are then ``n/a`` (logged once)."""
    query_aware = [name for name, selector, _ in candidates if selector.uses_instruction]
    if not query_aware:
        return None

    enc = config.encoder
    tower = build_text_tower(enc.name, enc.pretrained, enc.norm, enc.image_size, enc.init_seed)
    if tower is None:
        log(f"[eval] {', '.join(query_aware)}: n/a (query-aware, and encoder {enc.name} has no text tower to embed "
            "the question; an open_clip: encoder has one)")
    return tower


def selection_context(batch, text_tower=None) -> SelectionContext:
    """The ``SelectionContext`` of one batch: the CLS attention (when ``data.cls_attention_layer`` is
    set) and the instruction, each sample's question or, for a caption sample (empty prompt),
    LLaVA's caption instruction; with a text tower, also its embedding and the patch tokens in the
    same space (``OpenClipTextTower``)."""
    instruction = [prompt.strip() or CAPTION_INSTRUCTION for prompt in batch.prompt]
    if text_tower is None:
        return SelectionContext(cls_attention=batch.cls_attention, instruction=instruction)
    device = batch.features.device
    text_tower.to(device)
    return SelectionContext(cls_attention=batch.cls_attention, instruction=instruction,
                            instruction_embedding=text_tower.embed_text(instruction).to(device),
                            token_embedding=text_tower.embed_tokens(batch.features).to(device))


class Objective:
    """A trained objective of the group, with the VLM its loss runs through (if any) and, when it
    trains through a soft selection, its whole module (for the train/test gap)."""

    def __init__(self, name: str, net, vlm=None, module=None, tau: Optional[float] = None):
        self.name, self.net, self.vlm, self.module, self.tau = name, net, vlm, module, tau


def build_objectives(trained: list, ntp: Optional[torch.nn.Module]) -> list[Objective]:
    """Every trained selector of the group as an :class:`Objective`; a VLM is built once per config."""
    vlms: list[tuple] = []
    first_cfg = next((t["net"].vlm_config for t in trained if t["net"].vlm_config is not None), None)
    if ntp is not None and first_cfg is not None:
        vlms.append((first_cfg, ntp))
    out = []
    for t in trained:
        module, tau = None, None
        soft = selector_entry(t["name"]).module_cls.train_test_gap is not SelectorModule.train_test_gap
        if soft and Path(t["path"]).is_file():  # an exported folder holds the network only, not the gate
            module, step = load_module(t["path"])
            tau = module.tau_at(step)
        vlm = None
        cfg = t["net"].vlm_config
        if cfg is not None:
            vlm = next((v for c, v in vlms if c == cfg), None)
            if vlm is None:
                vlm = module.vlm if module is not None else build_vlm(cfg)
                vlms.append((cfg, vlm))
        out.append(Objective(t.get("label", t["name"]), module.net if module is not None else t["net"], vlm, module,
                             tau))
    return out


def evaluate_group(group: dict, selectors: list[str], budgets: Optional[list], max_samples: Optional[int],
                   seed: int, geometry: str, draws: int = 8, log=print, options: Optional[dict] = None
                   ) -> tuple[list[dict], list[dict], list[tuple]]:
    """All rows of one encoder group: ``(rows, headroom rows, per-sample values)``."""
    config = group["config"]
    if any(BASELINES.get(n).needs_cls_attention for n in selectors if n in BASELINES) \
            and config.data.cls_attention_layer is None:
        config.data.cls_attention_layer = -2
    datamodule = FeatureDataModule(config.data, config.encoder, seed)
    if not datamodule.has_val:
        raise EvalError(f"{datamodule.root}: no {config.data.val_split!r} split to evaluate on")
    dims = datamodule.dims
    trained = [t for t in group["trained"] if t["name"] in selectors]
    for t in group["trained"]:
        if t["net"].dims.as_dict() != dims.as_dict():
            raise CheckpointError(f"{t['name']} was trained on features {t['net'].dims.as_dict()}, "
                                  f"the eval encoder {config.encoder.name} gives {dims.as_dict()}")
    across = config.data.views == "anyres" and config.data.view_selection == "across"
    explicit = budgets is not None
    budget_list = resolve_budget_list(budgets, dims.num_tokens, counts=not across)
    if across and any(not isinstance(b, float) for b in budget_list):
        raise EvalError(f"data.view_selection=across: budgets must be keep ratios, not counts "
                        f"({', '.join(str(b) for b in budget_list if not isinstance(b, float))}): "
                        "a count of an image's V x N tokens would mean another ratio for every view count")
    trained_budgets = {t.get("label", t["name"]): t["net"].trained_budget for t in trained}
    if not explicit:
        budget_list += [b for b in trained_budgets.values() if b is not None and b not in budget_list]
    k_of = {b: resolve_budget(b, dims.num_tokens) for b in budget_list}
    all_ks = sorted(set(k_of.values()))  # a ratio and a count may name the same K: measure it once

    def ks_for(name: str) -> list[int]:
        own = trained_budgets.get(name)
        return [k_of[own]] if own is not None and not explicit else all_ks

    for name, own in trained_budgets.items():
        off = [b for b in budget_list if own is not None and k_of[b] != resolve_budget(own, dims.num_tokens)]
        if explicit and off:
            log(f"[eval] note: {name} was trained for a keep ratio of {own:.3g}; its rows at "
                f"{', '.join(str(b) for b in off)} are off its training budget (trained_at)")
    candidates = [(n, build_baseline(n, dims.grid, seed, (options or {}).get(n)), all_ks) for n in selectors
                  if n in baseline_names()]
    vlm, vlm_what = ntp_vlm(config, trained)
    objectives = build_objectives(trained, vlm)
    candidates += [(o.name, o.net, ks_for(o.name)) for o in objectives]
    text_tower = text_tower_for(config, candidates, log)
    if text_tower is None:  # query-aware selectors without the question's embedding: n/a rows
        candidates = [(n, s, [] if s.uses_instruction else ks) for n, s, ks in candidates]
    log(f"[eval] encoder {config.encoder.name}: {dims.num_tokens} tokens x {dims.dim}; "
        f"{len(candidates)} selectors x {len(budget_list)} budgets; NTP metric: {vlm_what}; "
        f"headroom from {draws} random keep sets per sample")
    if across:
        log("[eval] anyres views, selected across each image's views: budgets count all its V x N tokens; "
            "ntp_increase, psnr and the diagnostics are per view, so n/a here")

    rec, room = Recorder(), Recorder()
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    with torch.no_grad():
        for raw in datamodule.val_dataloader():
            if max_samples is not None and seen >= max_samples:
                break
            batch = datamodule.features(raw)
            if max_samples is not None and seen + len(batch) > max_samples:
                batch = batch.head(max_samples - seen)
            seen += len(batch)
            context = selection_context(batch, text_tower)
            if across:
                score_across_views(batch, candidates, {k: b for b, k in k_of.items()}, rec, context)
                log(f"[eval] {seen} held-out views", end="\r")
                continue
            score_batch(batch, context, candidates, objectives, vlm, all_ks, draws, generator, rec, room)
            log(f"[eval] {seen} held-out samples", end="\r")
    log(f"[eval] {seen} held-out samples from {datamodule.root}")
    geo = GEOMETRIES[geometry]
    rows = []
    for name, selector, ks in candidates:
        for budget, k in k_of.items():
            if k not in ks and not (selector.uses_instruction and k in all_ks):
                continue
            kept = rec.kept.get((name, k), k)  # pool keeps at most k cells
            ratio = kept / dims.num_tokens
            summary = rec.summary(name, k)
            flops = flops_report(geo, ratio, sampler_layers=selector.sampler_layers)
            row = {"encoder": config.encoder.name, "data": str(datamodule.root), "selector": name,
                   "budget": str(budget), "keep_ratio": ratio, "k": kept, "samples": seen}
            for metric in METRICS + tuple(f"{o.name}_loss_vs_random" for o in objectives) \
                    + ("alpha_on_topk", "ntp_soft_minus_hard"):
                if metric in summary or metric in METRICS:
                    row[metric] = summary.get(metric, (float("nan"), float("nan"), 0))
            if trained_budgets.get(name) is not None:
                row["trained_at"] = f"{trained_budgets[name]:.3g}"
            row.update({f"{geometry}_{key}": flops[key] for key in FLOPS_COLUMNS})
            rows.append(row)
    return rows, headroom_rows(room, k_of, dims.num_tokens, config.encoder.name, str(datamodule.root), draws), \
        rec.samples


def score_batch(batch, context: SelectionContext, candidates: list, objectives: list[Objective], vlm, ks: list[int],
                draws: int, generator: torch.Generator, rec: Recorder, room: Recorder) -> None:
    """Every metric of one held-out batch (see the module docstring)."""
    n, N = len(batch), batch.features.shape[1]
    keys = list(batch.keys)
    boxed = [keys[i] for i in evidence_rows(batch.answer_tokens, batch.has_answer_box).nonzero().flatten().tolist()] \
        if batch.answer_tokens is not None else []
    ranked = [keys[i] for i in evidence_rows(batch.answer_tokens, batch.has_answer_box, negatives=True)
              .nonzero().flatten().tolist()] if batch.answer_tokens is not None else []
    full = vlm.ntp_loss(batch.features, batch.prompt, batch.target).per_sample if vlm is not None else None

    def ntp_increase(mask: torch.Tensor) -> torch.Tensor:
        return vlm.ntp_loss(gather_tokens(batch.features, kept_indices(mask)), batch.prompt, batch.target).per_sample - full

    random_reference = {}
    for k in ks:
        masks = random_keep_masks(n, N, k, max(draws, RANDOM_REFERENCE_DRAWS), generator, batch.features.device)
        if vlm is not None:
            for part, values in headroom(torch.stack([ntp_increase(m) for m in masks]).double().cpu()).items():
                room.add("ntp_increase", k, part, values, keys)
        for o in objectives:
            losses = objective_losses(o.net, batch, masks, o.vlm)
            if losses is None:
                continue
            random_reference[(o.name, k)] = losses[:RANDOM_REFERENCE_DRAWS].mean(dim=0)
            for part, values in headroom(losses).items():
                room.add(f"{o.name}_loss", k, part, values, keys)
    for name, selector, sel_ks in candidates:
        if not sel_ks:  # n/a here (a query-aware selector without the question's embedding)
            continue
        rank = selector.ranking(batch.features, context)
        auroc = evidence_auroc(rank, batch.answer_tokens, batch.has_answer_box) if rank is not None else None
        follows_norm = rank_correlation(rank, batch.features.float().norm(dim=-1)) if rank is not None else None
        for k in sel_ks:
            indices, kept = selector.select(batch.features, k, context=context)
            mask = keep_mask(indices, N)
            share = selector.kept_share(batch.features, indices, context)  # a merging selector's partial tokens
            rec.kept[(name, k)] = kept.shape[1]
            if batch.answer_tokens is not None:
                rec.add(name, k, "recall", evidence_recall(share, batch.answer_tokens, batch.has_answer_box), boxed)
            if auroc is not None:
                rec.add(name, k, "auroc", auroc, ranked)
                rec.add(name, k, "norm_spearman", follows_norm, keys)
            rec.add(name, k, "coverage", token_coverage(batch.features, share, kept=kept if selector.merges else None),
                    keys)
            if full is not None:
                rec.add(name, k, "ntp_increase", vlm.ntp_loss(kept, batch.prompt, batch.target).per_sample - full, keys)
            image = selector.image_from_kept(batch.features, mask)
            if image is not None:
                rec.add(name, k, "psnr", psnr(image, batch.image), keys)
            for o in objectives:  # an objective scores a subset; a merging selector keeps none
                if (o.name, k) in random_reference and not selector.merges:
                    own = o.net.objective_loss(batch, mask, o.vlm).double().cpu()
                    rec.add(name, k, f"{o.name}_loss_vs_random", own - random_reference[(o.name, k)], keys)
        gap_owner = next((o for o in objectives if o.name == name and o.module is not None), None)
        if gap_owner is not None:
            text = [i for i, t in enumerate(batch.target) if t.strip()]
            gap = gap_owner.module.train_test_gap(batch.features[text], [batch.prompt[i] for i in text],
                                                  [batch.target[i] for i in text], gap_owner.tau)
            if gap is not None:
                for k in sel_ks:
                    rec.add(name, k, "alpha_on_topk", gap["alpha_on_topk"], [keys[i] for i in text])
                    rec.add(name, k, "ntp_soft_minus_hard", gap["ntp_soft"] - gap["ntp_hard"], [keys[i] for i in text])


def headroom_rows(room: Recorder, k_of: dict, num_tokens: int, encoder: str, data: str, draws: int) -> list[dict]:
    """One row per loss and budget: spread, best-of-draws gain, noise floor and the verdict."""
    rows = []
    for metric in dict.fromkeys(m for m, _ in room.acc):
        for budget, k in k_of.items():
            summary = room.summary(metric, k)
            if "best_gain" not in summary:
                continue
            floor = mean_ci(room.acc[(metric, k)].values("draw_difference"))[1]
            rows.append({"encoder": encoder, "data": data, "loss": metric, "budget": str(budget),
                         "keep_ratio": k / num_tokens, "k": k, "draws": draws, "spread": summary["spread"], "best_gain": summary["best_gain"],
                         "noise_floor": floor, "verdict": headroom_verdict(summary["best_gain"][0], floor)})
    return rows
