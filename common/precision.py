"""The dtype behind every ``precision`` key (``encoder.precision``, ``selector.vlm.precision``)."""

from __future__ import annotations

import torch

from tokensel.common.errors import ConfigError

DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def check_precision(key: str, value: str) -> torch.dtype:
    """The dtype of ``value``; a :class:`ConfigError` naming ``key`` for anything else."""
    if value not in DTYPES:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[value]
