"""A trained selector as a shareable folder: ``model.safetensors`` + ``config.json``, no Lightning.

Every :class:`~tokensel.selectors.inference.SelectorNet` has huggingface_hub's ``ModelHubMixin``
methods through :class:`PretrainedMixin`, the shape of ``PyTorchModelHubMixin``::

    net = load_selector("runs/gumbel_ae/version_0/checkpoints/last.ckpt")
    net.save_pretrained("exported/gumbel_ae")          # or: tokensel export CKPT FOLDER
    net = SelectorNet.from_pretrained("exported/gumbel_ae")   # a folder or a hub id
    net.push_to_hub("me/gumbel-ae-dinov2")             # needs a network and a token

``config.json`` says what the weights are and what they were trained on: the objective
(``objective``, its ``selector`` config), the feature geometry (``dims``), the encoder whose
features it selects from (``encoder``: name, weights, layer, norm, image size) and the whole run
config (``run_config``), so ``make eval`` can rebuild the same encoder. Loading reads the weights
with safetensors (no pickle) and checks every tensor name and shape against the rebuilt network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import ModelHubMixin

from tokensel.common.errors import CheckpointError
from tokensel.common.hub import hf_fetch, hf_model_is_local, hf_source_error
from tokensel.datamodules.batch import FeatureDims
from tokensel.selectors.registry import SELECTORS

FORMAT = "tokensel-selector"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_KEYS = ("name", "pretrained", "layer", "norm", "image_size", "init_seed")


def is_pretrained_folder(path: str | Path) -> bool:
    """A local folder holding an exported selector (its ``config.json`` names the format)."""
    config = Path(path).expanduser() / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_config(net: Any) -> dict:
    """What ``config.json`` holds for a trained network (``net.config``, ``net.dims``, ``net.run_config``)."""
    from dataclasses import asdict

    from tokensel import __version__

    if getattr(net, "dims", None) is None or getattr(net, "config", None) is None:
        raise CheckpointError(f"{type(net).__name__} is not a trained selector (no config/dims): "
                              "only selectors loaded from a checkpoint or built by an objective export")
    run_config = getattr(net, "run_config", None) or {}
    encoder = {k: v for k, v in (run_config.get("encoder") or {}).items() if k in ENCODER_KEYS}
    selector = asdict(net.config)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "tokensel_version": __version__,
            "objective": selector["name"], "selector": selector, "dims": net.dims.as_dict(), "encoder": encoder,
            "run_config": run_config}


def read_config(folder: Path, source: str) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot read {CONFIG_FILE} ({type(err).__name__})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{source}: {CONFIG_FILE} is not a tokensel selector export (format != {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: exported by a newer tokensel (format_version "
                              f"{config['format_version']} > {FORMAT_VERSION}); upgrade tokensel")
    missing = [k for k in ("objective", "selector", "dims") if k not in config]
    if missing:
        raise CheckpointError(f"{source}: {CONFIG_FILE} lacks {', '.join(missing)}")
    return config


def load_pretrained(name: str | Path, map_location: Any = "cpu", **hub_kwargs: Any):
    """The selector network of an exported folder or hub repo ``name``, in eval mode."""
    from safetensors.torch import load_file

    source = str(name)
    try:
        config_path = hf_fetch(source, CONFIG_FILE, **hub_kwargs)
        weights_path = hf_fetch(source, WEIGHTS_FILE, **hub_kwargs)
    except Exception as err:  # the hub's and the filesystem's errors, said in one line
        if hf_model_is_local(source) and Path(source).expanduser().is_dir():
            raise CheckpointError(f"{source}: not an exported selector ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
        raise CheckpointError(hf_source_error(f"selector {source!r}", source, err)) from None
    config = read_config(config_path.parent, source)
    entry = SELECTORS.get(config["objective"])
    net = entry.module_cls.build_net(entry.config_cls(**config["selector"]), FeatureDims.from_dict(config["dims"]))
    state = load_file(str(weights_path), device=str(map_location))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise CheckpointError(f"{source}: weights do not match {entry.name} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, other shape {reshaped[:3]})")
    net.load_state_dict(state)
    net.run_config = config.get("run_config") or {}
    return net.to(map_location).eval()


class PretrainedMixin(ModelHubMixin, library_name="tokensel", license="apache-2.0",
                      tags=["tokensel", "visual-token-selection"]):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a selector network
    (huggingface_hub's ``ModelHubMixin``; see the module docstring)."""

    run_config: Optional[dict] = None  # the run config it was trained with, when known

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        config = export_config(self)
        save_model(self, str(save_directory / WEIGHTS_FILE))
        (save_directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        map_location: Any = "cpu", **model_kwargs: Any):
        """The selector saved in a folder or a hub repo, whatever its objective (the folder's
        ``config.json`` names it; its module must be imported, as ``selectors/catalog.py`` does).
        Offline or missing, it raises one :class:`CheckpointError` line."""
        if model_kwargs:
            raise CheckpointError(f"from_pretrained: unexpected arguments {', '.join(model_kwargs)}")
        hub = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token,
               "local_files_only": local_files_only}
        return load_pretrained(pretrained_model_name_or_path, map_location,
                               **({} if hf_model_is_local(str(pretrained_model_name_or_path)) else hub))
