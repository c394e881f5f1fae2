"""How every command prints its result: one JSON object with --json, readable text otherwise."""

from __future__ import annotations

import json
from typing import Callable


def emit(result: dict, as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    """Print ``result``: as one JSON line (the last stdout line scripts read), or through ``human``."""
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(human(result) if human else json.dumps(result, indent=2, default=str))
