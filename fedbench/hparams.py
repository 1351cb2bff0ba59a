"""Hyper-parameters declared next to the code that uses them.

A method (or the core) declares a dataclass whose fields are made with :func:`hparam`; the CLI
options, ``fedbench list methods`` and validation are generated from those declarations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedbench.errors import ConfigError

FP32_MAX = 3.4028234663852886e38


def hparam(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False,
           marker: str = "", late: bool = False) -> Any:
    """A dataclass field with CLI help and a range or choice check.

    ``marker`` is the spec's source marker for the default (e.g. ``"reconstruction"``); it is shown in
    the help so that a reconstructed choice is never mistaken for a published one.
    ``late``: a method option added after runs were stored; a run's identity leaves it out while it is at
    its default, so every earlier run keeps its id (``RunConfig.canonical_json``).
    """
    meta = dict(help=help, choices=choices, low=low, high=high, low_open=low_open,
                high_open=high_open, marker=marker, late=late)
    return dataclasses.field(default=default, metadata=meta)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _type_of(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, type) else eval(f.type, {"int": int, "float": float,  # noqa: S307
                                                                "str": str, "bool": bool})
    return t


def field_type(f: dataclasses.Field) -> type:
    """The python type of a hyper-parameter field (only int, float, str, bool are allowed)."""
    t = _type_of(f)
    if t not in (int, float, str, bool):
        raise TypeError(f"hyper-parameter {f.name} must be int, float, str or bool, not {t}")
    return t


def coerce(f: dataclasses.Field, value: Any, owner: str) -> Any:
    """Convert and check one value; raise ConfigError naming the option and what is allowed."""
    t = field_type(f)
    name = option_name(f.name)
    meta = f.metadata
    if t is bool:
        if isinstance(value, bool):
            v = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            v = value.lower() in ("true", "1", "yes")
        else:
            raise ConfigError(f"{name} ({owner}) must be true or false, got {value!r}")
    elif t is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())
                                           or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{name} ({owner}) must be an integer, got {value!r}")
        v = int(value)
    elif t is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({owner}) must be a number, got {value!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{name} ({owner}) must be finite, got {value!r}")
        if abs(v) > FP32_MAX:  # every float option ends up in fp32 tensor arithmetic (lr, weight decay, ...)
            raise ConfigError(f"{name} ({owner}) must be at most {FP32_MAX:.4g} in magnitude (the fp32 range), "
                              f"got {value!r}")
    else:
        if not isinstance(value, str):
            raise ConfigError(f"{name} ({owner}) must be a string, got {value!r}")
        v = value
    if meta.get("choices") is not None and v not in meta["choices"]:
        raise ConfigError(f"{name} ({owner}) got {v!r}; choose from: {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (v < low or (meta.get("low_open") and v == low)):
        raise ConfigError(f"{name} ({owner}) must be {'>' if meta.get('low_open') else '>='} {low}"
                          f"{_upper(meta)}, got {v!r}")
    if high is not None and (v > high or (meta.get("high_open") and v == high)):
        raise ConfigError(f"{name} ({owner}) must be {'<' if meta.get('high_open') else '<='} {high}, got {v!r}")
    return v


def _upper(meta) -> str:
    if meta.get("high") is None:
        return ""
    return f" and {'<' if meta.get('high_open') else '<='} {meta['high']}"


def describe_range(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return "{" + ", ".join(map(str, meta["choices"])) + "}"
    lo, hi = meta.get("low"), meta.get("high")
    if lo is None and hi is None:
        return ""
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def build(cls: type, values: dict[str, Any], owner: str):
    """Instantiate the hyper-parameter dataclass ``cls`` from user values (unknown keys refused)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        allowed = ", ".join(option_name(n) for n in fields) or "none"
        raise ConfigError(f"{option_name(unknown[0])} does not apply to {owner}; its options: {allowed}")
    kwargs = {}
    for name, f in fields.items():
        kwargs[name] = coerce(f, values[name], owner) if name in values else f.default
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def late_defaults(params_cls) -> dict[str, Any]:
    """{name: default} of the ``late`` options of a Params dataclass."""
    return {f.name: f.default for f in dataclasses.fields(params_cls) if f.metadata.get("late")}
