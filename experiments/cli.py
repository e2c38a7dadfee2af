"""The ``tokensel`` command: one subcommand per make target, each the module the target runs.

    tokensel train gumbel_ae trainer.max_steps=50      # make train SELECTOR=gumbel_ae ARGS="..."
    tokensel eval --selectors random,divprune          # make eval SELECTORS=random,divprune
    tokensel <command> --help                          # that command's own options

A new command is one entry in :data:`COMMANDS`: its name, the module whose ``main(argv)`` runs it,
arguments put before the user's (``collapse`` and ``curve`` are ``sweep`` on a shipped sweep file), and a
line of help. The module is imported only when its command runs, so ``tokensel --help`` is quick.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from tokensel import __version__
from tokensel.common.cli import run_main
from tokensel.common.errors import UsageError


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    prefix: Callable[[], list[str]] = list  # arguments placed before the user's


def _shipped_sweep(name: str) -> Callable[[], list[str]]:
    def prefix() -> list[str]:
        from tokensel.experiments.config import EXPERIMENTS_DIR

        return [str(EXPERIMENTS_DIR / "sweeps" / f"{name}.yaml")]

    return prefix


def _default_corpus() -> list[str]:
    return ["--out", "data/default"]


COMMANDS: dict[str, Command] = {
    "train": Command("tokensel.experiments.train", "train a selector: train gumbel_ae [--config F.yaml] [key=value ...]"),
    "eval": Command("tokensel.experiments.evaluate", "compare selectors on held-out data (make eval)"),
    "eval-vlm": Command("tokensel.experiments.eval_vlm", "a pruned VLM's answers per selector and budget (make eval-vlm)"),
    "bench": Command("tokensel.experiments.bench", "selector latency against the encoder (make bench)"),
    "bench-train": Command("tokensel.experiments.bench_train", "training steps/s: online vs feature cache (make bench-train)"),
    "sweep": Command("tokensel.experiments.sweep", "an ablation sweep: sweep depth|FILE.yaml [--launcher slurm] (make sweep)"),
    "collapse": Command("tokensel.experiments.sweep", "the regulariser collapse study (make collapse)",
                        _shipped_sweep("collapse")),
    "curve": Command("tokensel.experiments.sweep", "learning curves over seeds: curve --selector gumbel_ae "
                     "[--seeds 0,1,2] (make curve)", _shipped_sweep("curve")),
    "data": Command("tokensel.datamodules.synthetic", "generate the default corpus in data/default (make data)", _default_corpus),
    "convert": Command("tokensel.datamodules.convert", "convert a raw dataset (COCO, DocVQA, ...) to shards"),
    "vlm": Command("tokensel.experiments.vlm_build", "build (once) a small real LLaVA in data/vlm (make vlm)"),
    "teacher": Command("tokensel.experiments.teacher", "build (once) the corpus teacher, vp_noise's default VLM (make teacher)"),
    "export": Command("tokensel.experiments.export", "a checkpoint as a shareable folder: export CKPT FOLDER (make export)"),
    "plot-run": Command("tokensel.experiments.plot_run", "plot one run's TensorBoard scalars"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: tokensel <command> [args ...]   (tokensel {__version__})", "",
             "Train and compare visual-token selectors for vision-language models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "tokensel <command> --help shows a command's options; docs/configuration.md lists the config keys."]
    return "\n".join(lines)


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"tokensel {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        raise UsageError(f"tokensel: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (tokensel --help)")
    main = importlib.import_module(command.module).main
    return main([*command.prefix(), *argv[1:]])


def main(argv: Optional[list[str]] = None) -> int:
    return run_main(dispatch, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
