"""The machinery every config section shares: errors, checks and strict (de)serialisation.

``ConfigError`` is the one exception a bad config raises; ``_check_choice`` / ``_check_range`` and
``check_run_name`` are the checks the sections' ``validate`` methods are written with; ``to_dict``
and ``from_dict`` turn a nested dataclass into a plain dict and back, rejecting unknown keys (with a
"did you mean" hint), removed keys and values of the wrong type. The sections themselves live in
:mod:`rgdm.config` and :mod:`rgdm.config_methods`; reading YAML files is in :mod:`rgdm.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------------- #
# Generic (de)serialisation of nested dataclasses with strict checking.


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (lists, not tuples) of a dataclass config, safe for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


# Keys of earlier versions, with what replaced them (a config that still has one is refused, not ignored).
REMOVED_KEYS = {
    "max_log_ratio": "importance weights are now truncated relative to the batch (truncate_weights, "
                     "docs/rgdm.md); an absolute clip of the log-ratio turned the objective into plain RWR",
}


def from_dict(cls: type, values: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types.

    A section given in part keeps the rest of *its field's* default, not its class's: ``train:
    {steps: 100}`` in a fine-tuning file keeps fine-tuning's learning rate and EMA, and ``ppo:
    {batch_size: 16}`` keeps PPO-clip's epochs and batch advantages (``FinetuneConfig`` builds
    those sections with their own defaults)."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields and key in REMOVED_KEYS:
            raise ConfigError(f"{where}: removed; {REMOVED_KEYS[key]}")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key{_did_you_mean(str(key), fields)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _merged(_field_default(fields[key]), value)
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _field_default(field: dataclasses.Field) -> dict[str, Any]:
    """The plain dict of a dataclass-valued field's default ({} when it has none)."""
    if field.default_factory is not dataclasses.MISSING:
        return to_dict(field.default_factory())
    return {} if field.default is dataclasses.MISSING else to_dict(field.default)


def _merged(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over ``defaults``, section by section (a nested mapping merges, a value replaces)."""
    merged = dict(defaults)
    for key, value in values.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_sections else value
    return merged


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "5e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN passes every range check; inf is never a sensible setting
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- #
# Checks that the sections' ``validate`` methods are written with.


def check_run_name(name: Any, where: str = "name") -> str:
    """``name`` if it is usable as one directory under runs/; else a ConfigError saying why.

    A name is one path component: no separators (it must not escape runs/ or nest), not ``.`` or
    ``..`` (or only dots), and printable (no control characters that a shell would mangle).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: give a non-empty run name")
    if "/" in name or "\\" in name:
        raise ConfigError(f"{where}: {name!r} contains a path separator; a run name is one directory under runs/")
    if set(name) == {"."}:
        raise ConfigError(f"{where}: {name!r} is not a run name (only dots)")
    if not name.isprintable() or name != name.strip():
        raise ConfigError(f"{where}: {name!r} has control characters or surrounding spaces")
    return name


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def _check_choice(where: str, value: Any, choices: typing.Sequence[Any]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


def _check_range(where: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where}: {value} is outside {bounds}")
