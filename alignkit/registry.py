"""Named registries with helpful errors and plug-in discovery.

A registry maps a short name to a factory (class or function). Names come from three places:

* ``@REGISTRY.register("name")`` in code that has been imported;
* Python entry points in the group ``alignkit.<registry kind>`` (how ``modalities/`` and ``rewards/``
  plug in without the core importing them);
* a dotted path ``package.module:attribute`` (or ``package.module.attribute``) given in a recipe.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def import_object(path: str) -> object:
    """Import ``package.module:attr`` or ``package.module.attr``.

    Raises:
        ImportError: with the path and the reason when the module or attribute is missing.
    """
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ImportError(
            f"{path!r} is not an import path; write it as 'package.module:name' (e.g. 'my_rewards:score')"
        )
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"cannot import module {module_name!r} from {path!r}: {exc}. "
            "Check the spelling and that the module is on PYTHONPATH or installed."
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"module {module_name!r} has no attribute {attr_path!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def _is_entry_point(obj: object) -> bool:
    return hasattr(obj, "load") and hasattr(obj, "group") and hasattr(obj, "value")


def is_import_path(name: str) -> bool:
    """Whether ``name`` looks like a dotted import path rather than a registry name."""
    return ":" in name or "." in name


class Registry(Generic[T]):
    """A name -> factory map for one kind of component (``sampler``, ``reward``, ``credit``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    @property
    def entry_point_group(self) -> str:
        return f"alignkit.{self.kind}"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a taken name raises."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        self._load_entry_points()
        existing = self._items.get(name)
        own = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
        if _is_entry_point(existing) and existing.value == own:  # type: ignore[union-attr]
            existing = None  # the entry point's own module registering itself
        if existing is not None and existing is not obj:
            raise RegistryError(
                f"{self.kind} name {name!r} is already registered to {existing!r}; "
                f"choose another name for {obj!r}"
            )
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            self._items[ep.name] = ep  # type: ignore[assignment]  # resolved lazily in get()

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """Return the factory for ``name`` (a registry name or a dotted import path)."""
        self._load_entry_points()
        if name in self._items:
            obj = self._items[name]
            if _is_entry_point(obj):
                obj = obj.load()  # type: ignore[union-attr]
                self._items[name] = obj
            return obj
        if is_import_path(name):
            return import_object(name)  # type: ignore[return-value]
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(self.names()) or '(none)'}; "
            "or give a dotted import path 'package.module:name'."
        )

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


SAMPLERS: Registry = Registry("samplers")
REWARDS: Registry = Registry("rewards")
CREDIT_ASSIGNERS: Registry = Registry("credit")
EXPLORATION_PLANS: Registry = Registry("plans")
STEP_KINDS: Registry = Registry("steps")
PROMPT_SOURCES: Registry = Registry("prompts")
SHIPPED_MODELS: Registry = Registry("models")
"""``builtin:<name>`` model folders shipped inside the package (the worlds' pretrained models): each entry is a
function returning the folder's ``Path``, registered through the ``alignkit.models`` entry point."""
