"""What a run config hands to Lightning beyond tokensel's own keys: loggers, user callbacks and any
``Trainer`` keyword argument.

- ``run.logger``: ``tensorboard`` (default), ``csv``, ``wandb``, a list of them, or an entry
  ``{class_path: pkg.module.Logger, init_args: {...}}`` for any other Lightning logger. Every named
  logger writes into the run folder ``<run.root>/<name>/<version>/``; TensorBoard stays first when
  present (the image panels and the reports read it).
- ``run.callbacks``: Lightning callbacks by import path, ``pkg.module.Class`` or
  ``{class_path: ..., init_args: {...}}`` (the convention of ``LightningCLI``).
- ``trainer.<any Trainer argument>``: keys that tokensel does not define itself (``max_time``,
  ``fast_dev_run``, ``profiler``, ``deterministic``, ...) pass through to ``lightning.Trainer``,
  checked first against its signature: an unknown name or a value of the wrong type is one
  ``ConfigError`` line naming the key, before anything is built.
"""

from __future__ import annotations

import datetime
import difflib
import importlib
import typing
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from tokensel.common.errors import ConfigError

LOGGERS = ("tensorboard", "csv", "wandb")
# Trainer arguments tokensel sets itself, with the key to use instead
OWNED_TRAINER_ARGS = {"logger": "run.logger", "callbacks": "run.callbacks", "plugins": "(none: tokensel sets it)",
                      "default_root_dir": "run.root", "enable_checkpointing": "(none: tokensel checkpoints)"}


# ---- trainer.* pass-through ------------------------------------------------------------------

def trainer_signature() -> dict[str, Any]:
    """``lightning.Trainer``'s keyword arguments and their type hints."""
    return typing.get_type_hints(Trainer.__init__)


def fits(value: Any, hint: Any) -> bool:
    """Does a config value (YAML scalars, lists, mappings) fit a type hint of Trainer's signature?"""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if hint is datetime.timedelta:
        return isinstance(value, datetime.timedelta)
    if origin in (dict, typing.Dict) or hint is dict:
        return isinstance(value, dict)
    if origin in (list, tuple, typing.List) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(fits(v, args[0]) for v in value))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this check does not model: Lightning decides when the Trainer is built


def hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None").replace("lightning.pytorch.", "")


def check_trainer_kwargs(extra: dict[str, Any]) -> None:
    """Check ``trainer.*`` keys beyond tokensel's own against ``lightning.Trainer``'s signature."""
    if not extra:
        return
    hints = trainer_signature()
    for key, value in extra.items():
        if key in OWNED_TRAINER_ARGS:
            raise ConfigError(f"trainer.{key}: tokensel sets it; use {OWNED_TRAINER_ARGS[key]}")
        if key not in hints or key == "return":
            close = difflib.get_close_matches(key, [k for k in hints if k != "return"], n=1)
            hint = f"; did you mean trainer.{close[0]}?" if close else " (lightning.Trainer's keyword arguments)"
            raise ConfigError(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
        if not fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}={value!r}: lightning.Trainer expects {hint_text(hints[key])}")


# ---- run.logger and run.callbacks -----------------------------------------------------------

def import_object(path: str, key: str) -> Any:
    """``pkg.module.Name`` -> the object; a missing module or name is one line naming ``key``."""
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}={path!r}: expected an import path, pkg.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={path!r}: cannot import {module_name} ({err})") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}={path!r}: {module_name} has no {name}")
    return getattr(module, name)


def class_spec(entry: Any, key: str) -> tuple[str, dict]:
    """``pkg.Class`` or ``{class_path: pkg.Class, init_args: {...}}`` -> (path, kwargs)."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
        unknown = sorted(set(entry) - {"class_path", "init_args"})
        if unknown:
            raise ConfigError(f"{key}: unknown field {unknown[0]!r}; use class_path and init_args")
        init_args = entry.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ConfigError(f"{key}.init_args must be a mapping of keyword arguments")
        return entry["class_path"], dict(init_args)
    raise ConfigError(f"{key}={entry!r}: expected an import path or {{class_path: ..., init_args: {{...}}}}")


def logger_entries(value: Any) -> list[Any]:
    entries = value if isinstance(value, (list, tuple)) else [value]
    if not entries:
        return []
    for i, entry in enumerate(entries):
        key = "run.logger" if not isinstance(value, (list, tuple)) else f"run.logger[{i}]"
        if isinstance(entry, str) and entry not in LOGGERS and "." not in entry:
            raise ConfigError(f"{key}={entry!r}: expected one of {', '.join(LOGGERS)}, a list of them, "
                              "or {class_path: ..., init_args: ...}")
        if not isinstance(entry, str):
            class_spec(entry, key)
    return sorted(entries, key=lambda e: e != "tensorboard")  # stable: TensorBoard first


def check_run_options(run) -> None:
    """``run.logger`` and ``run.callbacks`` as they are read (the imports themselves are tried
    here too, so a typo in a path fails before any model is built)."""
    entries = logger_entries(run.logger)
    if "wandb" in entries:
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise ConfigError("run.logger=wandb: wandb is not installed; pip install 'tokensel[wandb]'") from None
    for i, entry in enumerate(entries):
        if not (isinstance(entry, str) and entry in LOGGERS):
            path, _ = class_spec(entry, f"run.logger[{i}]")
            import_object(path, f"run.logger[{i}]")
    for i, entry in enumerate(run.callbacks):
        path, _ = class_spec(entry, f"run.callbacks[{i}]")
        import_object(path, f"run.callbacks[{i}]")


def build_loggers(run, run_name: str, version: str) -> list:
    """The run's Lightning loggers, all writing into ``<run.root>/<run_name>/<version>/``."""
    run_dir = Path(run.root) / run_name / version
    loggers = []
    for i, entry in enumerate(logger_entries(run.logger)):
        if entry == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=run.root, name=run_name, version=version,
                                             default_hp_metric=False))
        elif entry == "csv":
            loggers.append(CSVLogger(save_dir=run.root, name=run_name, version=version))
        elif entry == "wandb":  # WANDB_MODE=offline keeps it on disk (wandb sync later)
            run_dir.mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(project=run.wandb_project, name=f"{run_name}/{version}",
                                       save_dir=str(run_dir)))
        else:
            path, kwargs = class_spec(entry, f"run.logger[{i}]")
            loggers.append(instantiate(path, kwargs, f"run.logger[{i}]"))
    return loggers


def build_callbacks(run) -> list:
    """``run.callbacks`` as instances, in order."""
    return [instantiate(*class_spec(entry, f"run.callbacks[{i}]"), f"run.callbacks[{i}]")
            for i, entry in enumerate(run.callbacks)]


def instantiate(path: str, kwargs: dict, key: str) -> Any:
    cls = import_object(path, key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a wrong keyword argument
        raise ConfigError(f"{key}: {path}({', '.join(f'{k}=...' for k in kwargs)}): {err}") from None
