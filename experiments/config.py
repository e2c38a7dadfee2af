"""One structured config for a training run: ``selector.*``, ``data.*``, ``encoder.*``,
``optim.*``, ``trainer.*``, ``run.*``, ``teacher.*`` (the corpus teacher, ``experiments/teacher.py``)
and ``seed``.

Layers, later wins:

1. the dataclass defaults below, which follow the papers (batch 32, Adam, cosine, ...);
2. a YAML file: ``experiments/<selector>.yaml`` (laptop-sized), or the ``--config`` preset
   (e.g. ``experiments/paper/llava_next.yaml``). A YAML may name a ``base:`` YAML, relative to
   itself, that it extends;
3. ``key=value`` overrides from the command line (``make train ARGS="..."``).

Everything is checked (unknown keys, wrong types, out-of-range values, ``trainer.*`` values
Lightning would refuse, a GPU asked for where there is none) before any model is built; a
problem raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from tokensel.common.cli import ArgumentParser
from tokensel.common.errors import ConfigError
from tokensel.datamodules.anyres import check_pinpoints
from tokensel.datamodules.config import (FEATURE_CACHE_MODES, FEATURE_CACHE_PRECISIONS, VIEW_MODES, VIEW_SELECTIONS,
                                         DataConfig, EncoderConfig)
from tokensel.datamodules.feature_cache import weights_identity
from tokensel.datamodules.synthetic import PRESETS
from tokensel.experiments.lightning_options import check_run_options, check_trainer_kwargs
from tokensel.selectors.base import OptimConfig
from tokensel.selectors.budget import check_budget
from tokensel.selectors.catalog import baseline_class, selector_entry

__all__ = ["ConfigError", "TrainConfig", "load_config", "read_yaml", "parse_overrides", "flatten", "to_container"]
EXPERIMENTS_DIR = Path(__file__).resolve().parent
DEFAULT_SELECTOR = "gumbel_ae"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


@dataclass
class TrainerConfig:
    """``trainer.*``: passed to ``lightning.Trainer`` as keyword arguments. Any other ``Trainer``
    argument may be given too (``trainer.max_time=00:04:00:00``, ``trainer.profiler=simple``): it is
    kept in ``extra`` and checked against the Trainer's signature (``lightning_options.py``)."""

    max_epochs: int = 100  # the Gumbel paper trains 100 epochs
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp" for multi-GPU
    precision: Any = "32-true"  # "bf16-mixed" on recent GPUs
    log_every_n_steps: int = 10
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 2
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # other Trainer arguments, written as trainer.<name>


@dataclass
class RunConfig:
    """``run.*``: where a run writes and how it is watched."""

    root: str = "runs"  # the run folder: runs/<name>/<version>/
    # tensorboard | csv | wandb, a list of them, or {class_path: ..., init_args: {...}} (lightning_options.py)
    logger: Any = "tensorboard"
    wandb_project: str = "tokensel"  # run.logger=wandb's project (WANDB_MODE=offline: no network)
    # Lightning callbacks added to tokensel's own: pkg.module.Class or {class_path: ..., init_args: {...}}
    callbacks: List[Any] = field(default_factory=list)
    name: Optional[str] = None  # None: the selector's name
    version: Optional[str] = None  # None: the next version_N
    resume: Optional[str] = None  # "last": this run folder's last.ckpt (newest run if no version); or a path
    panels_every_n_steps: int = 50  # image panels; 0 turns them off
    # checkpoints/last.ckpt is written at every epoch end, when training stops, and also every N
    # optimiser steps and/or every M minutes (0: off), so a kill -9 loses at most that much.
    checkpoint_every_n_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    # Collapse detector (callbacks/collapse.py): train/keep_ratio below the threshold for this
    # many consecutive steps. The paper gives no number; 0 patience turns it off.
    collapse_threshold: float = 0.05
    collapse_patience: int = 25
    # Learning curves (callbacks/learning_curve.py): held-out recall, evidence AUROC and the
    # objective's own loss against random and DivPrune, at every validation (curve_steps=0) or at
    # curve_steps log-spaced steps (and step 0). Budgets: empty means the objective's trained
    # budget, else 0.222 (the Gumbel paper's 22.2 % keep ratio).
    curve: bool = True
    curve_budgets: List[Any] = field(default_factory=list)
    curve_steps: int = 0
    curve_samples: int = 192
    curve_random_draws: int = 3


@dataclass
class TeacherConfig:
    """``teacher.*``: how the corpus teacher is trained (only used when one is built)."""

    model: str = "coca_head"  # an open_clip CoCa config; its pooler is rebuilt at the encoder's width
    epochs: int = 4
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # share of the steps
    max_text_tokens: int = 64  # prompt + target BPE tokens, as selector.vlm.max_text_tokens
    seed: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for key in ("epochs", "max_text_tokens", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"teacher.{key}={getattr(self, key)}: must be at least 1")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise ConfigError(f"teacher.lr={self.lr}, warmup={self.warmup}, weight_decay={self.weight_decay}: "
                              "need lr > 0, 0 <= warmup < 1, weight_decay >= 0")


@dataclass
class TrainConfig:
    selector: Any = None  # the registered selector's config dataclass, chosen by name
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    seed: int = 0


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML file as a dict, with its ``base:`` chain merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base:' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_yaml(path.parent / base, _seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(parent, data))


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` items as a config. ``key=`` is the empty string (how ``encoder.pretrained=""``
    arrives once make and the shell have eaten the quotes); none is ``key=null``."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value (e.g. selector.depth=2)")
    overrides = [f'{item}""' if item.endswith("=") else item for item in overrides]
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {' '.join(overrides)!r}: {str(err).splitlines()[0]}") from None


def _valid_keys(schema: DictConfig, full_key: str) -> str:
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    return ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""


def _one_line(err: Exception, schema: DictConfig, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or ""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError) and full_key:
        return ConfigError(f"{source}: unknown key {full_key!r}; valid keys here: {_valid_keys(schema, full_key)}")
    if isinstance(err, ValidationError) and full_key:
        return ConfigError(f"{source}: {full_key}: {first}")
    return ConfigError(f"{source}: {first}")


def merge_overrides(schema: Any, overrides: list[str], source: str = "overrides") -> Any:
    """``key=value`` items merged onto a structured config (a dataclass instance) and returned as
    that dataclass; an unknown key or a bad value is one ``ConfigError`` naming it."""
    node = OmegaConf.structured(schema)
    try:
        node = OmegaConf.merge(node, parse_overrides(list(overrides)))
        return OmegaConf.to_object(node)
    except (OmegaConfBaseException, ValueError) as err:
        raise _one_line(err, node, source) from None


def baseline_options(overrides: list[str]) -> dict[str, Any]:
    """``baselines.<name>.<key>=value`` items as each named baseline's ``Options`` dataclass
    (``selectors/baselines.py``), by name; an unknown baseline, key or value is one ``ConfigError``."""
    by_name: dict[str, list[str]] = {}
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        if len(parts) < 3 or parts[0] != "baselines":
            raise ConfigError(f"override {item!r}: baseline options are baselines.<name>.<key>=value")
        if baseline_class(parts[1]).Options is None:
            raise ConfigError(f"override {item!r}: baseline {parts[1]!r} has no options")
        by_name.setdefault(parts[1], []).append(item.split(".", 2)[2])
    return {name: merge_overrides(baseline_class(name).Options(), items, f"baselines.{name}")
            for name, items in by_name.items()}


def load_config(selector: Optional[str] = None, config_file: Optional[str] = None,
                overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """Build and check the run config (see the module docstring). Raises ``ConfigError``."""
    cli = parse_overrides(list(overrides))
    file_cfg = read_yaml(config_file) if config_file else None
    yaml_name = ((file_cfg or {}).get("selector") or {}).get("name")
    cli_name = OmegaConf.select(cli, "selector.name")
    names = {n for n in (selector, yaml_name, cli_name) if n}
    if len(names) > 1:
        raise ConfigError(f"conflicting selectors: {' vs '.join(sorted(names))} (SELECTOR, --config and selector.name disagree)")
    name = names.pop() if names else DEFAULT_SELECTOR
    entry = selector_entry(name)
    if file_cfg is None:
        default = EXPERIMENTS_DIR / f"{name}.yaml"
        config_file = str(default) if default.is_file() else None
        file_cfg = read_yaml(default) if config_file else {}
    required = [k for k, v in flatten(file_cfg).items() if v == "???" and OmegaConf.select(cli, k) is None]
    if required:  # OmegaConf's merge would keep the default instead of failing on '???'
        raise ConfigError(f"{config_file}: {required[0]} is required (???): pass {required[0]}=... (make ARGS=\"{required[0]}=...\")")
    schema = OmegaConf.structured(TrainConfig(selector=entry.make_config(),
                                              optim=OptimConfig(**entry.config_cls.optim_defaults)))
    file_cfg, cli = lift_trainer_extras(file_cfg), lift_trainer_extras(cli)
    for layer, source in ((file_cfg, config_file), (cli, "overrides")):
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as err:
            raise _one_line(err, schema, source) from None
    try:
        config = OmegaConf.to_object(schema)
    except (OmegaConfBaseException, ValueError) as err:
        raise _one_line(err, schema, "config") from None
    config.selector.name = name
    check_run_config(config)
    return config


TRAINER_FIELDS = tuple(f.name for f in fields(TrainerConfig) if f.name != "extra")


def lift_trainer_extras(layer: Any) -> Any:
    """A config layer with the ``trainer.*`` keys that ``TrainerConfig`` does not define moved under
    ``trainer.extra`` (where they wait to be checked against Lightning's Trainer)."""
    tree = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
    trainer = tree.get("trainer") if isinstance(tree, dict) else None
    if not isinstance(trainer, dict):
        return layer
    others = {k: v for k, v in trainer.items() if k not in TRAINER_FIELDS and k != "extra"}
    if not others:
        return layer
    extra = dict(trainer.get("extra") or {})
    extra.update(others)
    tree = {**tree, "trainer": {**{k: v for k, v in trainer.items() if k not in others}, "extra": extra}}
    return OmegaConf.create(tree) if isinstance(layer, DictConfig) else tree


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}`` (an empty mapping is a value)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def check_run_config(config: TrainConfig) -> None:
    """Cross-field checks that the dataclasses cannot make on their own."""
    data = config.data
    for key in ("batch_size", "recon_size"):
        if getattr(data, key) < 1:
            raise ConfigError(f"data.{key}={getattr(data, key)}: must be at least 1")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers={data.num_workers}: must be >= 0")
    if data.samples_per_epoch is not None and data.samples_per_epoch < 1:
        raise ConfigError(f"data.samples_per_epoch={data.samples_per_epoch}: must be at least 1")
    if any(w < 0 for w in data.weights.values()):
        raise ConfigError(f"data.weights={dict(data.weights)}: weights must be >= 0")
    if str(data.feature_cache) == "False":  # YAML 1.1 reads a bare `off` as false
        data.feature_cache = "off"
    for key, allowed in (("feature_cache", FEATURE_CACHE_MODES), ("feature_cache_precision", FEATURE_CACHE_PRECISIONS)):
        if str(getattr(data, key)) not in allowed:
            raise ConfigError(f"data.{key}={getattr(data, key)!r}: expected one of {', '.join(allowed)}")
    data.feature_cache_precision = str(data.feature_cache_precision)
    if data.corpus not in PRESETS:
        raise ConfigError(f"data.corpus={data.corpus!r}: expected one of {', '.join(PRESETS)} (the generated "
                          "corpus used when data.root is unset)")
    if data.views not in VIEW_MODES:
        raise ConfigError(f"data.views={data.views!r}: expected one of {', '.join(VIEW_MODES)}")
    if data.view_selection not in VIEW_SELECTIONS:
        raise ConfigError(f"data.view_selection={data.view_selection!r}: expected one of {', '.join(VIEW_SELECTIONS)}")
    if data.views == "anyres":
        check_pinpoints(data.view_pinpoints)
        if data.resize_mode != "squash":
            raise ConfigError(f"data.resize_mode={data.resize_mode!r} does not apply to data.views=anyres "
                              "(LLaVA-NeXT squashes its base view and pads only the crops' canvas); use squash")
    for key in ("checkpoint_every_n_steps", "checkpoint_every_minutes"):
        if getattr(config.run, key) < 0:
            raise ConfigError(f"run.{key}={getattr(config.run, key)}: must be >= 0 (0 turns it off)")
    if config.run.collapse_patience < 0:
        raise ConfigError(f"run.collapse_patience={config.run.collapse_patience}: must be >= 0 (0 turns it off)")
    for key in ("curve_steps", "curve_samples", "curve_random_draws"):
        if getattr(config.run, key) < (0 if key == "curve_steps" else 1):
            raise ConfigError(f"run.{key}={getattr(config.run, key)}: must be {'>= 0' if key == 'curve_steps' else '>= 1'}")
    if config.run.curve_steps and config.trainer.max_steps < 1:
        raise ConfigError(f"run.curve_steps={config.run.curve_steps}: log-spaced steps need trainer.max_steps")
    config.run.curve_budgets = [check_budget(b, "run.curve_budgets") for b in config.run.curve_budgets]
    if config.trainer.max_epochs < 1 and config.trainer.max_steps < 1:
        raise ConfigError("trainer.max_epochs and trainer.max_steps are both unset: set one of them")
    check_trainer(config.trainer)
    check_run_options(config.run)
    check = getattr(config.selector, "check_run", None)  # an objective's own cross-checks
    if check is not None:
        reason = check(config, lambda: weights_identity(config.encoder))
        if reason:
            raise ConfigError(reason)


def encoder_mismatch(need, encoder: EncoderConfig) -> Optional[str]:
    """Where ``encoder`` differs from a VLM's ``EncoderRequirement``, weights included (only
    datamodules know a weights identity, so this is here, not in the selector), else None."""
    weights = weights_identity(encoder) if need.weights is not None else None
    return need.mismatch(encoder.name, encoder.layer, encoder.norm, weights, encoder.image_size)


def check_trainer(trainer: TrainerConfig) -> None:
    """The ``trainer.*`` values Lightning would refuse only once the models are built."""
    precisions = [p for group in typing.get_args(_PRECISION_INPUT) for p in typing.get_args(group)]
    if trainer.precision not in precisions and str(trainer.precision) not in map(str, precisions):
        raise ConfigError(f"trainer.precision={trainer.precision!r}: expected one of "
                          f"{', '.join(str(p) for p in precisions if isinstance(p, str))}")
    if str(trainer.accelerator) not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={trainer.accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if str(trainer.strategy) not in strategies:
        raise ConfigError(f"trainer.strategy={trainer.strategy!r}: expected auto, ddp, ddp_spawn, fsdp, ... "
                          "(Lightning's strategy names)")

    check_trainer_kwargs(trainer.extra)


def check_hardware(trainer: TrainerConfig) -> None:
    """What this machine can run: a GPU where ``trainer.accelerator`` asks for one, and enough of
    them for ``trainer.devices``. Checked when a run starts, not when a config is read (a sweep of
    GPU presets can be checked on a laptop)."""
    accelerator = str(trainer.accelerator)
    gpus = torch.cuda.device_count()
    mps = accelerator == "gpu" and torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not gpus and not mps:
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no GPU "
                          "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto")
    if accelerator in ("gpu", "cuda") and isinstance(trainer.devices, int) and trainer.devices > max(gpus, mps):
        raise ConfigError(f"trainer.devices={trainer.devices}: this machine has {gpus} GPU(s)")


def to_container(config: TrainConfig) -> dict:
    """The config as plain dicts and lists (for hparams, checkpoints and config.yaml); other Trainer
    arguments stand beside tokensel's own ``trainer.*`` keys, as the user wrote them."""
    tree = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    trainer = tree["trainer"]
    trainer.update(trainer.pop("extra", None) or {})
    return tree


def parse_run_args(argv: list[str], prog: str, doc: str) -> tuple[Optional[str], Optional[str], list[str], bool]:
    """A run's command line (``make train``, ``make teacher``): (selector, config file, key=value
    overrides, whether ``--print-config`` asks only for the resolved config)."""
    parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--config", help="a train YAML (default: experiments/<selector>.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
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
    return selector, ns.config, overrides, ns.print_config


def config_yaml(config: TrainConfig) -> str:
    """The resolved config as the YAML a run writes to its ``config.yaml`` (``--print-config``)."""
    return yaml.safe_dump(to_container(config), sort_keys=False)
