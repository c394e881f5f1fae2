"""Dropout draws: extra passes of a split with the backbone's dropout on, stored as splits of their own.

The paper trains LST beside a live backbone whose dropout stays on, so every epoch reads new noisy
activations; a one-pass cache holds the deterministic eval-mode ones. `lst extract --dropout-draws N`
also stores N train-mode passes of the train split as ``train.dropout1`` .. ``train.dropoutN``: the
same examples, tokens and rows in the same order, only the tap values differ. `lst train` reads one
draw per epoch in turn (``pipeline.train.reader``). This module only names them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["draw_split", "parse_draw", "draws_of"]

_DRAW = re.compile(r"^(?P<split>.+)\.dropout(?P<draw>[1-9][0-9]*)$")


def draw_split(split: str, draw: int) -> str:
    """Name of dropout draw ``draw`` (1-based) of ``split``."""
    if draw < 1:
        raise ValueError(f"dropout draws count from 1, not {draw}")
    return f"{split}.dropout{draw}"


def parse_draw(name: str) -> tuple[str, int] | None:
    """(split, draw) of a draw split's name, None for any other split."""
    m = _DRAW.match(name)
    return (m["split"], int(m["draw"])) if m else None


def draws_of(splits: Iterable[str], split: str) -> list[str]:
    """The draw splits of ``split`` among ``splits``, in draw order."""
    found = [(p[1], s) for s in splits if (p := parse_draw(s)) is not None and p[0] == split]
    return [s for _, s in sorted(found)]
