"""Numeric options checked against their allowed ranges, with one line naming the option and the fix.

Why here: stage one's and stage two's configs both come from flags and from YAML (which argparse
never type-checks), and a value out of range failed far from its cause: ``lst extract --shard-tokens 0``
divided by zero, ``--max-length -1`` overflowed in the tokenizer, ``--workers -1`` started a Dask
cluster of no workers and waited for ever (session 41's audit).
"""

from __future__ import annotations

from typing import Any

#: (option, kind, lowest allowed or None, whether the lowest itself is allowed)
Range = tuple[str, type, "float | int | None", bool]


def check_ranges(cfg: Any, ranges: tuple[Range, ...], error: type[Exception], what: str) -> None:
    """Raise ``error`` for the first option of ``cfg`` (None: unset, skipped) that is not a number of its
    kind or lies below its range; ``what`` names the options in the message ("training option")."""
    for name, kind, low, inclusive in ranges:
        v = getattr(cfg, name, None)
        if v is None:
            continue
        if kind is float and isinstance(v, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                v = float(v)
                setattr(cfg, name, v)
            except ValueError:
                pass
        ok_type = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if not ok_type:
            raise error(f"{what} {name}={v!r}: expected {'an integer' if kind is int else 'a number'}")
        if low is not None and (v < low or (v == low and not inclusive)):
            raise error(f"{what} {name}={v!r}: must be {'>=' if inclusive else '>'} {low}")
