"""Per-method resume for the long benchmark harnesses (`lst bench table`, `lst bench llm`).

A table takes hours on CPU; saving each finished process's row next to the command that made it
means an interrupted run loses at most one process. The command (everything after the interpreter)
must match for a row to be reused, so a changed setting reruns; delete a ``<method>.result.json``
to rerun that method with changed code.
"""

from __future__ import annotations

import json
from pathlib import Path


def finished_row(path: Path, cmd: list[str]) -> dict | None:
    """A method's row from an earlier run, if that process ran the same command."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["row"] if saved.get("argv") == cmd[3:] else None


def save_row(path: Path, cmd: list[str], row: dict) -> None:
    path.write_text(json.dumps({"argv": cmd[3:], "row": row}, indent=2))
