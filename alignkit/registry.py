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
import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def import_object(path: str) -> object:
    """Import ``package.module:attr`` or ``package.module.attr``: the module's code runs, like a script's.

    Raises:
        ImportError: one line naming the path and the cause: a missing module (with a hint when it is a
            file of the current folder, which is not on the import path of the ``alignkit`` command), a
            missing dependency, a syntax error (file:line), an exception raised while the module ran
            (file:line) or a missing attribute (with the names the module defines).
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
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ImportError(f"cannot import module {module_name!r} from {path!r}: no module named {missing!r}. "
                              "Check the spelling and that the module is on PYTHONPATH or installed."
                              f"{_cwd_hint(missing)}") from None
        raise ImportError(f"module {module_name!r} (from {path!r}) could not be imported: it imports {missing!r}, "
                          f"which is not installed ({_raised_at(exc, module_name)}); install it") from None
    except SyntaxError as exc:
        raise ImportError(f"module {module_name!r} (from {path!r}) has a syntax error at {exc.filename}:{exc.lineno}: "
                          f"{exc.msg}; fix the file") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed while it ran
        raise ImportError(f"module {module_name!r} (from {path!r}) raised {type(exc).__name__} while it was imported "
                          f"({_raised_at(exc, module_name)}): {_one_line(exc)}; fix the module") from None
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            owner = f"module {module_name!r}" if i == 0 else repr(f"{module_name}:{'.'.join(attr_path.split('.')[:i])}")
            names = sorted(n for n in vars(obj) if not n.startswith("_") and callable(getattr(obj, n)))
            raise ImportError(f"{owner} has no attribute {part!r} (from {path!r}); it defines: "
                              f"{', '.join(names) or 'no public callables'}")
        obj = getattr(obj, part)
    return obj


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _raised_at(exc: BaseException, module_name: str) -> str:
    """``file:line`` where ``exc`` was raised: the deepest frame in the module's own file, else the deepest."""
    frames = traceback.extract_tb(exc.__traceback__)
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    own = [f for f in frames if spec is not None and f.filename == spec.origin]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame is not None else "location unknown"


def _cwd_hint(module_name: str) -> str:
    top = module_name.partition(".")[0]
    here = Path.cwd()
    on_path = {str(here), "", "."} & set(sys.path)
    if not on_path and ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()):
        return (f" ({top!r} is in the current folder, {here}, which is not on the import path of the alignkit "
                "command: run with PYTHONPATH=. or install it)")
    return ""


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
                ep = obj
                try:  # as ep.load(), with import_object's one-line errors
                    obj = import_object(f"{ep.module}:{ep.attr}") if ep.attr else ep.load()  # type: ignore[union-attr]
                except ImportError as exc:
                    raise ImportError(f"{self.kind} {name!r} (entry point {ep.value!r} of group "  # type: ignore[union-attr]
                                      f"{self.entry_point_group}): {exc}") from None
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
