"""Every built-in selector, trained or training-free, by name: the one place names are looked up.

Importing this module registers the built-in objectives (``gumbel_ae.py``, ``vp_noise.py``) and
baselines (``baselines.py``). A new objective is one new file in ``selectors/`` with
``@register_selector(...)``, its import below, and ``experiments/<name>.yaml``; nothing else.

- :func:`selector_entry`, :func:`trained_names`, :func:`baseline_names`, :func:`all_names`;
- :func:`build_baseline` (re-exported);
- :func:`build_net`: a trained selector's network at a given feature geometry (random weights);
- :func:`load_selector`: a trained selector from its checkpoint, without Lightning;
- :func:`selector_for`: ``full``, a baseline name or a trained selector's checkpoint -> a network,
  the one place eval-vlm, the lmms-eval plugin and the benches turn a name into a selector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tokensel.common.errors import UnknownNameError
from tokensel.datamodules.batch import FeatureDims
from tokensel.selectors import gumbel_ae, vp_noise  # noqa: F401  (they register themselves)
from tokensel.selectors.baselines import BASELINES, build_baseline
from tokensel.selectors.inference import CheckpointError, SelectorNet, read_checkpoint
from tokensel.selectors.registry import SELECTORS, SelectorEntry

__all__ = ["all_names", "baseline_names", "build_baseline", "build_net", "load_selector", "selector_entry",
           "selector_for", "trained_names"]
FULL = "full"  # every token: no selector


def selector_entry(name: str) -> SelectorEntry:
    """The registered objective ``name``; an unknown name is a one-line error listing the others."""
    return SELECTORS.get(name)


def trained_names() -> list[str]:
    return SELECTORS.names()


def baseline_names() -> list[str]:
    return BASELINES.names()


def all_names() -> list[str]:
    return baseline_names() + trained_names()


def build_net(name: str, dims: FeatureDims, **config: Any) -> SelectorNet:
    """The network of objective ``name`` at its default config (``config`` overrides fields), with
    random weights, in eval mode: what ``make bench`` times."""
    entry = selector_entry(name)
    cfg = entry.config_cls(name=name, **{**entry.defaults, **config})
    return entry.module_cls.build_net(cfg, dims).eval()


def load_selector(path: str | Path, map_location: str | torch.device = "cpu") -> SelectorNet:
    """Rebuild a trained selector network from a training checkpoint, in eval mode.

    Only the selector network's weights are read (``weights_only=True``); no Trainer, optimizer
    or encoder is built. The network keeps ``.config`` (its selector config) and ``.dims`` (the
    feature geometry it was trained on)::

        selector = load_selector("runs/gumbel_ae/version_0/checkpoints/last.ckpt")
        indices, kept = selector.select(features, 0.25)
    """
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    entry = selector_entry(hp["selector"]["name"])
    config, dims = entry.module_cls.parse_hparams(hp)
    net = entry.module_cls.build_net(config, dims)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match {entry.name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval()


def selector_for(spec: str, grid: tuple[int, int], seed: int = 0, key: str = "selector") -> tuple[str, Optional[SelectorNet]]:
    """``(name, net)`` for ``spec``: ``full`` (all tokens: no net), a training-free baseline built
    for features on ``grid`` (seeded), or the path of a trained selector, read by
    :func:`load_selector`; anything else is one line naming ``key``."""
    if spec == FULL:
        return FULL, None
    if spec in BASELINES:
        return spec, build_baseline(spec, grid, seed)
    if Path(spec).expanduser().exists():
        net = load_selector(Path(spec).expanduser())
        return net.config.name, net
    raise UnknownNameError(f"{key}={spec!r}: neither {FULL}, a baseline ({', '.join(baseline_names())}) nor an "
                           "existing trained selector (a checkpoint)")
