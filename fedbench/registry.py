"""Method registry: ``@register_method("name")`` plus entry points in group ``fedbench.methods``.

A separate package adds a method by declaring, in its pyproject::

    [project.entry-points."fedbench.methods"]
    mymethod = "mypkg.mymethod:MyMethod"

The class is registered under the entry point's name when the registry is first listed.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from fedbench.errors import ConfigError, choice_error

_METHODS: dict[str, type] = {}
_loaded = False
_load_errors: dict[str, str] = {}


def register_method(name: str):
    """Class decorator: register a method class under ``name`` (a second class under one name is an error)."""
    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice ({_METHODS[name]} and {cls})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import fedbench.methods.fedlora  # noqa: F401  (the headline method ships in the core)
    import fedbench.methods.lora as family  # the federated-LoRA family ships in the core: one module a method

    for mod in sorted(pkgutil.iter_modules(family.__path__), key=lambda m: m.name):
        importlib.import_module(f"{family.__name__}.{mod.name}")

    for ep in entry_points(group="fedbench.methods"):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not break the others
            _load_errors[ep.name] = f"{type(e).__name__}: {e}"
            continue
        if ep.name not in _METHODS:
            register_method(ep.name)(cls)


def methods() -> dict[str, type]:
    """Every registered method (the core's, then entry-point plugins'), by name, sorted."""
    _discover()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> type:
    """The method class registered as ``name``; ``ConfigError`` naming the choices (or the plugin's load
    error) otherwise."""
    all_methods = methods()
    if name not in all_methods:
        if name in _load_errors:
            raise ConfigError(f"method {name!r} failed to load: {_load_errors[name]}")
        raise choice_error("method", name, all_methods)
    return all_methods[name]
