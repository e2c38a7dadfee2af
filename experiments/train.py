"""Train one selector: ``make train SELECTOR=gumbel_ae ARGS="trainer.max_steps=50"``.

Equivalent to::

    python -m tokensel.experiments.train [SELECTOR] [--config FILE.yaml] [key=value ...]

The run writes ``runs/<selector>/<version>/``: TensorBoard events, ``config.yaml`` and
``checkpoints/`` (selector network and optimiser state only; the frozen encoder is rebuilt
from the config). Keep the ``-m`` form: Lightning's DDP launcher re-runs this same command for
every extra rank.
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

import yaml

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.common.errors import ConfigError

VERSION_ENV = "TOKENSEL_RUN_VERSION"  # lets DDP child ranks write into the parent's run folder


def parse_cli(argv: list[str]) -> tuple[Optional[str], Optional[str], list[str]]:
    """Split argv into (selector, config file, key=value overrides)."""
    parser = ArgumentParser(prog="python -m tokensel.experiments.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a train YAML (default: experiments/<selector>.yaml)")
    parser.add_argument("args", nargs="*", metavar="[SELECTOR] key=value", help="the selector, then config overrides")
    ns = parser.parse_intermixed_args(argv)
    if ns.config is not None and not ns.config:
        raise ConfigError("--config needs a YAML file")
    selector, overrides = None, []
    for arg in ns.args:
        if "=" in arg:
            overrides.append(arg)
        elif selector is None and not overrides:
            selector = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; overrides are key=value")
    return selector, ns.config, overrides


def is_rank_zero_process() -> bool:
    """True in the launching process (Lightning sets LOCAL_RANK/NODE_RANK for the others)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


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


def check_resume_compatible(ckpt_path: str, selector_name: str, dims: dict) -> None:
    from tokensel.selectors.inference import read_checkpoint

    hp = read_checkpoint(ckpt_path)["hyper_parameters"]
    if hp["selector"]["name"] != selector_name:
        raise ConfigError(f"run.resume: {ckpt_path} is a {hp['selector']['name']} checkpoint, not {selector_name}")
    if hp["dims"] != dims:
        raise ConfigError(f"run.resume: {ckpt_path} was trained on features {hp['dims']}, these are {dims}")


def train(config) -> dict:
    """Fit one selector from a checked config; returns the final metrics. Raises user errors."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from tokensel.callbacks.collapse import CollapseDetector
    from tokensel.callbacks.data_health import SkippedSamples
    from tokensel.callbacks.last_checkpoint import LastCheckpoint
    from tokensel.callbacks.panels import SelectionPanels
    from tokensel.callbacks.progress import ProgressBar
    from tokensel.datamodules.datamodule import DEFAULT_DATA_ROOT, FeatureDataModule
    from tokensel.datamodules.synthetic import ensure_default_corpus, read_params
    from tokensel.experiments.config import check_hardware, to_container
    from tokensel.selectors.catalog import selector_entry

    started = time.time()
    check_hardware(config.trainer)
    if config.data.root is None and is_rank_zero_process():
        if read_params(DEFAULT_DATA_ROOT) is None:
            print(f"no data.root given: generating the default corpus in {DEFAULT_DATA_ROOT}/ (once)", flush=True)
        ensure_default_corpus(DEFAULT_DATA_ROOT)
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = FeatureDataModule(config.data, config.encoder, config.seed)
    run_name = config.run.name or config.selector.name
    version, ckpt_path = resolve_run(config, run_name)
    os.environ[VERSION_ENV] = version
    dims = datamodule.dims.as_dict()
    if ckpt_path:
        check_resume_compatible(ckpt_path, config.selector.name, dims)
    entry = selector_entry(config.selector.name)
    full_config = to_container(config)
    module = entry.module_cls(selector=asdict(config.selector), dims=dims, optim=asdict(config.optim),
                              config=full_config)

    logger = TensorBoardLogger(save_dir=config.run.root, name=run_name, version=version, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    checkpoint_dir = run_dir / "checkpoints"
    every = config.run.checkpoint_every_n_steps or None
    skipped = SkippedSamples()
    callbacks = [
        ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=1 if datamodule.has_val else 0,
                        monitor="val/loss" if datamodule.has_val else None, every_n_train_steps=every,
                        filename="best-epoch{epoch}-step{step}", auto_insert_metric_name=False,
                        enable_version_counter=False),  # overwrite last.ckpt, never last-v1.ckpt
        LastCheckpoint(checkpoint_dir / "last.ckpt"),
        LearningRateMonitor(logging_interval="step"),
        SelectionPanels(every_n_steps=config.run.panels_every_n_steps),
        skipped,
    ]
    collapse = None
    if config.run.collapse_patience > 0:
        collapse = CollapseDetector(config.run.collapse_threshold, config.run.collapse_patience)
        callbacks.append(collapse)
    if config.trainer.enable_progress_bar:
        callbacks.append(ProgressBar())
    trainer_kwargs = {k: v for k, v in asdict(config.trainer).items() if v is not None}
    if not datamodule.has_val:
        trainer_kwargs["limit_val_batches"] = 0
    try:
        trainer = L.Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs)
    except (MisconfigurationException, ValueError) as err:  # a trainer.* value Lightning refuses
        raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(full_config, sort_keys=False))
        params = sum(p.numel() for p in module.parameters())
        print(f"tokensel: {config.selector.name} | {params / 1e6:.2f}M selector params | encoder "
              f"{config.encoder.name} (frozen, {dims['num_tokens']} tokens x {dims['dim']}) | data "
              f"{datamodule.root} | run {run_dir}", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if datamodule.has_val and "val/loss" not in metrics and not trainer.interrupted:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # a max_steps stop skipped it
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    seconds = time.time() - started
    if trainer.is_global_zero:
        write_run_record(run_dir, metrics, seconds, skipped.total, collapse, trainer)
        print_summary(run_dir, metrics, seconds, skipped.total, collapse)
    return metrics


def write_run_record(run_dir: Path, metrics: dict, seconds: float, skipped: int, collapse, trainer) -> None:
    """``metrics.json`` in the run folder: what a sweep reads back (final metrics, wall time, ...).
    ``collapse`` is the run's ``CollapseDetector``, or None when it is off."""
    record = {"metrics": metrics, "wall_s": round(seconds, 2), "global_step": trainer.global_step,
              "epoch": trainer.current_epoch, "interrupted": bool(trainer.interrupted), "skipped": skipped,
              "collapse_step": collapse.collapse_step if collapse is not None else None}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=1, sort_keys=True))


def print_summary(run_dir: Path, metrics: dict, seconds: float, skipped: int, collapse=None) -> None:
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
        f"run folder:   {run_dir}",
        f"checkpoints:  {run_dir / 'checkpoints'} (last.ckpt; load with tokensel.selectors.catalog.load_selector)",
        f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir.parent}   (or: make tensorboard)",
    ]), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    from tokensel.experiments.config import load_config

    quiet_known_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    selector, config_file, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    train(load_config(selector, config_file, overrides))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
