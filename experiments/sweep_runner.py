"""The sweep's runner: each run of the grid is one ``python -m tokensel.experiments.train`` process,
then one ``python -m tokensel.experiments.evaluate`` process on its ``last.ckpt``
(``experiments/sweep.py`` documents the sweep). A run's folder keeps its logs (``train.log``,
``eval.log``) and a ``status.json`` record: ``done`` (with its metrics) or ``failed`` (with the
stage and the error line), which is what resuming a sweep reads.

Runs go one after another in this process (``--launcher inline``), or as one job array through
submitit (``--launcher slurm``, or ``local`` for submitit's local executor): each array task is
:func:`run_task` on one run, on the node it lands on; the folder is the only thing tasks share.

``sweep`` and ``run`` below are ``sweep.Sweep`` and ``sweep.Run`` objects.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from torch.utils.tensorboard import SummaryWriter

from tokensel.common.errors import TokenselError

EVAL_METRICS = ("recall", "coverage", "psnr", "ntp_increase")  # the eval's results.csv columns a sweep reads
LAUNCHERS = ("inline", "local", "slurm")  # local: submitit's LocalExecutor, the slurm path on this machine
DEFAULT_TIMEOUT_MIN = 24 * 60  # an array task's time limit unless --slurm timeout_min=... says otherwise


class LaunchError(TokenselError):
    """A job array that cannot be submitted (submitit missing, an unknown executor parameter, no sbatch)."""


def read_status(run, sweep) -> Optional[dict]:
    return _read_json(run.folder(sweep) / "status.json")


def is_done(run, sweep) -> bool:
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


def child_env() -> dict:
    """The environment of a run's processes. Inside a SLURM array task the scheduler's variables are
    left out, so Lightning starts the run's ``trainer.devices`` processes itself, as on a workstation
    (a run of an array task is one node)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _run_logged(cmd: list[str], log_path: Path) -> int:
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return _wait(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env()))


def error_line(log_path: Path) -> str:
    """The line that says why a run failed: our one-line ``error:``, else the last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def read_eval(csv_path: Path, selector: str) -> dict[str, dict[str, float]]:
    """``selector``'s rows of one eval's ``results.csv`` -> ``{budget: {metric: mean}}`` (missing
    metrics: nan)."""
    out = {}
    with open(csv_path) as fh:
        for row in csv.DictReader(fh):
            if row["selector"] == selector:
                out[row["budget"]] = {m: float(row[f"{m}_mean"]) if row.get(f"{m}_mean") else math.nan
                                      for m in EVAL_METRICS}
    return out


def execute(sweep, run, base_yaml: Path, log=print) -> dict:
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
        cmd = [sys.executable, "-m", "tokensel.experiments.evaluate", "--selectors", f"{sweep.selector},random", "--ckpts",
               str(ckpt), "--budgets", ",".join(str(b) for b in sweep.budgets), "--out", str(folder / "eval")]
        if sweep.eval_max_samples:
            cmd += ["--max-samples", str(sweep.eval_max_samples)]
        if _run_logged(cmd, folder / "eval.log") != 0:
            return finish("failed", stage="eval", error=error_line(folder / "eval.log"))
        evaluation = read_eval(folder / "eval" / "results.csv", sweep.selector)
        eval_random = read_eval(folder / "eval" / "results.csv", "random")  # the plots' reference line
        eval_s = round(time.time() - started, 2)
    return finish("done", train_s=trained["wall_s"], eval_s=eval_s, global_step=trained["global_step"],
                  metrics=trained["metrics"], collapse_step=trained.get("collapse_step"), eval=evaluation,
                  **({"eval_random": eval_random} if evaluation else {}))


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: the runs ``I, I+N, I+2N, ...`` of the grid's fixed order."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise LaunchError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 ... 3/4")
        return cls(int(match.group(1)), int(match.group(2)))

    def take(self, runs: list) -> list:
        return runs[self.index::self.count]


def parse_params(items: list[str]) -> dict:
    """``--slurm KEY=VALUE`` items -> submitit's executor parameters (values read as YAML)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm timeout_min=240")
        params[key.strip()] = yaml.safe_load(value) if value else ""
    return params


def run_one(sweep, run, base_yaml: Path, log=print) -> dict:
    """Train and evaluate one run, record its hparams, say how it went; returns ``status.json``."""
    record = execute(sweep, run, base_yaml, log)
    if record["status"] == "done":
        write_hparams(sweep, run, record)
        scores = "; ".join(f"{m} {v:.3f}@{b}" for b, row in record["eval"].items()
                           for m, v in row.items() if m == "recall" and not math.isnan(v))
        log(f"      done: trained in {record['train_s']:.0f}s" + (f", {scores}" if scores else ""), flush=True)
    else:
        log(f"      FAILED ({record['stage']}): {record['error']}", flush=True)
    return record


def run_task(sweep, run, base_yaml: Path, workdir: str) -> dict:
    """One task of a job array: :func:`run_one` from the folder the sweep was submitted from."""
    os.chdir(workdir)
    print(f"{sweep.name}: {run.run_id} (log: {run.folder(sweep) / 'train.log'})", flush=True)
    return run_one(sweep, run, base_yaml)


def submit_array(sweep, runs: list, base_yaml: Path, launcher: str, params: dict[str, Any]) -> list:
    """Submit ``runs`` as one job array (one task per run) through submitit; returns its jobs.
    ``params``: submitit's executor parameters (``timeout_min``, ``gpus_per_node``, ``slurm_partition``,
    ``slurm_array_parallelism``, ...)."""
    try:
        import submitit
    except ImportError:
        raise LaunchError(f"--launcher {launcher}: submitit is not installed; pip install 'tokensel[slurm]'") from None
    try:
        executor = submitit.AutoExecutor(folder=sweep.folder / "submitit" / "%j", cluster=launcher)
    except RuntimeError as err:  # submitit's "Could not detect srun": no SLURM on this machine
        raise LaunchError(f"--launcher {launcher}: {str(err).strip().splitlines()[0]} (submit from the cluster's "
                          "login node; here, --launcher local or --shard I/N)") from None
    try:  # submitit's own default time limit is 5 minutes: far too short for a training run
        executor.update_parameters(name=f"tokensel-{sweep.name}", **{"timeout_min": DEFAULT_TIMEOUT_MIN, **params})
    except (NameError, ValueError, TypeError) as err:  # submitit lists the parameters it does not know
        first = str(err).strip().splitlines()[0]
        raise LaunchError(f"--slurm: {first} (submitit's executor parameters: timeout_min, gpus_per_node, "
                          "cpus_per_task, mem_gb, slurm_partition, slurm_array_parallelism, ...)") from None
    workdir = os.getcwd()
    try:
        return executor.map_array(run_task, [sweep] * len(runs), runs, [base_yaml] * len(runs), [workdir] * len(runs))
    except (FileNotFoundError, subprocess.CalledProcessError) as err:  # no sbatch here, or sbatch refused
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaunchError(f"--launcher {launcher}: the job array could not be submitted ({first})") from None


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_hparams(sweep, run, record: dict) -> None:
    """TensorBoard hparams for one finished run: its axis values and seed against its results."""
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
