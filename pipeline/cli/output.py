"""How every command prints its result: one JSON object with --json, readable text otherwise."""

from __future__ import annotations

import argparse
import json
from typing import Callable


def add_output_flags(p: argparse.ArgumentParser, *, progress: bool = True, as_json: bool = True) -> None:
    """--no-progress and --json, declared once for every command that has them."""
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and results stay)")
    if as_json:
        p.add_argument("--json", action="store_true", help="print the result as one JSON line (for scripts)")


def emit(result: dict, as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    """Print ``result``: as one JSON line (the last stdout line scripts read), or through ``human``."""
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(human(result) if human else json.dumps(result, indent=2, default=str))
