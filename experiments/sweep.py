"""Ablation sweeps: ``make sweep SWEEP=experiments/sweeps/depth.yaml [SEEDS=0,1,2] [ARGS="key=value ..."]``.

    python -m tokensel.experiments.sweep SWEEP.yaml [--seeds 0,1,2] [--out DIR] [--dry-run] [key=value ...]
        [--launcher inline|slurm|local [--slurm KEY=VALUE ...] [--wait]] [--shard I/N] [--report-only]

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
                                     #   | curve (experiments/curve_report.py; axes may be empty)
    out: sweeps

``--selector NAME`` replaces the file's selector (and its default base), and suffixes the
sweep's folder with it: ``make curve SELECTOR=vp_noise`` is ``sweeps/curve_vp_noise/``.

Runs are the Cartesian product of the axes, times the seeds. Each is one
``python -m tokensel.experiments.train`` process (so ``trainer.strategy=ddp`` works inside a
sweep) on the sweep's ``base.yaml`` plus the run's axis values and seed, writing
``<out>/<name>/runs/<run>/train/``; ``python -m tokensel.experiments.evaluate`` then scores its
``last.ckpt`` on the held-out split at ``budgets``. Command-line ``key=value`` overrides join
``config``; ``--seeds`` replaces ``seeds``.

``SWEEP`` is a file, or the name of a shipped one (``depth``, ``paper/depth``: ``experiments/sweeps/``).

Many machines: ``--launcher slurm`` submits the runs still to do as one SLURM job array through
submitit (one task per run; ``--slurm timeout_min=240 --slurm gpus_per_node=8 --slurm
slurm_partition=gpu`` set the executor's parameters) and returns; ``--wait`` waits for the array
and writes the report. ``--launcher local`` is the same path on this machine (submitit's local
executor). ``--shard I/N`` (I from 0 to N-1) runs only every N-th run from the I-th, for any other
scheduler: start N commands, then run the plain command (or ``--report-only``) once they are done.
Every way writes the same run folders, so the report merges them, whoever ran them.

Resume: re-running the same command skips runs whose ``status.json`` says ``done``, resumes an
interrupted run from its ``last.ckpt`` and retries failed ones. A failed run is recorded with
its error line and the sweep goes on. The folder keeps the resolved base config: a sweep whose
base differs (another ``base``, ``config`` or ``key=value``) is refused, naming the first key
that differs, so one table never mixes base configs.

Output in ``<out>/<name>/`` (the paths are printed): ``results.csv``/``results.md`` (one row
per grid point x budget, mean ± std over seeds), ``runs.csv`` (every run x budget), one PNG
per swept axis, and TensorBoard (training curves under ``runs/``, hparams under ``hparams/``).

This module reads, checks and expands the sweep file and drives the runs; ``sweep_runner.py``
runs each one, ``sweep_report.py`` (``report: ablation``) or ``collapse.py`` (``report:
collapse``) writes the report.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from tokensel.common.cache import atomic_write
from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.common.errors import TokenselError
from tokensel.experiments.collapse import report_collapse
from tokensel.experiments.config import (EXPERIMENTS_DIR, ConfigError, flatten, load_config, parse_overrides, read_yaml,
                                         to_container)
from tokensel.experiments.curve_report import report_curve
from tokensel.experiments.sweep_report import label, report_ablation, short_keys
from tokensel.experiments.sweep_runner import (LAUNCHERS, Shard, is_done, parse_params, read_status, run_one,
                                               submit_array)
from tokensel.selectors.budget import check_budget
from tokensel.selectors.catalog import trained_names

SWEEP_KEYS = ("name", "selector", "base", "config", "axes", "seeds", "budgets", "eval_max_samples",
              "val_metrics", "report", "out")
REPORTS = ("ablation", "collapse", "curve")
OWNED_KEYS = ("seed", "run.root", "run.name", "run.version", "run.resume")  # set per run by the sweep
SWEEP_DEFAULTS = {"trainer.enable_progress_bar": False}  # runs log to a file; the sweep prints progress


class SweepError(TokenselError):
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
               overrides: tuple[str, ...] | list[str] = (), selector: Optional[str] = None) -> Sweep:
    """Parse and check a sweep file's own keys (the grid itself is checked by :func:`check_grid`).
    ``selector`` replaces the file's (``make curve SELECTOR=...``): the sweep's folder is then
    ``<name>_<selector>`` and, unless the file names a base, the base is that selector's YAML."""
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

    if selector:
        raw = {**raw, "selector": selector, "name": f"{raw.get('name') or path.stem}_{selector}"}
    selector = raw.get("selector") or "gumbel_ae"
    if selector not in trained_names():
        raise SweepError(f"{path}: selector={selector!r} is not registered; choose from {', '.join(trained_names())}")
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

    report = raw.get("report", "ablation")
    if report not in REPORTS:
        raise SweepError(f"{path}: report={report!r}: expected one of {', '.join(REPORTS)}")
    axes = raw.get("axes") or ({} if report == "curve" else None)
    if not isinstance(axes, dict) or (not axes and report != "curve"):
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
        check_budget(b, f"{path}: budgets")

    max_samples = raw.get("eval_max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise SweepError(f"{path}: eval_max_samples={max_samples!r}: must be a positive integer or null")
    val_metrics = raw.get("val_metrics")
    if val_metrics is not None and (not isinstance(val_metrics, list) or not all(isinstance(m, str) for m in val_metrics)):
        raise SweepError(f"{path}: val_metrics must be a list of val/* scalar names")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SweepError(f"{path}: name={name!r}: use letters, digits, '_', '.', '-'")
    return Sweep(file=path, name=name, selector=selector, base=base, config=config, axes=axes, seeds=list(seeds),
                 budgets=budgets, eval_max_samples=max_samples, val_metrics=val_metrics, report=report,
                 out=Path(out or raw.get("out") or "sweeps"))


def expand(sweep: Sweep) -> list[Run]:
    """The run list: every combination of axis values (first axis slowest), then every seed."""
    keys = list(sweep.axes)
    short = short_keys(keys)
    runs = []
    for combo in itertools.product(*(sweep.axes[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in sweep.seeds:
            run_id = "_".join([f"{short[k]}={label(v)}" for k, v in values.items()] + [f"seed={seed}"])
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
    base_text = (f"# written by the sweep {sweep.file}; every run = this + its axis values and seed\n"
                 + yaml.safe_dump(OmegaConf.to_container(merged), sort_keys=False))
    record_text = json.dumps({"sweep_file": str(sweep.file), "selector": sweep.selector,
                              "resolved_base": resolved_base}, indent=1, sort_keys=True)
    # atomic: the shards of one sweep may open the folder at the same moment
    atomic_write(base_yaml, lambda tmp: tmp.write_text(base_text))
    atomic_write(record, lambda tmp: tmp.write_text(record_text))
    return base_yaml


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def run_sweep(sweep: Sweep, dry_run: bool = False, log=print, shard: Optional[Shard] = None,
              launcher: str = "inline", launcher_params: Optional[dict] = None, wait: bool = False,
              report_only: bool = False) -> int:
    """Check the whole grid, run what is not done (here, or as a job array), report. Returns the
    exit status."""
    runs = expand(sweep)
    resolved = check_grid(sweep, runs)
    mine = shard.take(runs) if shard else runs
    done = [r for r in mine if is_done(r, sweep)]
    todo = [] if report_only else [r for r in mine if r not in done]
    grid = " x ".join(f"{len(v)} {k}" for k, v in sweep.axes.items()) or "1 point"
    part = f"; shard {shard.index}/{shard.count}: {len(mine)} of them" if shard else ""
    log(f"sweep {sweep.name}: {len(runs)} runs ({grid} x {len(sweep.seeds)} seeds){part}; {len(done)} done, "
        f"{len(todo)} to run -> {sweep.folder}/")
    if dry_run:
        for run in mine:
            log(f"  {'done' if run in done else 'todo'}  {run.run_id}  {' '.join(run.overrides)} seed={run.seed}")
        return 0
    base_yaml = prepare_folder(sweep, resolved)
    started = time.time()
    if launcher != "inline" and todo:
        jobs = submit_array(sweep, todo, base_yaml.resolve(), launcher, launcher_params or {})
        log(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]} ({launcher}); logs: "
            f"{sweep.folder}/submitit/ and each run's train.log", flush=True)
        if not wait:
            log("once it is done, the report: the same command with --report-only (or without --launcher, "
                "which also runs what failed)")
            return 0
        for job in jobs:
            try:
                job.result()
            except Exception as err:  # a task that died (killed, out of time): its status.json says where
                log(f"      job {job.job_id}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
    else:
        try:
            for i, run in enumerate(todo, 1):
                log(f"[{i}/{len(todo)}] {run.run_id}: training (log: {run.folder(sweep) / 'train.log'})", flush=True)
                run_one(sweep, run, base_yaml, log)
        except KeyboardInterrupt:
            log(f"\ninterrupted: re-run the same command to resume ({sweep.folder}/)")
            return 130
    if shard is not None:
        failed = [r for r in mine if (read_status(r, sweep) or {}).get("status") == "failed"]
        log(f"shard {shard.index}/{shard.count}: {len(mine) - len(failed)} of {len(mine)} runs done. The report, once "
            "every shard is done: the same command without --shard, with --report-only")
        return 1 if failed else 0
    statuses = [(r, read_status(r, sweep)) for r in runs]
    records = [s for r, s in statuses if s and s.get("status") == "done" and s.get("overrides") == r.overrides]
    failed = [s for r, s in statuses if s and s.get("status") == "failed"]
    if sweep.report == "collapse":
        outputs = report_collapse(sweep, resolved, records, failed)
    elif sweep.report == "curve":
        outputs = report_curve(sweep, records, failed)
    else:
        outputs = report_ablation(sweep, records, failed)
    minutes, secs = divmod(int(time.time() - started), 60)
    log("\n" + outputs[0].read_text())
    missing = len(runs) - len(records) - len(failed)
    log(f"sweep {sweep.name}: {len(records)}/{len(runs)} runs done, {len(failed)} failed"
        f"{f', {missing} not run yet' if missing else ''} ({minutes}m{secs:02d}s)")
    for path in outputs:
        log(f"  {path}")
    log(f"TensorBoard:  .venv/bin/tensorboard --logdir {sweep.folder}")
    return 1 if failed else 0


def find_sweep_file(name: str) -> str:
    """A sweep file as given, else a shipped one by name (``depth`` -> ``experiments/sweeps/depth.yaml``)."""
    if Path(name).is_file():
        return name
    shipped = EXPERIMENTS_DIR / "sweeps" / (name if name.endswith(".yaml") else f"{name}.yaml")
    return str(shipped) if shipped.is_file() else name


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", help="the sweep YAML (experiments/sweeps/*.yaml)")
    parser.add_argument("--seeds", default="", help="comma list; replaces the file's seeds")
    parser.add_argument("--selector", default="", help="the selector every run trains; replaces the file's")
    parser.add_argument("--out", default=None, help="parent folder of the sweep folder (default: the file's out)")
    parser.add_argument("--dry-run", action="store_true", help="check the grid and list its runs; run nothing")
    parser.add_argument("--launcher", default="inline", choices=LAUNCHERS,
                        help="inline: one run after another here; slurm: a SLURM job array through submitit; "
                             "local: submitit's local executor")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="a submitit executor parameter (timeout_min=240, gpus_per_node=8, slurm_partition=gpu, ...)")
    parser.add_argument("--wait", action="store_true", help="with --launcher: wait for the job array, then report")
    parser.add_argument("--shard", default=None, metavar="I/N", help="run only the runs I, I+N, I+2N, ... (0 <= I < N)")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the runs that are done")
    parser.add_argument("overrides", nargs="*", help="train-config key=value for every run")
    args = parser.parse_intermixed_args(argv)
    quiet_known_warnings()
    if not args.sweep:
        raise SweepError("no sweep file: make sweep SWEEP=experiments/sweeps/depth.yaml")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SweepError(f"{bad[0]!r} is not key=value (ARGS= takes train-config overrides)")
    seeds = parse_seeds(args.seeds, "SEEDS") if args.seeds.strip() else None
    if args.slurm and args.launcher == "inline":
        raise SweepError("--slurm sets the job array's parameters: add --launcher slurm (or local)")
    shard = Shard.parse(args.shard) if args.shard else None
    sweep = read_sweep(find_sweep_file(args.sweep), seeds, args.out, args.overrides, args.selector.strip() or None)
    return run_sweep(sweep, args.dry_run, shard=shard, launcher=args.launcher, launcher_params=parse_params(args.slurm),
                     wait=args.wait, report_only=args.report_only)


if __name__ == "__main__":
    sys.exit(run_main(main))
