"""Train one selector: ``make train SELECTOR=gumbel_ae ARGS="trainer.max_steps=50"``.

Equivalent to::

    python -m tokensel.experiments.train [SELECTOR] [--config FILE.yaml] [key=value ...]

The run writes ``runs/<selector>/<version>/``: TensorBoard events (``run.logger`` adds or swaps in
CSV, W&B or any Lightning logger), ``config.yaml`` and
``checkpoints/`` (selector network and optimiser state only; the frozen encoder is rebuilt
from the config). Keep the ``-m`` form: Lightning's DDP launcher re-runs this same command for
every extra rank.

``checkpoints/last.ckpt`` is kept current (``callbacks/last_checkpoint.py``: every epoch end, on
stop, and every ``run.checkpoint_every_n_steps`` / ``run.checkpoint_every_minutes``), written
atomically and read with ``weights_only=True`` (``callbacks/checkpoint_io.py``). ``run.resume=last``
continues exactly where it was saved: the data stream at the next batch (``datamodules/loaders.py``),
the global RNGs as they were (``callbacks/rng_state.py``), so a resumed run ends with the same steps
and metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from tokensel.callbacks.checkpoint_io import SafeCheckpointIO
from tokensel.callbacks.collapse import CollapseDetector
from tokensel.callbacks.data_health import SkippedSamples
from tokensel.callbacks.last_checkpoint import LastCheckpoint
from tokensel.callbacks.learning_curve import CURVE_FILE, LearningCurve, log_spaced_steps
from tokensel.callbacks.panels import SelectionPanels
from tokensel.callbacks.progress import ProgressBar
from tokensel.callbacks.rng_state import GlobalRNGState
from tokensel.common.checkpoint_files import remove_stale_temps
from tokensel.common.cli import quiet_known_warnings, run_main
from tokensel.common.errors import ConfigError
from tokensel.datamodules.datamodule import FeatureDataModule
from tokensel.datamodules.synthetic import ensure_data
from tokensel.experiments.config import check_hardware, config_yaml, load_config, parse_run_args, to_container
from tokensel.experiments.curve_report import read_curve, run_summary
from tokensel.experiments.lightning_options import build_callbacks, build_loggers
from tokensel.experiments.teacher import ensure_teacher, find_teacher
from tokensel.selectors.catalog import selector_entry
from tokensel.selectors.inference import read_checkpoint
from tokensel.selectors.vlm_coca import names_corpus_teacher

VERSION_ENV = "TOKENSEL_RUN_VERSION"  # lets DDP child ranks write into the parent's run folder


DEFAULT_CURVE_BUDGET = 0.222  # the Gumbel paper's 22.2 % keep ratio (Table 1)
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")  # Lightning, torchrun, SLURM


def is_rank_zero_process() -> bool:
    """True in the one process that starts a run (Lightning's launcher, torchrun and SLURM set a
    rank variable for every other one)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in RANK_VARIABLES)


def launched_externally() -> bool:
    """Is this one of several processes started by torchrun, srun or by hand on each node
    (``WORLD_SIZE`` / ``SLURM_NTASKS`` > 1), rather than by Lightning from one command?"""
    return max(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("SLURM_NTASKS", 1))) > 1


def check_launch(config) -> None:
    """What a run started as several independent processes must pin, so they agree."""
    if not launched_externally() or os.environ.get(VERSION_ENV):
        return  # one process, or a rank Lightning launched (it inherits the version)
    if config.run.version is None:
        raise ConfigError("run.version: set it when every rank is started on its own (torchrun, srun, one "
                          "command per node), e.g. run.version=job-$SLURM_JOB_ID, so they write one run folder")
    if config.data.root is None:
        raise ConfigError("data.root: set it when every rank is started on its own (torchrun, srun, one command "
                          "per node); the generated corpus is written by a single process")


def next_version(folder: Path) -> str:
    taken = [int(m.group(1)) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(taken, default=-1) + 1}"


def resolve_run(config, run_name: str) -> tuple[str, Optional[str]]:
    """The run's version folder name and the checkpoint to resume from (if any)."""
    run = config.run
    folder = Path(run.root) / run_name
    resume = run.resume
    if resume is None:
        return run.version or os.environ.get(VERSION_ENV) or next_version(folder), None
    if resume == "last":
        candidates = [folder / run.version] if run.version else sorted(
            (p for p in folder.glob("*") if (p / "checkpoints" / "last.ckpt").is_file()),
            key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)
        if not candidates or not (candidates[-1] / "checkpoints" / "last.ckpt").is_file():
            where = folder / (run.version or "*")
            raise ConfigError(f"run.resume=last: no checkpoints/last.ckpt under {where}")
        return candidates[-1].name, str(candidates[-1] / "checkpoints" / "last.ckpt")
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"run.resume={resume!r}: no such checkpoint")
    inside = path.parent.parent
    version = inside.name if path.parent.name == "checkpoints" and inside.parent.resolve() == folder.resolve() else None
    return run.version or version or next_version(folder), str(path)


def check_resume_compatible(hp: dict, ckpt_path: str, selector_name: str, dims: dict) -> None:
    """``hp``: the checkpoint's hyper-parameters (``read_checkpoint``)."""
    if hp["selector"]["name"] != selector_name:
        raise ConfigError(f"run.resume: {ckpt_path} is a {hp['selector']['name']} checkpoint, not {selector_name}")
    if hp["dims"] != dims:
        raise ConfigError(f"run.resume: {ckpt_path} was trained on features {hp['dims']}, these are {dims}")


def resolve_corpus_teacher(config) -> None:
    """``selector.vlm.pretrained=corpus`` -> the corpus teacher's weights file, built first (by the
    process that starts the run) when there is none; the checkpoint then names that file."""
    vlm = getattr(config.selector, "vlm", None)
    if vlm is None or not names_corpus_teacher(vlm):
        return
    config.teacher.model = vlm.model
    if not is_rank_zero_process() and find_teacher(config) is None:
        raise ConfigError("selector.vlm.pretrained=corpus: the corpus teacher is not built; build it once first "
                          "(make teacher with the same config) before starting every rank on its own")
    vlm.pretrained = str(ensure_teacher(config))


def train(config) -> dict:
    """Fit one selector from a checked config; returns the final metrics. Raises user errors."""
    started = time.time()
    check_hardware(config.trainer)
    check_launch(config)
    run_name = config.run.name or config.selector.name
    version, ckpt_path = resolve_run(config, run_name)
    resume_hp = read_checkpoint(ckpt_path)["hyper_parameters"] if ckpt_path else None  # fail before building
    if is_rank_zero_process():
        ensure_data(config.data)
    resolve_corpus_teacher(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = FeatureDataModule(config.data, config.encoder, config.seed)
    os.environ[VERSION_ENV] = version
    dims = datamodule.dims.as_dict()
    if ckpt_path:
        check_resume_compatible(resume_hp, ckpt_path, config.selector.name, dims)
    entry = selector_entry(config.selector.name)
    full_config = to_container(config)
    module = entry.module_cls(selector=asdict(config.selector), dims=dims, optim=asdict(config.optim),
                              config=full_config)

    loggers = build_loggers(config.run, run_name, version)
    run_dir = Path(config.run.root) / run_name / version
    checkpoint_dir = run_dir / "checkpoints"
    skipped = SkippedSamples()
    callbacks = [
        LastCheckpoint(checkpoint_dir / "last.ckpt", config.run.checkpoint_every_n_steps,
                       config.run.checkpoint_every_minutes),
        GlobalRNGState(),
        LearningRateMonitor(logging_interval="step"),
        SelectionPanels(every_n_steps=config.run.panels_every_n_steps),
        skipped,
    ]
    if datamodule.has_val:  # best-*.ckpt: the lowest val/loss
        callbacks.insert(0, ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=1, monitor="val/loss",
                                            filename="best-epoch{epoch}-step{step}", auto_insert_metric_name=False,
                                            enable_version_counter=False))
    if datamodule.has_val and config.run.curve:
        callbacks.append(learning_curve(config, module))
    collapse = None
    if config.run.collapse_patience > 0:
        collapse = CollapseDetector(config.run.collapse_threshold, config.run.collapse_patience)
        callbacks.append(collapse)
    if config.trainer.enable_progress_bar:
        callbacks.append(ProgressBar())
    callbacks += build_callbacks(config.run)
    trainer_kwargs = {k: v for k, v in asdict(config.trainer).items() if v is not None and k != "extra"}
    trainer_kwargs.update(config.trainer.extra)
    if not datamodule.has_val:
        trainer_kwargs["limit_val_batches"] = 0
    try:
        # default_root_dir: where Lightning's SLURM auto-requeue saves (and finds) hpc_ckpt_*.ckpt
        trainer = L.Trainer(logger=loggers or False, callbacks=callbacks, plugins=[SafeCheckpointIO()],
                            default_root_dir=run_dir, **trainer_kwargs)
    except (MisconfigurationException, ValueError, TypeError) as err:  # a trainer.* value Lightning refuses
        raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(full_config, sort_keys=False))
        remove_stale_temps(checkpoint_dir)  # half-written by a run killed during a save
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)  # not the frozen VLM
        print(f"tokensel: {config.selector.name} | {params / 1e6:.2f}M selector params | encoder "
              f"{config.encoder.name} (frozen, {dims['num_tokens']} tokens x {dims['dim']}) | data "
              f"{datamodule.root} | run {run_dir}", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if datamodule.has_val and "val/loss" not in metrics and not trainer.interrupted:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # a max_steps stop skipped it
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    seconds = time.time() - started
    if trainer.is_global_zero:
        features = datamodule.feature_report()
        write_run_record(run_dir, metrics, seconds, skipped.total, collapse, trainer, features)
        print_summary(run_dir, metrics, seconds, skipped.total, collapse, features)
    return metrics


def learning_curve(config, module):
    """The run's :class:`~tokensel.callbacks.learning_curve.LearningCurve` (``run.curve*``)."""
    run = config.run
    budgets = list(run.curve_budgets) or [module.net.trained_budget or DEFAULT_CURVE_BUDGET]
    steps = log_spaced_steps(config.trainer.max_steps, run.curve_steps) if run.curve_steps else None
    return LearningCurve(budgets, steps, run.curve_samples, run.curve_random_draws, seed=config.seed)


def write_run_record(run_dir: Path, metrics: dict, seconds: float, skipped: int, collapse, trainer,
                     features: Optional[dict] = None) -> None:
    """``metrics.json`` in the run folder: what a sweep reads back (final metrics, wall time, ...).
    ``collapse`` is the run's ``CollapseDetector``, or None when it is off; ``features`` is the
    datamodule's ``feature_report()`` (where features came from, encoder forwards)."""
    record = {"metrics": metrics, "wall_s": round(seconds, 2), "global_step": trainer.global_step,
              "epoch": trainer.current_epoch, "interrupted": bool(trainer.interrupted), "skipped": skipped,
              "collapse_step": collapse.collapse_step if collapse is not None else None, "features": features}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=1, sort_keys=True))


def print_summary(run_dir: Path, metrics: dict, seconds: float, skipped: int, collapse=None,
                  features: Optional[dict] = None) -> None:
    shown = [k for k in sorted(metrics) if k.startswith(("train/", "val/")) and k != "val/samples"]
    lines = [f"  {k:<18} {metrics[k]:.4f}" for k in shown]
    if collapse is not None and "train/keep_ratio" in metrics:
        w, step = collapse.watch, collapse.collapse_step
        lines.append(f"  collapse           {'none' if step is None else f'from step {step}'}"
                     f" (keep ratio < {w.threshold:g} for {w.patience} steps)")
    minutes, secs = divmod(int(round(seconds)), 60)
    print("\n".join([
        "",
        f"done in {minutes}m{secs:02d}s. final metrics:",
        *lines,
        f"  skipped samples    {skipped}",
        *(f"features {split}: {source}" for split, source in (features or {}).get("sources", {}).items()),
        *run_summary(read_curve(run_dir / CURVE_FILE)),
        f"run folder:   {run_dir}",
        f"checkpoints:  {run_dir / 'checkpoints'} (last.ckpt; load with tokensel.selectors.catalog.load_selector)",
        f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir.parent}   (or: make tensorboard)",
    ]), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    quiet_known_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    selector, config_file, overrides, print_only = parse_run_args(sys.argv[1:] if argv is None else argv,
                                                                  "python -m tokensel.experiments.train", __doc__)
    config = load_config(selector, config_file, overrides)
    if print_only:
        print(config_yaml(config), end="")
        return 0
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
