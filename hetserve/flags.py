"""Command-line flags generated from config dataclasses: one --flag per field, its help from the
field's `help` metadata, so `--help` documents each setting where it is declared."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence


def _flag_type(annotation: str):
    for name, kind in (("bool", bool), ("int | str", str), ("float", float), ("int", int)):
        if annotation.startswith(name):
            return kind
    return str


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, only: Sequence[str] | None = None,
                        help_overrides: dict[str, str] | None = None) -> None:
    """One --flag per dataclass field, documented by the field's `help` metadata."""
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if only is not None and field.name not in only:
            continue
        flag = "--" + field.name.replace("_", "-")
        text = (help_overrides or {}).get(field.name) or field.metadata.get("help", "")
        kind = _flag_type(str(field.type))
        if kind is bool and field.default is False:
            group.add_argument(flag, action="store_const", const=True, default=None, help=text)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "stop":
            group.add_argument(flag, action="append", default=None, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)


def collect(args: argparse.Namespace, cls) -> dict:
    """The flags of `cls` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}
