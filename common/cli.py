"""How every entry point talks to its user: one argument parser and one error exit.

    from tokensel.common.cli import ArgumentParser, run_main

    def main(argv=None) -> int:
        args = ArgumentParser(prog="python -m tokensel.x", description="...").parse_args(argv)
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(run_main(main))

A :class:`~tokensel.common.errors.TokenselError` (a user mistake) anywhere below ``main`` ends as
``error: <one line>`` on stderr and exit status 2. argparse's own mistakes (an unknown option, a
missing argument) end the same way, through :class:`ArgumentParser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable, NoReturn, Optional

from tokensel.common.errors import TokenselError, UsageError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`UsageError` (one line) instead of printing
    the usage block and exiting by itself."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (--help for usage)")


def run_main(main: Callable[[Optional[list[str]]], int], argv: Optional[list[str]] = None) -> int:
    """Run ``main(argv)``; a user mistake becomes one ``error:`` line and exit status 2."""
    try:
        return main(argv)
    except TokenselError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


class _DropLightningAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage() and "litmodels" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence the library warnings that say nothing about the user's run (Lightning's adverts,
    its worker-count hints for our streaming loaders, ...)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).addFilter(_DropLightningAdverts())
    for pattern in (
        r".*IterableDataset.*has `__len__` defined.*",
        r".*does not have many workers.*",
        r".*smaller than the logging interval.*",
        r".*when logging on epoch level in distributed setting.*",
        r".*Found \d+ module\(s\) in eval mode.*",
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
