"""Compare selectors at matched budgets on held-out data: ``make eval``.

    python -m tokensel.experiments.evaluate [--selectors a,b] [--ckpts p1,p2] [--budgets 0.1,0.25,64]
                                            [--out DIR] [key=value ...]

What is compared (``--selectors``, default: every baseline plus every trained selector that
has a run under ``runs/``):

- the training-free baselines (``random``, ``uniform``, ``l2norm``, ``divprune``,
  ``cls_attention``), and
- trained selectors: ``--ckpts`` paths, or the newest ``checkpoints/last.ckpt`` of each
  trained selector under ``run.root``.

Checkpoints are grouped by the encoder they were trained on; each group is evaluated on its
own encoder's features of the held-out split (``data.val_split``), with the baselines beside
it, so every row of a group sees the same tokens. ``key=value`` overrides (``data.*``,
``encoder.*``) apply to every group; a checkpoint that does not fit the features is a one-line
error naming the mismatch.

Every selector answers the same ``select(features, budget, context=...)``; what a row needs beyond
it comes from the selector's optional methods (``image_from_kept``, ``sampler_layers``,
``vlm_config``; see ``selectors/inference.py``), never from its kind.

Metrics per selector x budget (mean ± 95 % CI over samples; ``metrics.py``, ``stats.py``):

- ``recall``: the share of the answer box's tokens that are kept (samples with a box only;
  ``n/a`` when the split has none);
- ``coverage``: over dropped tokens, the mean of the max cosine similarity to a kept token;
- ``ntp_increase``: the frozen VLM's NTP loss with only the kept tokens minus with all tokens.
  The VLM is a trained vp_noise's own, else the corpus teacher of the group's encoder when it is
  built (``make teacher``; ``experiments/teacher.py``); ``n/a`` when there is none or the VLM needs
  another encoder;
- ``psnr``: the auto-encoder selectors' image reconstruction from the kept tokens;
- LLM and sampler FLOPs for a named VLM geometry (``--geometry``, LLaVA-NeXT by default; the
  LLM's FFN counts LLaMA's three gated matrices, see ``flops.llm_flops``; the sampler counts
  the selector's own layers at the encoder width) and the prefill reduction.

Output: ``results.csv``, ``results.md``, one PNG per metric (per encoder group, in a subfolder
when there are several) and TensorBoard scalars in the eval folder, whose path is printed.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.common.errors import TokenselError

DEFAULT_RATIOS = (0.056, 0.111, 0.222, 0.4, 0.5)  # the Gumbel paper's Table 1 keep ratios
LLAVA15_COUNTS = (64, 128, 192)  # AutoSelect's budgets, for 576-token encoders
METRICS = ("recall", "coverage", "ntp_increase", "psnr")
FLOPS_COLUMNS = ("llm_tflops_kept", "sampler_tflops", "total_tflops", "prefill_reduction")


class EvalError(TokenselError):
    """A user mistake on the eval command line: one line, exit status 2."""


def newest_checkpoints(run_root: Path, names: list[str]) -> list[Path]:
    """The newest ``last.ckpt`` under ``run_root/<name>/*/checkpoints/`` for each trained name."""
    found = []
    for name in names:
        ckpts = sorted((run_root / name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            found.append(ckpts[-1])
    return found


def load_trained(path: Path):
    """(name, network, run config) of a checkpoint; one-line errors for foreign files."""
    from tokensel.selectors.catalog import load_selector
    from tokensel.selectors.inference import read_checkpoint

    hp = read_checkpoint(path)["hyper_parameters"]
    if not hp.get("config"):
        raise EvalError(f"{path}: the checkpoint has no run config (encoder unknown); retrain with this version")
    return hp["selector"]["name"], load_selector(path), hp["config"]


def encoder_key(run_config: dict) -> tuple:
    enc = run_config["encoder"]
    return (enc["name"], enc["pretrained"], enc["layer"], enc["norm"], enc["image_size"], enc.get("init_seed", 0),
            run_config["data"]["recon_size"])


def build_groups(trained: list, base_config, overrides: list[str]) -> list[dict]:
    """Checkpoints grouped by encoder; each group gets its own data/encoder config."""
    from omegaconf import OmegaConf

    from tokensel.experiments.config import parse_overrides

    cli = parse_overrides(overrides)
    forced = any(o.startswith("encoder.") for o in overrides)
    groups: dict[tuple, dict] = {}
    for name, net, run_config in trained:
        key = ("forced",) if forced else encoder_key(run_config)
        group = groups.setdefault(key, {"run_config": run_config, "trained": []})
        group["trained"].append((name, net, run_config))
    if not groups:
        groups[("default",)] = {"run_config": None, "trained": []}
    out = []
    for group in groups.values():
        config = copy.deepcopy(base_config)
        if group["run_config"] is not None:
            data = dict(group["run_config"]["data"])
            data["root"] = base_config.data.root if base_config.data.root is not None else data["root"]
            for key, value in data.items():
                setattr(config.data, key, value)
            for key, value in group["run_config"]["encoder"].items():
                setattr(config.encoder, key, value)
        schema = OmegaConf.create({"data": OmegaConf.structured(config.data),
                                   "encoder": OmegaConf.structured(config.encoder)})
        try:
            merged = OmegaConf.merge(schema, cli)
        except Exception as err:  # OmegaConf's key/type errors: one line naming the key
            raise EvalError(f"overrides: {str(err).splitlines()[0]}") from None
        config.data, config.encoder = OmegaConf.to_object(merged.data), OmegaConf.to_object(merged.encoder)
        out.append({"config": config, "trained": group["trained"]})
    return out


def score_across_views(batch, candidates: list, budget_of_k: dict, acc: dict) -> None:
    """``data.view_selection=across``: each image's views are one selection (``select_across``);
    recall and coverage are measured over all of the image's V x N tokens."""
    from tokensel.experiments.metrics import evidence_recall, keep_mask, token_coverage
    from tokensel.selectors.inference import SelectionContext

    for rows in batch.image_groups():
        G, V = rows.shape
        views = batch.features[rows]  # (G, V, N, C)
        flat = views.reshape(G, -1, views.shape[-1])
        cls = None if batch.cls_attention is None else batch.cls_attention[rows.reshape(-1)]
        answer = None if batch.answer_tokens is None else batch.answer_tokens[rows].reshape(G, -1)
        has_box = None if batch.has_answer_box is None else batch.has_answer_box[rows].any(dim=1)
        for name, selector in candidates:
            for k, budget in budget_of_k.items():
                indices, _ = selector.select_across(views, budget, context=SelectionContext(cls_attention=cls))
                mask = keep_mask(indices, flat.shape[1])
                if answer is not None:
                    acc[(name, k)].add("recall", evidence_recall(mask, answer, has_box))
                acc[(name, k)].add("coverage", token_coverage(flat, mask))


def ntp_vlm(config, trained: list) -> tuple:
    """(the frozen VLM of the ``ntp_increase`` column or None, what it is in words): a trained
    vp_noise's own VLM, else the corpus teacher of the group's encoder when one is built
    (``make teacher``, or the first ``make train SELECTOR=vp_noise``)."""
    from tokensel.experiments.config import encoder_mismatch
    from tokensel.experiments.teacher import find_teacher
    from tokensel.selectors.vlm import VLMConfig
    from tokensel.selectors.vlm_backends import build_vlm, required_encoder

    vlm_cfg = next((copy.deepcopy(net.vlm_config) for _, net, _ in trained if net.vlm_config is not None), None)
    if vlm_cfg is None:
        teacher = find_teacher(config)
        if teacher is None:
            return None, "n/a (no corpus teacher for this encoder and corpus yet: make teacher)"
        vlm_cfg = VLMConfig(backend="coca", model=config.teacher.model, pretrained=str(teacher))
    what = f"{vlm_cfg.backend}:{vlm_cfg.model}" + (f" ({vlm_cfg.pretrained})" if vlm_cfg.pretrained else "")
    if encoder_mismatch(required_encoder(vlm_cfg), config.encoder) is not None:
        return None, f"{what} n/a (it needs another encoder)"
    return build_vlm(vlm_cfg), what


def resolve_budget_list(budgets: Optional[list], num_tokens: int, counts: bool = True) -> list:
    if budgets is not None:
        return budgets
    return list(DEFAULT_RATIOS) + (list(LLAVA15_COUNTS) if num_tokens == 576 and counts else [])


def evaluate_group(group: dict, selectors: list[str], budgets: Optional[list], max_samples: Optional[int],
                   seed: int, geometry: str, log=print) -> list[dict]:
    """All rows of one encoder group (see the module docstring)."""
    from tokensel.datamodules.datamodule import FeatureDataModule
    from tokensel.experiments.flops import GEOMETRIES, flops_report
    from tokensel.experiments.metrics import evidence_recall, keep_mask, psnr, token_coverage
    from tokensel.experiments.stats import MetricAccumulator
    from tokensel.selectors.baselines import BASELINES
    from tokensel.selectors.catalog import baseline_names, build_baseline
    from tokensel.selectors.budget import resolve_budget
    from tokensel.selectors.inference import CheckpointError, SelectionContext

    config = group["config"]
    if any(BASELINES.get(n).needs_cls_attention for n in selectors if n in BASELINES) \
            and config.data.cls_attention_layer is None:
        config.data.cls_attention_layer = -2
    datamodule = FeatureDataModule(config.data, config.encoder, seed)
    if not datamodule.has_val:
        raise EvalError(f"{datamodule.root}: no {config.data.val_split!r} split to evaluate on")
    dims = datamodule.dims
    for name, net, _ in group["trained"]:
        if net.dims.as_dict() != dims.as_dict():
            raise CheckpointError(f"{name} was trained on features {net.dims.as_dict()}, "
                                  f"the eval encoder {config.encoder.name} gives {dims.as_dict()}")
    candidates = [(n, build_baseline(n, dims.grid, seed)) for n in selectors if n in baseline_names()]
    candidates += [(n, net) for n, net, _ in group["trained"] if n in selectors]
    across = config.data.views == "anyres" and config.data.view_selection == "across"
    budget_list = resolve_budget_list(budgets, dims.num_tokens, counts=not across)
    ks = [resolve_budget(b, dims.num_tokens) for b in budget_list]

    vlm, vlm_cfg = ntp_vlm(config, group["trained"])
    log(f"[eval] encoder {config.encoder.name}: {dims.num_tokens} tokens x {dims.dim}; "
        f"{len(candidates)} selectors x {len(ks)} budgets; NTP metric: {vlm_cfg}")

    unique_ks = sorted(set(ks))  # a ratio and a count may name the same K: measure it once
    if across and any(not isinstance(b, float) for b in budget_list):
        raise EvalError(f"data.view_selection=across: budgets must be keep ratios, not counts "
                        f"({', '.join(str(b) for b in budget_list if not isinstance(b, float))}): "
                        "a count of an image's V x N tokens would mean another ratio for every view count")
    if across:
        log("[eval] anyres views, selected across each image's views: budgets count all its V x N tokens; "
            "ntp_increase and psnr are per view, so n/a here")
    acc = {(name, k): MetricAccumulator() for name, _ in candidates for k in unique_ks}
    seen = 0
    with torch.no_grad():
        for raw in datamodule.val_dataloader():
            if max_samples is not None and seen >= max_samples:
                break
            batch = datamodule.features(raw)
            if max_samples is not None and seen + len(batch) > max_samples:
                batch = batch.head(max_samples - seen)
            seen += len(batch)
            if across:
                score_across_views(batch, candidates, {k: b for b, k in zip(budget_list, ks)}, acc)
                log(f"[eval] {seen} held-out views", end="\r")
                continue
            full = vlm.ntp_loss(batch.features, batch.prompt, batch.target).per_sample if vlm is not None else None
            context = SelectionContext(cls_attention=batch.cls_attention)
            for name, selector in candidates:
                for k in unique_ks:
                    indices, kept = selector.select(batch.features, k, context=context)
                    mask = keep_mask(indices, dims.num_tokens)
                    a = acc[(name, k)]
                    if batch.answer_tokens is not None:
                        a.add("recall", evidence_recall(mask, batch.answer_tokens, batch.has_answer_box))
                    a.add("coverage", token_coverage(batch.features, mask))
                    if full is not None:
                        a.add("ntp_increase", vlm.ntp_loss(kept, batch.prompt, batch.target, indices=indices).per_sample
                              - full)
                    image = selector.image_from_kept(batch.features, mask)
                    if image is not None:
                        a.add("psnr", psnr(image, batch.image))
            log(f"[eval] {seen} held-out samples", end="\r")
    log(f"[eval] {seen} held-out samples from {datamodule.root}")
    geo = GEOMETRIES[geometry]
    rows = []
    for name, selector in candidates:
        for budget, k in zip(budget_list, ks):
            ratio = k / dims.num_tokens
            summary = acc[(name, k)].summary()
            # The sampler term: the selector's own layers at the encoder's width (baselines: none).
            flops = flops_report(geo, ratio, sampler_layers=selector.sampler_layers)
            row = {"encoder": config.encoder.name, "selector": name, "budget": str(budget), "keep_ratio": ratio,
                   "k": k, "samples": seen}
            for metric in METRICS:
                row[metric] = summary.get(metric, (float("nan"), float("nan"), 0))
            row.update({f"{geometry}_{key}": flops[key] for key in FLOPS_COLUMNS})
            rows.append(row)
    return rows


def write_tensorboard(rows: list[dict], out_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir)) as writer:
        for row in rows:
            step = int(round(1000 * row["keep_ratio"]))  # x-axis: keep ratio in per mille
            for metric in METRICS:
                mean, _, n = row[metric]
                if n:
                    writer.add_scalar(f"eval/{metric}/{row['selector']}@{row['encoder']}", mean, step)


def main(argv: Optional[list[str]] = None) -> int:
    from tokensel.experiments.config import load_config
    from tokensel.experiments.report import plot_metrics, write_table
    from tokensel.selectors.budget import parse_budgets
    from tokensel.selectors.catalog import all_names, baseline_names, trained_names

    parser = ArgumentParser(prog="python -m tokensel.experiments.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--selectors", default="", help="comma list (default: all baselines + trained runs)")
    parser.add_argument("--ckpts", default="", help="comma list of checkpoints (default: newest per selector)")
    parser.add_argument("--budgets", default="", help="comma list of keep ratios (0-1] and/or token counts")
    parser.add_argument("--geometry", default="llava_next", choices=("llava_next", "llava15"),
                        help="VLM geometry for FLOPs")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on held-out samples")
    parser.add_argument("--out", default=None, help="eval folder (default: eval/<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="data.* / encoder.* / run.root overrides, key=value")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    started = time.time()
    base = load_config("gumbel_ae", overrides=[o for o in args.overrides if o.startswith(("data.", "run."))])
    chosen = [s.strip() for s in args.selectors.split(",") if s.strip()] or None
    unknown = [s for s in chosen or [] if s not in all_names()]
    if unknown:
        raise EvalError(f"SELECTORS: unknown {', '.join(unknown)}; choose from {', '.join(all_names())}")
    ckpt_paths = [Path(p.strip()) for p in args.ckpts.split(",") if p.strip()]
    if not ckpt_paths:
        wanted = [n for n in trained_names() if chosen is None or n in chosen]
        ckpt_paths = newest_checkpoints(Path(base.run.root), wanted)
    trained = [load_trained(p) for p in ckpt_paths]
    if chosen is None:
        chosen = baseline_names() + sorted({name for name, _, _ in trained})
    missing = [s for s in chosen if s in trained_names() and s not in {n for n, _, _ in trained}]
    if missing:
        raise EvalError(f"no checkpoint for {', '.join(missing)} under {base.run.root}/; train it or pass CKPTS=")
    budgets = parse_budgets(args.budgets) or None
    if base.data.root is None:
        from tokensel.datamodules.datamodule import DEFAULT_DATA_ROOT
        from tokensel.datamodules.synthetic import ensure_default_corpus

        ensure_default_corpus(DEFAULT_DATA_ROOT)
    rows = []
    for group in build_groups(trained, base, [o for o in args.overrides if o.startswith(("data.", "encoder."))]):
        rows += evaluate_group(group, chosen, budgets, args.max_samples, args.seed, args.geometry)
    out_dir = Path(args.out or f"eval/{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_table(rows, out_dir, "results")
    encoders = sorted({row["encoder"] for row in rows})
    plots = []
    for encoder in encoders:  # one set of plots per encoder: rows of different features don't share axes
        folder = out_dir if len(encoders) == 1 else out_dir / encoder.replace(":", "_").replace("/", "_")
        plots += plot_metrics([row for row in rows if row["encoder"] == encoder], folder)
    write_tensorboard(rows, out_dir)
    print(md_path.read_text())
    print(f"eval folder: {out_dir}  ({csv_path.name}, {md_path.name}, {len(plots)} plots, TensorBoard events; "
          f"{time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
