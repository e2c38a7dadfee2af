"""The VLM-family wing: every vision-language model tokensel prunes, trains against or evaluates.

One file per family, each registered under its Hugging Face ``model_type`` (``base.FAMILIES``):

- ``llava`` (``llava.py``): LLaVA-1.5, one view of N tokens;
- ``llava_next`` (``llava_next.py``): LLaVA-NeXT's anyres views;
- ``qwen2_5_vl`` (``qwen2_5_vl.py``) and ``qwen3_vl`` (``qwen3_vl.py``, DeepStack), sharing
  ``qwen.py``: post-merger tokens per image at its own grid, 3-D M-RoPE.

The interface is ``base.py`` (candidates, splice, answer, the NTP head of ``ntp.py``, the feature
source of ``sources.py``). This package imports only ``tokensel.common``, torch and transformers;
a selector reaches it as an argument. A new family is one file here, imported below, plus its
tiny-model fixture in ``tests/conftest.py``: the contract tests loop over :data:`FAMILIES`.

    vlm = open_vlm("Qwen/Qwen2.5-VL-7B-Instruct", precision="bf16")
    answers = vlm.generate(images, questions, selector, 0.25)
"""

from __future__ import annotations

from typing import Optional

from tokensel.common.errors import VLMError
from tokensel.common.hub import hf_source_error
from tokensel.common.precision import check_precision
from tokensel.vlms import llava, llava_next, qwen2_5_vl, qwen3_vl  # noqa: F401  (they register themselves)
from tokensel.vlms.base import FAMILIES, Candidates, PrunedPrompt, VLMFamily
from tokensel.vlms.sources import fetching, model_source, read_config

__all__ = ["FAMILIES", "Candidates", "PrunedPrompt", "VLMFamily", "family_of", "open_vlm", "HF_LIBRARIES"]

HF_LIBRARIES = ("hf", "hf_llava")  # encoder.name=hf:<model>; hf_llava: is the older spelling


def family_of(name: str, label: str = "model") -> tuple[type, object]:
    """``(family class, config)`` of the folder or hub id ``name`` (reads only its config); one line
    naming the value when no family registers its ``model_type``."""
    config = read_config(name, label)
    if config.model_type not in FAMILIES:
        raise VLMError(f"{label}={name!r}: model_type {config.model_type!r} has no VLM family; registered: "
                       f"{', '.join(FAMILIES.names())}")
    return FAMILIES.get(config.model_type), config


def open_vlm(name: str, precision: str = "32", label: str = "model", **options) -> VLMFamily:
    """The family of ``name`` with its model (in ``precision``) and processor loaded. ``options``
    (``feature_space``, ``view_selection``, ``positions``, ``image_size``) are checked before
    anything heavy is loaded."""
    import transformers
    from transformers import AutoProcessor

    dtype = check_precision("precision", precision)
    family, _ = family_of(name, label)
    family.check_options(**options)
    try:
        with fetching(name, "model", label):
            processor = AutoProcessor.from_pretrained(model_source(name))
            model = getattr(transformers, family.model_class).from_pretrained(model_source(name), dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise VLMError(hf_source_error(f"{label}={name!r}", name, err)) from None
    return family(model, processor, **options)


def check_vlm(name: str, label: str = "model", **options) -> type:
    """The family class of ``name`` once its options are checked, without loading the model."""
    family, _ = family_of(name, label)
    family.check_options(**options)
    return family


def encoder_model(name: str) -> Optional[str]:
    """The model of an ``hf:<model>`` (or ``hf_llava:<model>``) encoder name, else None."""
    library, sep, model = name.partition(":")
    return model if sep and library in HF_LIBRARIES else None
