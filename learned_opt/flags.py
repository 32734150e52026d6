"""Command-line flags from dataclass fields, shared by the ``learned-opt`` CLI and the experiment scripts."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Container


def parse_bool(text: str) -> bool:
    """``true/1/yes/on`` or ``false/0/no/off`` (any case); anything else is an error, not a silent False."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, skip: Container[str] = (),
                        dashes: bool = False) -> None:
    """One ``--field`` flag per field of dataclass ``cls`` (``dest`` is the field name; default ``None`` so that
    the caller can tell a flag that was not given). Booleans parse strictly, ints / floats / strings by their
    default's type, and tuples stay comma-separated strings for the caller to split."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (f.name.replace("_", "-") if dashes else f.name)
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, type=parse_bool, metavar="{true,false}")
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=kind)
        else:
            parser.add_argument(flag, dest=f.name, type=str, metavar="A,B,...")
