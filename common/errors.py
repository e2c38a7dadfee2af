"""One base class for user mistakes: every entry point catches :class:`TokenselError` once and
prints its message as one line with exit status 2 (``common/cli.py``). Anything else is a bug and
keeps its traceback.

Subclasses name the layer that found the mistake (``ConfigError``, ``ShardFormatError``,
``EncoderError``, ``VLMError``, ``BudgetError``, ``CheckpointError``, ...). Messages are one line
and name the file, key or value at fault.
"""

from __future__ import annotations


class TokenselError(ValueError):
    """A user mistake: bad config, bad file, bad name. The message is one line."""


class ConfigError(TokenselError):
    """A bad config key or value (``selector.*``, ``data.*``, ``trainer.*``, ...); names the key."""


class UsageError(TokenselError):
    """A bad command line (unknown option, missing argument)."""


class UnknownNameError(ConfigError):
    """A name that no :class:`~tokensel.common.registry.Registry` holds; lists the names it does."""


class VLMError(TokenselError):
    """A user-facing problem with a vision-language model: a missing folder, an offline hub id, a
    ``model_type`` no family registers, an image or option the model cannot take."""


class CheckpointError(TokenselError):
    """A checkpoint that cannot be used: missing, damaged, holding pickled objects, not a tokensel
    selector checkpoint, or not fitting the features."""
