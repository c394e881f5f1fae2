"""Lazy package attributes (PEP 562): `from pipeline.side import SideConfig` keeps working while
`import pipeline.side.config` (the CLI's --help path) does not pull torch in through __init__."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<names[attr]>`` on first use of ``attr``."""
    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
