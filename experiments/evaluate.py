"""Compare selectors at matched budgets on held-out data: ``make eval``.

    python -m tokensel.experiments.evaluate [--selectors a,b] [--ckpts p1,p2] [--budgets 0.1,0.25,64]
                                            [--out DIR] [key=value ...]

What is compared (``--selectors``, default: every baseline plus every trained selector that
has a run under ``runs/``):

- the training-free baselines (``random``, ``uniform``, ``l2norm``, ``divprune``,
  ``cls_attention``, ``dart``, ``pool``, ``visionzip``, ``cdpruner``; ``docs/baselines.md``), with
  their options as ``baselines.<name>.<key>=value`` overrides, and
- trained selectors: ``--ckpts`` paths (always evaluated, whatever ``--selectors`` names), or the
  newest ``checkpoints/last.ckpt`` of each trained selector under ``run.root``.

Checkpoints are grouped by the encoder and the held-out data they were trained on; each group is
evaluated on its own encoder's features of its own held-out split (``data.val_split``), with the
baselines beside it, so every row of a group sees the same tokens. ``key=value`` overrides
(``data.*``, ``encoder.*``) apply to every group; a checkpoint that does not fit the features is a
one-line error naming the mismatch.

Every selector answers the same ``select(features, budget, context=...)``; what a row needs beyond
it comes from the selector's optional methods (``image_from_kept``, ``sampler_layers``,
``vlm_config``; see ``selectors/inference.py``), never from its kind.

Metrics per selector x budget (mean ± 95 % CI over samples; ``selectors/metrics.py``, ``common/stats.py``):

- ``recall``: the share of the answer box's tokens that are kept (samples with a box only;
  ``n/a`` when the split has none); for a merging selector (``pool``, ``visionzip``) a token counts
  as kept in proportion to the kept tokens spent on it (``SelectorNet.kept_share``);
- ``coverage``: over dropped tokens, the mean of the max cosine similarity to a kept token
  (merging selectors: weighted by how much of each token was dropped);
- ``ntp_increase``: the frozen VLM's NTP loss with only the kept tokens minus with all tokens.
  The VLM is a trained vp_noise's own, else the corpus teacher of the group's encoder when it is
  built (``make teacher``; ``experiments/teacher.py``); ``n/a`` when there is none or the VLM needs
  another encoder;
- ``psnr``: the auto-encoder selectors' image reconstruction from the kept tokens;
- why a selector wins or loses (``experiments/eval_group.py``): ``auroc``, the evidence AUROC of
  its ranking (0.5 is chance, below it the ranking points away from the evidence);
  ``<objective>_loss_vs_random``, each trained objective's own loss on the kept tokens minus on
  random ones, paired (negative: better than random on that objective); for vp_noise,
  ``alpha_on_topk`` and ``ntp_soft_minus_hard`` (its train/test gap);
- LLM and sampler FLOPs for a named VLM geometry (``--geometry``, LLaVA-NeXT by default; the
  LLM's FFN counts LLaMA's three gated matrices, see ``flops.llm_flops``; the sampler counts
  the selector's own layers at the encoder width) and the prefill reduction.

A query-aware selector (``cdpruner``) reads each sample's question (a caption sample's: LLaVA's
caption instruction) embedded by the text tower of the group's ``open_clip:`` encoder
(:func:`selection_context`); with an encoder that has none (timm, DINOv2, ...) its rows are
``n/a``, never a query-agnostic stand-in. ``pool`` keeps at most ``k`` cells; its ``k`` column is
the count it kept.


A trained selector with a training budget (budget-matched gumbel_ae, vp_noise) is scored at that
budget unless ``--budgets`` is given; its rows then carry ``trained_at`` and a note is printed.

Output: ``results.csv``, ``results.md``; ``headroom.csv``/``.md`` (how far each loss can move
with the choice of tokens, from ``--headroom-draws`` random keep sets per sample, and whether that
is above the noise floor, i.e. whether the testbed can separate selectors on it at all);
``samples.csv`` (every per-sample value, so each paired test can be redone); one PNG per metric
(per encoder group, in a subfolder when there are several) and TensorBoard scalars in the eval
folder, whose path is printed.
"""

from __future__ import annotations

import copy
import csv
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.datamodules.config import DataConfig, data_root
from tokensel.datamodules.synthetic import ensure_data
from tokensel.experiments.config import baseline_options, load_config, parse_overrides
from tokensel.experiments.eval_group import METRICS, EvalError, evaluate_group
from tokensel.experiments.report import plot_metrics, write_table
from tokensel.selectors.budget import parse_budgets
from tokensel.selectors.catalog import all_names, baseline_names, load_selector, trained_names


def newest_checkpoints(run_root: Path, names: list[str]) -> list[Path]:
    """The newest ``last.ckpt`` under ``run_root/<name>/*/checkpoints/`` for each trained name."""
    found = []
    for name in names:
        ckpts = sorted((run_root / name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            found.append(ckpts[-1])
    return found


def load_trained(path: Path) -> dict:
    """A checkpoint's or exported folder's ``name``, ``net``, run ``config`` and ``path``; one-line
    errors for foreign files."""
    net = load_selector(path)
    if not net.run_config:
        raise EvalError(f"{path}: the checkpoint has no run config (encoder unknown); retrain with this version")
    return {"name": net.config.name, "net": net, "config": net.run_config, "path": path}


def label_trained(trained: list[dict]) -> list[dict]:
    """Give each checkpoint its row name, ``label``: the objective's name, or, where several
    checkpoints share an objective, the name with the run it comes from
    (``gumbel_ae[gumbel_ae_lr1e-3/version_0]``), so that no two checkpoints share a row."""
    def where(path: Path, detail: int) -> str:
        run = path.parents[1] if path.parent.name == "checkpoints" else path
        return [f"{run.parent.name}/{run.name}", f"{run.parent.name}/{run.name}/{path.stem}", str(path)][detail]

    names = [t["name"] for t in trained]
    for name in set(names):
        group = [t for t in trained if t["name"] == name]
        if len(group) == 1:
            group[0]["label"] = name
            continue
        detail = next(d for d in range(3) if len({where(Path(t["path"]), d) for t in group}) == len(group))
        for t in group:
            t["label"] = f"{name}[{where(Path(t['path']), detail)}]"
    return trained


def encoder_key(run_config: dict) -> tuple:
    enc = run_config["encoder"]
    return (enc["name"], enc["pretrained"], enc["layer"], enc["norm"], enc["image_size"], enc.get("init_seed", 0),
            run_config["data"]["recon_size"])


def held_out_root(run_config: dict, base_data: DataConfig, data_given: bool) -> str:
    """A run's held-out shards: those named to make eval (data.root= or data.corpus=), else the run's own."""
    if data_given:
        return str(data_root(base_data))
    return str(data_root(DataConfig(**{k: v for k, v in run_config["data"].items() if k in ("root", "corpus")})))


def build_groups(trained: list, base_config, overrides: list[str]) -> list[dict]:
    """Checkpoints grouped by encoder and held-out data; each group gets its own data/encoder config."""
    cli = parse_overrides(overrides)
    forced = any(o.startswith("encoder.") for o in overrides)
    data_given = any(o.startswith(("data.root=", "data.corpus=")) for o in overrides)
    groups: dict[tuple, dict] = {}
    for t in trained:
        features = ("forced",) if forced else encoder_key(t["config"])
        key = (*features, held_out_root(t["config"], base_config.data, data_given))
        group = groups.setdefault(key, {"run_config": t["config"], "trained": []})
        group["trained"].append(t)
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


def write_samples(samples: list[tuple], path: Path) -> None:
    """Every per-sample value: one row per (encoder, data, selector, k, metric, sample key)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["encoder", "data", "selector", "k", "metric", "key", "value"])
        writer.writerows((*group, sel, k, metric, key, repr(value)) for *group, sel, k, metric, key, value in samples)


def group_labels(rows: list[dict]) -> dict[tuple, str]:
    """(encoder, data) -> a label: the encoder's name, with the data's folder when several are evaluated."""
    groups = sorted({(row["encoder"], row["data"]) for row in rows})
    several = len({data for _, data in groups}) > 1
    return {(encoder, data): f"{encoder}@{data}" if several else encoder for encoder, data in groups}


def write_tensorboard(rows: list[dict], labels: dict[tuple, str], out_dir: Path) -> None:
    with SummaryWriter(str(out_dir)) as writer:
        for row in rows:
            step = int(round(1000 * row["keep_ratio"]))  # x-axis: keep ratio in per mille
            label = labels[(row["encoder"], row["data"])]
            for metric in METRICS:
                mean, _, n = row[metric]
                if n:
                    writer.add_scalar(f"eval/{metric}/{row['selector']}@{label}", mean, step)


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--selectors", default="", help="comma list (default: all baselines + trained runs)")
    parser.add_argument("--ckpts", default="", help="comma list of checkpoints (default: newest per selector)")
    parser.add_argument("--budgets", default="", help="comma list of keep ratios (0-1] and/or token counts")
    parser.add_argument("--geometry", default="llava_next", choices=("llava_next", "llava15"),
                        help="VLM geometry for FLOPs")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on held-out samples")
    parser.add_argument("--out", default=None, help="eval folder (default: eval/<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--headroom-draws", type=int, default=8,
                        help="random keep sets per sample for the headroom table (>= 2)")
    parser.add_argument("overrides", nargs="*", help="data.* / encoder.* / run.root / baselines.<name>.* overrides, "
                                                     "key=value")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    started = time.time()
    if args.headroom_draws < 2:
        raise EvalError(f"--headroom-draws={args.headroom_draws}: need at least 2 random keep sets")
    base = load_config("gumbel_ae", overrides=[o for o in args.overrides if o.startswith(("data.", "run."))])
    chosen = [s.strip() for s in args.selectors.split(",") if s.strip()] or None
    unknown = [s for s in chosen or [] if s not in all_names()]
    if unknown:
        raise EvalError(f"SELECTORS: unknown {', '.join(unknown)}; choose from {', '.join(all_names())}")
    ckpt_paths = [Path(p.strip()) for p in args.ckpts.split(",") if p.strip()]
    if not ckpt_paths:
        wanted = [n for n in trained_names() if chosen is None or n in chosen]
        ckpt_paths = newest_checkpoints(Path(base.run.root), wanted)
    repeated = sorted({str(p) for p in ckpt_paths if ckpt_paths.count(p) > 1})
    if repeated:
        raise EvalError(f"CKPTS: {', '.join(repeated)} given more than once")
    trained = label_trained([load_trained(p) for p in ckpt_paths])
    if chosen is None:
        chosen = baseline_names() + sorted({t["name"] for t in trained})
    elif args.ckpts.strip():  # a checkpoint named on the command line is always evaluated
        chosen += sorted({t["name"] for t in trained} - set(chosen))
    missing = [s for s in chosen if s in trained_names() and s not in {t["name"] for t in trained}]
    if missing:
        raise EvalError(f"no checkpoint for {', '.join(missing)} under {base.run.root}/; train it or pass CKPTS=")
    budgets = parse_budgets(args.budgets) or None
    options = baseline_options([o for o in args.overrides if o.startswith("baselines.")])
    rows, room, samples = [], [], []
    for group in build_groups(trained, base, [o for o in args.overrides if o.startswith(("data.", "encoder."))]):
        held_out = ensure_data(group["config"].data)
        group_rows, group_room, group_samples = evaluate_group(group, chosen, budgets, args.max_samples, args.seed,
                                                               args.geometry, args.headroom_draws,
                                                               options=options)
        rows += group_rows
        room += group_room
        samples += [(group["config"].encoder.name, str(held_out), *s) for s in group_samples]
    out_dir = Path(args.out or f"eval/{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_table(rows, out_dir, "results")
    room_csv, room_md = write_table(room, out_dir, "headroom", key_columns=("loss", "budget", "keep_ratio", "k"))
    write_samples(samples, out_dir / "samples.csv")
    labels = group_labels(rows)
    plots = []
    for key, label in labels.items():  # one set of plots per group: rows of different features don't share axes
        folder = out_dir if len(labels) == 1 else out_dir / label.replace(":", "_").replace("/", "_")
        plots += plot_metrics([row for row in rows if (row["encoder"], row["data"]) == key], folder)
    write_tensorboard(rows, labels, out_dir)
    print(md_path.read_text())
    if room:
        print("headroom: how far each loss moves with the choice of tokens (best of the random keep sets vs "
              "their mean), against the noise floor of two random draws")
        print(room_md.read_text())
    print(f"eval folder: {out_dir}  ({csv_path.name}, {md_path.name}, {room_csv.name}, samples.csv, {len(plots)} "
          f"plots, TensorBoard events; {time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
