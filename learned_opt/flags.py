"""Command-line flags and typed settings, shared by the ``learned-opt`` CLI and the experiment scripts.

Flags come from dataclass fields (:func:`add_dataclass_flags`); values from config files and ``KEY=VALUE`` flags are
checked against type hints (:func:`coerce`, :func:`coerce_kwargs`), so that ``"random_offset": "no"`` is an error
that names the key instead of a truthy string.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import math
import typing
from typing import Any, Callable, Container, Dict, Mapping, Optional

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
_SEQUENCES = (tuple, list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def parse_bool(text: str) -> bool:
    """``true/1/yes/on`` or ``false/0/no/off`` (any case); anything else is an error, not a silent False."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    """An integer, also written as ``1e6`` (an integral number in scientific notation)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}")
    if not (math.isfinite(value) and value.is_integer()):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}")
    return int(value)


def at_most(limit: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= 1 and <= ``limit`` (``what`` says why there is a limit)."""
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text} exceeds the maximum of {limit} ({what})")
        return value
    return parse


def finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused here, where the flag is named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def describe(hint: Any) -> str:
    """How a value of type ``hint`` is described in an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(describe(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin in _SEQUENCES:
        return f"a list of {describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if origin in _MAPPINGS:
        return "an object of KEY: VALUE"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            torch.dtype: "a dtype (" + ", ".join(DTYPES) + ")"}.get(hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


# Scalar hints -> (accepted types, refused types, conversion or None). Python counts a bool as an int, but
# ``true`` given for a count or a rate is a mistake: int and float refuse it.
_SCALARS = {bool: (bool, (), None), int: (int, bool, None), float: ((int, float), bool, float), str: (str, (), None)}


def _exact(value: Any, accept, refuse, convert: Optional[Callable[[Any], Any]]) -> Any:
    """``value`` (through ``convert`` when given) if it is an ``accept`` and not a ``refuse``; else ``_Mismatch``."""
    if isinstance(value, refuse) or not isinstance(value, accept):
        raise _Mismatch
    return value if convert is None else convert(value)


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in _SEQUENCES:
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str) or item is Any:
                raise _Mismatch
            value = [value]  # hidden=8 means (8,)
        return tuple(_coerce(v, item) for v in value)
    if origin in _MAPPINGS or hint is dict:
        return _exact(value, dict, (), dict)
    scalar = _SCALARS.get(hint) if isinstance(hint, type) else None
    if scalar is not None:
        return _exact(value, *scalar)
    if hint is torch.dtype:
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
            return DTYPES[value.replace("torch.", "")]
        raise _Mismatch
    return value  # a type we do not check: the constructor will


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` (an int may stand for a float or a one-element list), else ``ValueError``."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        raise ValueError(f"{name} must be {describe(hint)}, got {value!r}") from None


def type_hints(cls) -> Dict[str, Any]:
    """Keyword arguments of ``cls`` (a dataclass or a class's ``__init__``) and their type hints."""
    init = cls if dataclasses.is_dataclass(cls) else cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: check nothing rather than fail
        hints = {}
    params = inspect.signature(cls).parameters
    return {n: hints.get(n, Any) for n, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def coerce_kwargs(cls, kwargs: Mapping[str, Any], where: str, skip: Container[str] = ()) -> Dict[str, Any]:
    """``kwargs`` checked against the keyword arguments of ``cls``; errors name ``where`` (a flag or a file)."""
    hints = type_hints(cls)
    out = {}
    for k, v in kwargs.items():
        if k in skip:
            out[k] = v
            continue
        if k not in hints:
            raise ValueError(f"{where}: unknown key {k!r}; known: {', '.join(sorted(hints))}")
        out[k] = coerce(v, hints[k], f"{where} {k}")
    return out


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, skip: Container[str] = (),
                        dashes: bool = False, choices: Optional[Mapping[str, Any]] = None,
                        help: Optional[Mapping[str, str]] = None) -> None:
    """One ``--field`` flag per field of dataclass ``cls`` (``dest`` is the field name; default ``None`` so that
    the caller can tell a flag that was not given; the help text shows the field's default). Booleans parse
    strictly, ints / floats / strings by their default's type, and tuples stay comma-separated strings for the
    caller to split. ``choices`` (field -> allowed values) only shows them: checks stay with the caller."""
    choices, help = choices or {}, help or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (f.name.replace("_", "-") if dashes else f.name)
        kind = type(f.default)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) or "none"
        elif isinstance(default, bool):
            default = str(default).lower()
        text = (help.get(f.name, "") + f" (default: {default})").strip()
        metavar = "{" + ",".join(map(str, choices[f.name])) + "}" if f.name in choices else None
        if kind is bool:
            parser.add_argument(flag, dest=f.name, type=parse_bool, metavar="{true,false}", help=text)
        elif kind is int:
            parser.add_argument(flag, dest=f.name, type=parse_int, metavar=metavar or "N", help=text)
        elif kind is float:
            parser.add_argument(flag, dest=f.name, type=float, metavar=metavar or "X", help=text)
        elif kind is str:
            parser.add_argument(flag, dest=f.name, type=str, metavar=metavar, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, metavar="A,B,...", help=text)
