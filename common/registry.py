"""One small registry, as timm's model registry: things by name, looked up with a one-line error.

Every "pick a thing by name" in tokensel is one of these: selectors and baselines
(``selectors/registry.py``, ``selectors/baselines.py``), encoder families
(``datamodules/encoders/``), VLM families (``vlms/base.py``, by Hugging Face ``model_type``), VLM
backends (``selectors/vlm_backends.py``) and raw-data converters
(``datamodules/convert.py``)::

    ENCODERS = Registry("encoder library")

    @ENCODERS.register("timm")
    def build_timm(...): ...

    ENCODERS.get("timm")      # the builder; an unknown name raises UnknownNameError
    ENCODERS.names()          # ['timm', 'open_clip', 'hf', ...]
"""

from __future__ import annotations

from typing import Generic, Iterator, Optional, TypeVar

from tokensel.common.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> value. ``kind`` names what is registered, for error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, value: Optional[T] = None):
        """``register(name, value)``, or ``@register(name)`` as a decorator. A name is taken once."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] != item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        if value is not None:
            return add(value)
        return add  # type: ignore[return-value]

    def get(self, name: str, key: Optional[str] = None) -> T:
        """The value of ``name``; else :class:`UnknownNameError` naming ``key`` (a config key) if given."""
        if name not in self._items:
            where = f"{key}={name!r}: unknown {self.kind}" if key else f"unknown {self.kind} {name!r}"
            raise UnknownNameError(f"{where}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._items[name]) for name in self.names()]

