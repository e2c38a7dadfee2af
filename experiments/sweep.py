"""Ablation sweeps: ``make sweep SWEEP=experiments/sweeps/depth.yaml [SEEDS=0,1,2] [ARGS="key=value ..."]``.

    python -m tokensel.experiments.sweep SWEEP.yaml [--seeds 0,1,2] [--out DIR] [--dry-run] [key=value ...]

A sweep file (unknown keys are errors)::

    name: depth                      # its folder: <out>/<name>/ (default: the file's stem)
    selector: gumbel_ae              # the registered selector every run trains
    base: ../gumbel_ae.yaml          # a train config YAML, relative to this file
                                     #   (default: experiments/<selector>.yaml)
    config:                          # train-config overrides on top of base (dotted keys)
      trainer.max_epochs: 4
    axes:                            # dotted train-config keys -> the values to try
      selector.depth: [1, 2, 3, 4, 5, 6, 7, 8]
    seeds: [0]
    budgets: [0.111, 0.222, 0.4]     # eval keep ratios (0, 1] or token counts
    eval_max_samples: null           # cap on held-out samples per eval
    val_metrics: [val/feat_recon]    # training's val/* scalars in the table (default: all)
    report: ablation                 # ablation | collapse (experiments/collapse.py)
    out: sweeps

Runs are the Cartesian product of the axes, times the seeds. Each is one
``python -m tokensel.experiments.train`` process (so ``trainer.strategy=ddp`` works inside a
sweep) on the sweep's ``base.yaml`` plus the run's axis values and seed, writing
``<out>/<name>/runs/<run>/train/``; ``python -m tokensel.experiments.evaluate`` then scores its
``last.ckpt`` on the held-out split at ``budgets``. Command-line ``key=value`` overrides join
``config``; ``--seeds`` replaces ``seeds``.

Resume: re-running the same command skips runs whose ``status.json`` says ``done``, resumes an
interrupted run from its ``last.ckpt`` and retries failed ones. A failed run is recorded with
its error line and the sweep goes on. The folder keeps the resolved base config: a sweep whose
base differs (another ``base``, ``config`` or ``key=value``) is refused, naming the first key
that differs, so one table never mixes base configs.

Output in ``<out>/<name>/`` (the paths are printed): ``results.csv``/``results.md`` (one row
per grid point x budget, mean ± std over seeds), ``runs.csv`` (every run x budget), one PNG
per swept axis, and TensorBoard (training curves under ``runs/``, hparams under ``hparams/``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

SWEEP_KEYS = ("name", "selector", "base", "config", "axes", "seeds", "budgets", "eval_max_samples",
              "val_metrics", "report", "out")
REPORTS = ("ablation", "collapse")
OWNED_KEYS = ("seed", "run.root", "run.name", "run.version", "run.resume")  # set per run by the sweep
EVAL_METRICS = ("recall", "coverage", "psnr", "ntp_increase")
SWEEP_DEFAULTS = {"trainer.enable_progress_bar": False}  # runs log to a file; the sweep prints progress


class SweepError(ValueError):
    """A mistake in a sweep file or command line: one line, naming the file and key."""


@dataclass
class Sweep:
    file: Path
    name: str
    selector: str
    base: Optional[Path]
    config: dict[str, Any]
    axes: dict[str, list]
    seeds: list[int]
    budgets: list
    eval_max_samples: Optional[int] = None
    val_metrics: Optional[list[str]] = None
    report: str = "ablation"
    out: Path = Path("sweeps")

    @property
    def folder(self) -> Path:
        return self.out / self.name


@dataclass
class Run:
    """One point of the grid with one seed."""

    run_id: str
    axis_values: dict[str, Any]
    seed: int
    overrides: list[str] = field(default_factory=list)

    def folder(self, sweep: Sweep) -> Path:
        return sweep.folder / "runs" / self.run_id


# ---------------------------------------------------------------------------------------------
# reading and checking
# ---------------------------------------------------------------------------------------------

def as_override(key: str, value: Any) -> str:
    """``key=value`` for the train command line; JSON is YAML, so every type survives the trip."""
    return f"{key}={json.dumps(value)}"


def parse_seeds(text: str, source: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise SweepError(f"{source}: {text!r} is not a comma list of integer seeds") from None
    if not seeds:
        raise SweepError(f"{source}: no seeds given")
    return seeds


def read_sweep(path: str | Path, seeds: Optional[list[int]] = None, out: Optional[str] = None,
               overrides: tuple[str, ...] | list[str] = ()) -> Sweep:
    """Parse and check a sweep file's own keys (the grid itself is checked by :func:`check_grid`)."""
    from omegaconf import OmegaConf

    from tokensel.experiments.config import EXPERIMENTS_DIR, ConfigError, flatten, parse_overrides
    from tokensel.selectors.registry import list_selectors

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SweepError(f"{path}:{f' line {mark.line + 1}' if mark else ''} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of sweep keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")

    selector = raw.get("selector") or "gumbel_ae"
    if selector not in list_selectors():
        raise SweepError(f"{path}: selector={selector!r} is not registered; choose from {', '.join(list_selectors())}")
    base = raw.get("base")
    if base is not None:
        base = (path.parent / str(base)).resolve()
        if not base.is_file():
            raise SweepError(f"{path}: base={raw['base']!r}: no such file {base}")
    elif (EXPERIMENTS_DIR / f"{selector}.yaml").is_file():
        base = EXPERIMENTS_DIR / f"{selector}.yaml"

    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise SweepError(f"{path}: config must be a mapping of train-config keys, got {type(config).__name__}")
    config = {**SWEEP_DEFAULTS, **flatten(config)}
    try:
        cli = flatten(OmegaConf.to_container(parse_overrides(list(overrides))))
    except ConfigError as err:
        raise SweepError(str(err)) from None
    config.update(cli)

    axes = raw.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise SweepError(f"{path}: axes must map at least one dotted config key to a list of values")
    axes = flatten(axes)
    for key, values in axes.items():
        if not isinstance(values, list):
            raise SweepError(f"{path}: axes.{key} must be a list of values, got {values!r}")
        if not values:
            raise SweepError(f"{path}: axes.{key} is empty; give it at least one value")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"{path}: axes.{key} repeats a value: {values}")
    for key in list(axes) + list(config):
        if key in OWNED_KEYS or key == "selector.name":
            raise SweepError(f"{path}: {key} is set by the sweep itself (per run); use 'selector:' and 'seeds:'")
    both = sorted(set(axes) & set(config))
    if both:
        raise SweepError(f"{path}: {both[0]} is both swept (axes) and fixed (config / key=value)")

    if seeds is None:
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SweepError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds repeat: {seeds}")

    budgets = raw.get("budgets", [0.111, 0.222, 0.4])
    if not isinstance(budgets, list) or not budgets:
        raise SweepError(f"{path}: budgets must be a non-empty list of keep ratios or token counts")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b > 1):
            raise SweepError(f"{path}: budgets: {b!r} is neither a keep ratio in (0, 1] nor a token count")

    max_samples = raw.get("eval_max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise SweepError(f"{path}: eval_max_samples={max_samples!r}: must be a positive integer or null")
    val_metrics = raw.get("val_metrics")
    if val_metrics is not None and (not isinstance(val_metrics, list) or not all(isinstance(m, str) for m in val_metrics)):
        raise SweepError(f"{path}: val_metrics must be a list of val/* scalar names")
    report = raw.get("report", "ablation")
    if report not in REPORTS:
        raise SweepError(f"{path}: report={report!r}: expected one of {', '.join(REPORTS)}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SweepError(f"{path}: name={name!r}: use letters, digits, '_', '.', '-'")
    return Sweep(file=path, name=name, selector=selector, base=base, config=config, axes=axes, seeds=list(seeds),
                 budgets=budgets, eval_max_samples=max_samples, val_metrics=val_metrics, report=report,
                 out=Path(out or raw.get("out") or "sweeps"))


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Run-name labels: each key's last part (``selector.depth`` -> ``depth``) unless two clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _label(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "x"


def expand(sweep: Sweep) -> list[Run]:
    """The run list: every combination of axis values (first axis slowest), then every seed."""
    keys = list(sweep.axes)
    short = _short_keys(keys)
    runs = []
    for combo in itertools.product(*(sweep.axes[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in sweep.seeds:
            run_id = "_".join([f"{short[k]}={_label(v)}" for k, v in values.items()] + [f"seed={seed}"])
            runs.append(Run(run_id, values, seed, [as_override(k, v) for k, v in values.items()]))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SweepError(f"{sweep.file}: two axis values give the same run name {dup!r}; make them distinct")
    return runs


def base_overrides(sweep: Sweep) -> list[str]:
    return [as_override(k, v) for k, v in sweep.config.items()]


def check_grid(sweep: Sweep, runs: list[Run]) -> dict:
    """Build every run's config (keys, types, ranges) before anything runs; return the resolved
    base config (the grid's shared part), which the sweep folder records."""
    from tokensel.experiments.config import ConfigError, load_config, to_container

    base = [as_override(k, v) for k, v in sweep.config.items()]
    base_file = str(sweep.base) if sweep.base else None
    try:
        resolved = to_container(load_config(sweep.selector, base_file, base))
    except ConfigError as err:
        raise SweepError(f"{sweep.file}: config: {err}") from None
    for key, values in sweep.axes.items():  # each value alone first: the error names it
        for value in values:
            try:
                load_config(sweep.selector, base_file, base + [as_override(key, value)])
            except ConfigError as err:
                raise SweepError(f"{sweep.file}: axes.{key}={value!r}: {err}") from None
    for run in runs:
        try:  # then each run's combination (cross-field checks such as q < p)
            load_config(sweep.selector, base_file, base + run.overrides + [f"seed={run.seed}"])
        except ConfigError as err:
            raise SweepError(f"{sweep.file}: run {run.run_id}: {err}") from None
    for key in (*sweep.axes, *OWNED_KEYS):  # per-run keys are not part of the shared base
        _drop(resolved, key)
    return resolved


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.get(p) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(last, None)


def first_difference(old: Any, new: Any, prefix: str = "") -> Optional[str]:
    """The first dotted key where two config trees differ, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def prepare_folder(sweep: Sweep, resolved_base: dict) -> Path:
    """Create (or re-open) the sweep folder; refuse a different base. Returns ``base.yaml``."""
    from omegaconf import OmegaConf

    from tokensel.experiments.config import read_yaml

    folder = sweep.folder
    record = folder / "sweep.json"
    if record.is_file():
        stored = json.loads(record.read_text())
        diff = first_difference(stored.get("resolved_base"), resolved_base)
        if stored.get("selector") != sweep.selector:
            diff = f"selector: {stored.get('selector')!r} -> {sweep.selector!r}"
        if diff:
            raise SweepError(f"{folder} holds a sweep with another base config ({diff}); pass --out DIR for a "
                             f"new sweep, or move that folder away")
    folder.mkdir(parents=True, exist_ok=True)
    layers = read_yaml(sweep.base) if sweep.base else {}
    merged = OmegaConf.merge(layers, OmegaConf.from_dotlist(base_overrides(sweep)),
                             {"selector": {"name": sweep.selector}})
    base_yaml = folder / "base.yaml"
    base_yaml.write_text(f"# written by the sweep {sweep.file}; every run = this + its axis values and seed\n"
                         + yaml.safe_dump(OmegaConf.to_container(merged), sort_keys=False))
    record.write_text(json.dumps({"sweep_file": str(sweep.file), "selector": sweep.selector,
                                  "resolved_base": resolved_base}, indent=1, sort_keys=True))
    return base_yaml


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def read_status(run: Run, sweep: Sweep) -> Optional[dict]:
    return _read_json(run.folder(sweep) / "status.json")


def is_done(run: Run, sweep: Sweep) -> bool:
    status = read_status(run, sweep)
    return bool(status) and status.get("status") == "done" and status.get("overrides") == run.overrides


def _wait(process: subprocess.Popen) -> int:
    """Wait for a child; on Ctrl-C let it finish its own shutdown (it saves last.ckpt) first."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:  # a terminal's Ctrl-C reached the child too; a signal sent to this process alone did not
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        raise


def _run_logged(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return _wait(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))


def error_line(log_path: Path) -> str:
    """The line that says why a run failed: our one-line ``error:``, else the last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def read_eval(csv_path: Path) -> dict[str, dict[str, float]]:
    """``results.csv`` of one eval -> ``{budget: {metric: mean}}`` (missing metrics: nan)."""
    out = {}
    with open(csv_path) as fh:
        for row in csv.DictReader(fh):
            out[row["budget"]] = {m: float(row[f"{m}_mean"]) if row.get(f"{m}_mean") else math.nan
                                  for m in EVAL_METRICS}
    return out


def execute(sweep: Sweep, run: Run, base_yaml: Path, log=print) -> dict:
    """Train, then evaluate, one run; write and return its ``status.json`` record."""
    folder = run.folder(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    train_dir = folder / "train"
    record = {"run_id": run.run_id, "axes": run.axis_values, "seed": run.seed, "overrides": run.overrides}

    def finish(status: str, **extra) -> dict:
        record.update(status=status, finished=time.strftime("%Y-%m-%d %H:%M:%S"), **extra)
        (folder / "status.json").write_text(json.dumps(record, indent=1))
        return record

    trained = _read_json(train_dir / "metrics.json")
    if not trained or trained.get("interrupted"):
        cmd = [sys.executable, "-m", "tokensel.experiments.train", "--config", str(base_yaml), *run.overrides,
               f"seed={run.seed}", f"run.root={sweep.folder / 'runs'}", f"run.name={run.run_id}", "run.version=train"]
        if (train_dir / "checkpoints" / "last.ckpt").is_file():
            cmd.append("run.resume=last")
            log("  resuming from its last.ckpt")
        if _run_logged(cmd, folder / "train.log") != 0:
            return finish("failed", stage="train", error=error_line(folder / "train.log"))
        trained = _read_json(train_dir / "metrics.json")
        if not trained or trained.get("interrupted"):
            return finish("failed", stage="train", error="training stopped before its end (interrupted)")
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    evaluation = {}
    eval_s = 0.0
    if sweep.report == "ablation":
        started = time.time()
        cmd = [sys.executable, "-m", "tokensel.experiments.evaluate", "--selectors", sweep.selector, "--ckpts",
               str(ckpt), "--budgets", ",".join(str(b) for b in sweep.budgets), "--out", str(folder / "eval")]
        if sweep.eval_max_samples:
            cmd += ["--max-samples", str(sweep.eval_max_samples)]
        if _run_logged(cmd, folder / "eval.log") != 0:
            return finish("failed", stage="eval", error=error_line(folder / "eval.log"))
        evaluation = read_eval(folder / "eval" / "results.csv")
        eval_s = round(time.time() - started, 2)
    return finish("done", train_s=trained["wall_s"], eval_s=eval_s, global_step=trained["global_step"],
                  metrics=trained["metrics"], collapse_step=trained.get("collapse_step"), eval=evaluation)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_hparams(sweep: Sweep, run: Run, record: dict) -> None:
    """TensorBoard hparams for one finished run: its axis values and seed against its results."""
    from torch.utils.tensorboard import SummaryWriter

    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in run.axis_values.items()}
    hparams["seed"] = run.seed
    metrics = {f"sweep/{m}@{b}": v for b, row in record.get("eval", {}).items() for m, v in row.items()
               if not math.isnan(v)}
    metrics.update({f"sweep/{k}": v for k, v in record["metrics"].items() if k.startswith("val/")})
    metrics["sweep/train_s"] = record["train_s"]
    folder = sweep.folder / "hparams" / run.run_id
    shutil.rmtree(folder, ignore_errors=True)  # a re-evaluated run replaces its entry
    with SummaryWriter(str(folder)) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")


# ---------------------------------------------------------------------------------------------
# the ablation report
# ---------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` of the finite values; std is nan for n = 1, both nan for n = 0."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


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


def aggregate(rows: list[dict], group_keys: list[str], exclude: tuple[str, ...] = ("seed",)) -> list[dict]:
    """Rows grouped by ``group_keys`` (first-seen order); every other numeric column becomes
    ``(mean, std, n)`` over the group's rows (the seeds), via :func:`mean_std`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in group_keys]), []).append(row)
    value_cols: list[str] = []
    for row in rows:
        value_cols += [c for c in row if c not in group_keys and c not in exclude and c not in value_cols]
    out = []
    for members in groups.values():
        agg = {k: members[0].get(k) for k in group_keys}
        for col in value_cols:
            nums = [m[col] for m in members if isinstance(m.get(col), (int, float)) and not isinstance(m.get(col), bool)]
            if nums or all(col not in m for m in members):
                agg[col] = mean_std(nums)
        out.append(agg)
    return out


def plot_axes(sweep: Sweep, agg_rows: list[dict], dpi: int = 100) -> list[Path]:
    """Per swept axis: each metric against the axis value, one line per budget, ± std over seeds.
    With several axes, one PNG per combination of the other axes' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            fig, panels = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
            for ax in panels.flat[len(metrics):]:
                ax.axis("off")
            budgets = list(dict.fromkeys(r["budget"] for r in rows))
            for ax, metric in zip(panels.flat, metrics):
                # training's val/* scalars do not depend on the eval budget: one line
                for budget in (budgets if metric in EVAL_METRICS else budgets[:1]):
                    pts = sorted((xs_of[json.dumps(r[axis])], *r[metric][:2]) for r in rows
                                 if r["budget"] == budget and r.get(metric, (0, 0, 0))[2])
                    if not pts:
                        continue
                    x, mean, std = zip(*pts)
                    err = [0 if math.isnan(s) else s for s in std]
                    label = f"budget {budget}" if metric in EVAL_METRICS and budget != "-" else None
                    ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label,
                                color=None if label else "k")
                ax.set_title(metric, fontsize=10)
                ax.set_xlabel(axis)
                if not numeric or all(isinstance(v, int) for v in values):
                    ax.set_xticks([xs_of[json.dumps(v)] for v in values], [str(v) for v in values])
                ax.grid(alpha=0.3)
            if metrics and panels[0][0].get_legend_handles_labels()[1]:
                panels[0][0].legend(fontsize=8)
            where = ", ".join(f"{k}={v}" for k, v in fixed.items())
            fig.suptitle(f"sweep {sweep.name}: {axis}" + (f" ({where})" if where else "")
                         + f" — mean ± std over seeds {sweep.seeds}", fontsize=10)
            fig.tight_layout()
            suffix = "".join(f"__{_short_keys(others)[k]}={_label(v)}" for k, v in fixed.items())
            path = sweep.folder / f"{_label(axis)}{suffix}.png"
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            paths.append(path)
    return paths


def failed_runs_section(failed: list[dict]) -> list[str]:
    """Markdown lines listing failed runs with their stage and error (none: no lines)."""
    if not failed:
        return []
    return ["", "## Failed runs", ""] + [f"- `{f['run_id']}` ({f.get('stage', '?')}): {f.get('error', '')}"
                                         for f in failed]


def report_ablation(sweep: Sweep, records: list[dict], failed: list[dict]) -> list[Path]:
    from tokensel.experiments.metrics import markdown_table, write_table

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
    plots = plot_axes(sweep, agg)
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


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def run_sweep(sweep: Sweep, dry_run: bool = False, log=print) -> int:
    """Check the whole grid, run what is not done, report. Returns the exit status."""
    runs = expand(sweep)
    resolved = check_grid(sweep, runs)
    done = [r for r in runs if is_done(r, sweep)]
    todo = [r for r in runs if r not in done]
    grid = " x ".join(f"{len(v)} {k}" for k, v in sweep.axes.items())
    log(f"sweep {sweep.name}: {len(runs)} runs ({grid} x {len(sweep.seeds)} seeds); {len(done)} done, "
        f"{len(todo)} to run -> {sweep.folder}/")
    if dry_run:
        for run in runs:
            log(f"  {'done' if run in done else 'todo'}  {run.run_id}  {' '.join(run.overrides)} seed={run.seed}")
        return 0
    base_yaml = prepare_folder(sweep, resolved)
    started = time.time()
    try:
        for i, run in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {run.run_id}: training (log: {run.folder(sweep) / 'train.log'})", flush=True)
            record = execute(sweep, run, base_yaml, log)
            if record["status"] == "done":
                write_hparams(sweep, run, record)
                scores = "; ".join(f"{m} {v:.3f}@{b}" for b, row in record["eval"].items()
                                   for m, v in row.items() if m == "recall" and not math.isnan(v))
                log(f"      done: trained in {record['train_s']:.0f}s" + (f", {scores}" if scores else ""), flush=True)
            else:
                log(f"      FAILED ({record['stage']}): {record['error']}", flush=True)
    except KeyboardInterrupt:
        log(f"\ninterrupted: re-run the same command to resume ({sweep.folder}/)")
        return 130
    statuses = [(r, read_status(r, sweep)) for r in runs]
    records = [s for r, s in statuses if s and s.get("status") == "done" and s.get("overrides") == r.overrides]
    failed = [s for r, s in statuses if s and s.get("status") == "failed"]
    if sweep.report == "collapse":
        from tokensel.experiments.collapse import report_collapse

        outputs = report_collapse(sweep, resolved, records, failed)
    else:
        outputs = report_ablation(sweep, records, failed)
    minutes, secs = divmod(int(time.time() - started), 60)
    log("\n" + outputs[0].read_text())
    log(f"sweep {sweep.name}: {len(records)}/{len(runs)} runs done, {len(failed)} failed ({minutes}m{secs:02d}s)")
    for path in outputs:
        log(f"  {path}")
    log(f"TensorBoard:  .venv/bin/tensorboard --logdir {sweep.folder}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    from tokensel.experiments.config import ConfigError
    from tokensel.experiments.train import quiet_known_warnings

    parser = argparse.ArgumentParser(prog="python -m tokensel.experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", help="the sweep YAML (experiments/sweeps/*.yaml)")
    parser.add_argument("--seeds", default="", help="comma list; replaces the file's seeds")
    parser.add_argument("--out", default=None, help="parent folder of the sweep folder (default: the file's out)")
    parser.add_argument("--dry-run", action="store_true", help="check the grid and list its runs; run nothing")
    parser.add_argument("overrides", nargs="*", help="train-config key=value for every run")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    try:
        if not args.sweep:
            raise SweepError("no sweep file: make sweep SWEEP=experiments/sweeps/depth.yaml")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise SweepError(f"{bad[0]!r} is not key=value (ARGS= takes train-config overrides)")
        seeds = parse_seeds(args.seeds, "SEEDS") if args.seeds.strip() else None
        sweep = read_sweep(args.sweep, seeds, args.out, args.overrides)
        return run_sweep(sweep, args.dry_run)
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
