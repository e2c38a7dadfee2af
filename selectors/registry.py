"""Trained selector objectives by name, as timm's ``@register_model``: ``SELECTOR=gumbel_ae``.

An entry is a LightningModule class, its config dataclass and the config defaults that make this
entry different from others sharing the class (``straight_through`` is ``gumbel_ae`` with
``estimator="straight_through"``)::

    @register_selector("gumbel_ae", GumbelAEConfig)
    class GumbelAESelector(SelectorModule): ...

The built-in objectives register when their modules are imported; ``selectors/catalog.py``
imports them all and is where names are looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tokensel.common.registry import Registry


@dataclass(frozen=True)
class SelectorEntry:
    name: str
    module_cls: type
    config_cls: type
    defaults: dict[str, Any] = field(default_factory=dict)

    def make_config(self) -> Any:
        """This entry's default config (the dataclass with the entry's defaults applied)."""
        return self.config_cls(name=self.name, **self.defaults)


SELECTORS: Registry[SelectorEntry] = Registry("selector")


def register_selector(name: str, config_cls: type, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: register ``name`` -> (module class, config class, defaults)."""

    def wrap(module_cls: type) -> type:
        SELECTORS.register(name, SelectorEntry(name, module_cls, config_cls, dict(defaults)))
        return module_cls

    return wrap
