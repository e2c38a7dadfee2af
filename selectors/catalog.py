"""Every built-in selector, trained or training-free, by name: the one place names are looked up.

Importing this module registers the built-in objectives (``gumbel_ae.py``, ``vp_noise.py``) and
baselines (``baselines.py``, ``baselines_merging.py``, ``baselines_query.py``). A new objective is one new file in ``selectors/`` with
``@register_selector(...)``, its import below, and ``experiments/<name>.yaml``; nothing else.

- :func:`selector_entry`, :func:`trained_names`, :func:`baseline_names`, :func:`baseline_class`, :func:`all_names`;
- :func:`build_baseline` (re-exported);
- :func:`build_net`: a trained selector's network at a given feature geometry (random weights);
- :func:`load_selector`: a trained selector from its checkpoint, exported folder or hub repo,
  without Lightning;
- :func:`selector_for`: ``full``, a baseline name or a trained selector (checkpoint, exported
  folder) -> a network, the one place eval-vlm, the lmms-eval plugin and the benches turn a name
  into a selector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tokensel.common.errors import UnknownNameError
from tokensel.datamodules.batch import FeatureDims
from tokensel.selectors import baselines_merging, baselines_query, gumbel_ae, vp_noise  # noqa: F401  (they register themselves)
from tokensel.selectors.baselines import BASELINES, build_baseline
from tokensel.selectors.inference import CheckpointError, SelectorNet, read_checkpoint
from tokensel.selectors.pretrained import is_pretrained_folder, load_pretrained
from tokensel.selectors.registry import SELECTORS, SelectorEntry

__all__ = ["all_names", "baseline_class", "baseline_names", "build_baseline", "build_net", "load_module",
           "load_selector", "selector_entry", "selector_for", "trained_names"]
FULL = "full"  # every token: no selector


def selector_entry(name: str) -> SelectorEntry:
    """The registered objective ``name``; an unknown name is a one-line error listing the others."""
    return SELECTORS.get(name)


def trained_names() -> list[str]:
    return SELECTORS.names()


def baseline_names() -> list[str]:
    return BASELINES.names()


def baseline_class(name: str) -> type:
    """The registered baseline ``name`` (its class, with ``Options``); an unknown name is one line."""
    return BASELINES.get(name, key="baselines")


def all_names() -> list[str]:
    return baseline_names() + trained_names()


def build_net(name: str, dims: FeatureDims, **config: Any) -> SelectorNet:
    """The network of objective ``name`` at its default config (``config`` overrides fields), with
    random weights, in eval mode: what ``make bench`` times."""
    entry = selector_entry(name)
    cfg = entry.config_cls(name=name, **{**entry.defaults, **config})
    return entry.module_cls.build_net(cfg, dims).eval()


def load_selector(path: str | Path, map_location: str | torch.device = "cpu") -> SelectorNet:
    """Rebuild a trained selector network, in eval mode, from a training checkpoint (``.ckpt``), a
    folder written by ``tokensel export`` / ``save_pretrained``, or a hub repo id holding one.

    Only the selector network's weights are read (``weights_only=True``, or safetensors); no
    Trainer, optimizer or encoder is built. The network keeps ``.config`` (its selector config),
    ``.dims`` (the feature geometry it was trained on) and ``.run_config`` (the run's config)::

        selector = load_selector("runs/gumbel_ae/version_0/checkpoints/last.ckpt")
        indices, kept = selector.select(features, 0.25)
    """
    local = Path(path).expanduser()
    if local.is_dir() or (not local.exists() and not str(path).endswith(".ckpt")):
        if local.is_dir() and not is_pretrained_folder(local):
            raise CheckpointError(f"{path}: a folder, but not an exported selector (no tokensel config.json); "
                                  "pass a .ckpt or a folder written by `tokensel export`")
        return load_pretrained(path, map_location)
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
    net.run_config = hp.get("config") or {}
    return net.eval()


def selector_for(spec: str, grid: tuple[int, int], seed: int = 0, key: str = "selector") -> tuple[str, Optional[SelectorNet]]:
    """``(name, net)`` for ``spec``: ``full`` (all tokens: no net), a training-free baseline built
    for features on ``grid`` (seeded), or a trained selector (a checkpoint, an exported folder or a
    hub id ``org/name``), read by :func:`load_selector`; anything else is one line naming ``key``."""
    if spec == FULL:
        return FULL, None
    if spec in BASELINES:
        return spec, build_baseline(spec, grid, seed)
    local = Path(spec).expanduser()
    if local.exists() or (spec.count("/") == 1 and not spec.endswith(".ckpt")):  # a file, a folder or a hub id
        net = load_selector(local if local.exists() else spec)
        return net.config.name, net
    raise UnknownNameError(f"{key}={spec!r}: neither {FULL}, a baseline ({', '.join(baseline_names())}), an "
                           "existing trained selector (a checkpoint or exported folder) nor a hub id (org/name)")


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """The whole training objective of a checkpoint (its LightningModule, with the frozen VLM an
    objective trains through rebuilt from its config), in eval mode and without a Trainer: what a
    diagnostic of the objective itself needs (``SelectorModule.train_test_gap``). Returns
    ``(module, global_step)``."""
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    entry = selector_entry(hp["selector"]["name"])
    module = entry.module_cls(selector=hp["selector"], dims=hp["dims"], optim=hp.get("optim"), config=hp.get("config"))
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("vlm.")]  # the frozen VLM is never in a checkpoint
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match {entry.name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval(), int(ckpt.get("global_step", 0))
