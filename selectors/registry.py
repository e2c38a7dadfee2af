"""Selectors by name, as timm's ``@register_model``: ``SELECTOR=gumbel_ae`` picks one.

An entry is a LightningModule class, its config dataclass and the config defaults that make
this entry different from others sharing the class (``straight_through`` is ``gumbel_ae`` with
``estimator="straight_through"``)::

    @register_selector("gumbel_ae", GumbelAEConfig)
    class GumbelAESelector(SelectorModule): ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# Modules that register the built-in objectives, imported on first lookup.
BUILTIN_MODULES = ("tokensel.selectors.gumbel_ae", "tokensel.selectors.vp_noise")

_REGISTRY: dict[str, "SelectorEntry"] = {}


class UnknownSelectorError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class SelectorEntry:
    name: str
    module_cls: type
    config_cls: type
    defaults: dict[str, Any] = field(default_factory=dict)

    def make_config(self) -> Any:
        """This entry's default config (the dataclass with the entry's defaults applied)."""
        return self.config_cls(name=self.name, **self.defaults)


def register_selector(name: str, config_cls: type, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: register ``name`` → (module class, config class, defaults)."""

    def wrap(module_cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].module_cls is not module_cls:
            raise ValueError(f"selector {name!r} is already registered to {_REGISTRY[name].module_cls.__name__}")
        _REGISTRY[name] = SelectorEntry(name, module_cls, config_cls, dict(defaults))
        return module_cls

    return wrap


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def list_selectors() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_entry(name: str) -> SelectorEntry:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownSelectorError(f"unknown selector {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
