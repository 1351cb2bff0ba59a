"""Method registry: ``@register_method("name")`` plus entry points in group ``fedbench.methods``.

A separate package adds a method by declaring, in its pyproject::

    [project.entry-points."fedbench.methods"]
    mymethod = "mypkg.mymethod:MyMethod"

The class is registered under the entry point's name when the registry is first listed. The core's
methods (the headline method and the federated-LoRA family, one module a method) are found the same way,
by module name (``fedbench/plugins.py``).
"""

from __future__ import annotations

from fedbench.plugins import Registry


def _name_class(name: str, cls) -> None:
    cls.name = name


METHODS = Registry("method", "fedbench.methods", core=("fedbench.methods.fedlora", "fedbench.methods.lora"),
                   on_register=_name_class)


def register_method(name: str):
    """Class decorator: register a method class under ``name`` (a second class under one name is an error)."""
    return METHODS.register(name)


def methods() -> dict[str, type]:
    """Every registered method (the core's, then entry-point plugins'), by name, sorted."""
    return dict(sorted(METHODS.entries().items()))


def get_method(name: str) -> type:
    """The method class registered as ``name``; ``ConfigError`` naming the choices (or the plugin's load
    error) otherwise."""
    return METHODS.get(name)
