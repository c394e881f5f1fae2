"""Row numbers in error messages: every data error names the rows to fix, formatted the same way."""

from __future__ import annotations

import numpy as np

__all__ = ["ROWS_MEANING", "rows_text"]

# How many row numbers an error message shows before saying "...": enough to find the pattern, short enough to read.
_MAX_ROWS_IN_MESSAGE = 10

ROWS_MEANING = "rows are 0-based data rows of the file, header excluded"


def rows_text(rows: np.ndarray | list[int]) -> str:
    """Format row numbers for an error message: the first few, and how many more."""
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    more = len(rows) - _MAX_ROWS_IN_MESSAGE
    return f"[{shown}{', ...' if more > 0 else ''}]" + (f" ({more} more)" if more > 0 else "")
