"""A registry of named classes, filled by a decorator and by third-party packages' entry points.

Methods (``fedbench/registry.py``), partitioners (``fedbench/data/partition.py``) and backbones
(``fedbench/models/backbones.py``) each keep one. The core's own entries are modules named by string and
imported when the registry is first listed, exactly as entry points are: a registry never imports its
entries' modules at its own import, so an entry can import the registry without an import cycle. A
separate package adds an entry by declaring, in its pyproject::

    [project.entry-points."fedbench.partitioners"]
    myname = "mypkg.mymodule:MyPartitioner"

The object is registered under the entry point's name (unless its module registered it already).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any

from fedbench.errors import ConfigError, choice_error


class Registry:
    """Named entries of one kind (``what``: "method", "partition", ...), from ``core`` modules (a package
    name loads each of its modules) and the entry-point ``group``."""

    def __init__(self, what: str, group: str, core: tuple[str, ...],
                 on_register: Callable[[str, Any], None] | None = None):
        self.what = what
        self.group = group
        self.core = core
        self.on_register = on_register
        self._entries: dict[str, Any] = {}
        self._loaded = False
        self.load_errors: dict[str, str] = {}

    def register(self, name: str):
        """Decorator: register ``obj`` under ``name`` (a second object under one name is an error)."""
        def deco(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.what} {name!r} registered twice ({self._entries[name]} and {obj})")
            if self.on_register is not None:
                self.on_register(name, obj)
            self._entries[name] = obj
            return obj
        return deco

    def _discover(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self.core:
            mod = importlib.import_module(module)
            if hasattr(mod, "__path__"):  # a package: one module an entry
                for sub in sorted(pkgutil.iter_modules(mod.__path__), key=lambda m: m.name):
                    importlib.import_module(f"{module}.{sub.name}")
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break the others
                self.load_errors[ep.name] = f"{type(e).__name__}: {e}"
                continue
            if ep.name not in self._entries:
                self.register(ep.name)(obj)

    def entries(self) -> dict[str, Any]:
        """Every entry by name, in registration order: the core's, then entry-point plugins'."""
        self._discover()
        return dict(self._entries)

    def names(self) -> tuple[str, ...]:
        """Every entry's name, in registration order."""
        return tuple(self.entries())

    def get(self, name: str) -> Any:
        """The entry ``name``; a ``ConfigError`` naming the choices (or the plugin's load error) otherwise."""
        entries = self.entries()
        if name not in entries:
            if name in self.load_errors:
                raise ConfigError(f"{self.what} {name!r} failed to load: {self.load_errors[name]}")
            raise choice_error(self.what, name, entries)
        return entries[name]


class Names:
    """The names of a registry (plus ``extra`` ones), listed when asked: usable as an option's ``choices``
    before plugins are loaded (``in``, iteration, ``len``)."""

    def __init__(self, registry: Registry, extra: Callable[[], tuple[str, ...]] = tuple):
        self.registry = registry
        self.extra = extra

    def _all(self) -> tuple[str, ...]:
        return (*self.registry.names(), *self.extra())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return repr(self._all())
