"""Byte sizes on the command line (``--reader-memory 512MB``). No torch import: ``--help`` stays instant.

Units are binary, as memory is counted: ``K``/``KB``/``KiB`` = 2**10, ``M``/``MB``/``MiB`` = 2**20,
``G``/``GB``/``GiB`` = 2**30, ``T``/``TB``/``TiB`` = 2**40 (case-insensitive, optional ``B`` and
space). A plain integer is bytes. Fractions are allowed with a unit ("1.5GB"), and the result is
rounded down to whole bytes.
"""

from __future__ import annotations

import math
import re

MB = 2**20

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'512MB' / '512M' / '1.5GB' / '2G' / '128MiB' / '1048576' -> bytes."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size {text} must be positive")
        return text
    m = _RE.match(str(text))
    if not m:
        raise ValueError(
            f"{text!r} is not a size; write a number of bytes with an optional unit, "
            "e.g. 512MB, 512M, 1.5GB, 2G, 128MiB or 1048576"
        )
    number, unit, suffix = m.group(1), m.group(2).lower(), m.group(3)
    if suffix and suffix.lower() == "ib" and not unit:
        raise ValueError(f"{text!r} is not a size: 'iB' needs a unit letter, e.g. 128MiB")
    if "." in number and not unit:
        raise ValueError(f"{text!r}: a plain byte count must be a whole number")
    value = math.floor(float(number) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def format_size(n: int) -> str:
    """Bytes as a short human string in binary units (``1.5GB``, ``512MB``, ``300KB``)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return f"{n}B"
