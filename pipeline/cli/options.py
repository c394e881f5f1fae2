"""Command-line flags derived from config dataclasses: each option is declared once, on its field.

A field's ``metadata`` carries ``help`` (required for a flag), and optionally ``choices``,
``flag`` (another spelling), ``aliases`` (old spellings kept working) and ``cli=False`` (not a
flag). Flags default to ``None`` so a command can tell "given" from "not given" and merge flags
over a config file; the help shows the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable


def _base_type(tp: Any) -> Any:
    """int for ``int | None``, etc."""
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "dict": dict, "Any": Any})  # noqa: S307 - our own annotations
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def cli_fields(cls: type, names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags, in declaration order (or in ``names`` order)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    chosen = [fields[n] for n in names] if names is not None else list(fields.values())
    skip = set(exclude)
    return [f for f in chosen if f.name not in skip and f.metadata.get("cli", True) and "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser, cls: type,
                names: Iterable[str] | None = None, exclude: Iterable[str] = (), *,
                show_defaults: bool = True, overrides: dict[str, dict] | None = None,
                exclusive: Iterable[str] = (), title: str | None = None) -> None:
    """Add one flag per field of ``cls`` (see module doc). Fields with a ``group`` in their metadata
    go into that argument group (mutually exclusive when the group is in ``exclusive``); ``title``
    puts every other flag into one group; ``overrides`` adjusts argparse kwargs per field."""
    groups: dict[str | None, Any] = {None: parser.add_argument_group(title) if title else parser}
    for f in cli_fields(cls, names, exclude):
        g = f.metadata.get("group")
        if title and g not in exclusive:
            g = None
        if g not in groups:
            groups[g] = parser.add_mutually_exclusive_group() if g in exclusive else parser.add_argument_group(g)
        target = groups[g]
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = _base_type(f.type)
        help_text = f.metadata["help"]
        if tp is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = tp if tp in (int, float) else str
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            if show_defaults and f.metadata.get("show_default", True) and default is not None:
                help_text += f" (default {default})"
        kw["help"] = help_text
        kw.update((overrides or {}).get(f.name, {}))
        target.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **kw)


def given(args: argparse.Namespace, cls: type, names: Iterable[str] | None = None,
          exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The options of ``cls`` the user gave on the command line (flags left at None are absent)."""
    out = {}
    for f in cli_fields(cls, names, exclude):
        v = getattr(args, f.name, None)
        if v is not None and v is not False:
            out[f.name] = v
    return out
