"""Split names: the canonical three, the aliases users type, their order, and ``train=a.csv,...`` split specs.

Everything maps onto 'train' / 'validation' / 'test' so that downstream code (cache layout, training loop) only ever
sees those names.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DatasetError

__all__ = ["SPLIT_NAMES", "canonical_split", "parse_split_spec", "split_order"]

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")

# Split-name aliases accepted in split specs, the ``splits`` argument and HF dataset dicts.
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validation": "validation",
    "dev": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}


def canonical_split(name: str) -> str:
    """'dev' / 'valid' / 'val' -> 'validation' (case-insensitive); names that are no alias are returned as given."""
    return _SPLIT_ALIASES.get(name.lower(), name)


def split_order(s: str) -> tuple[int, str]:
    """train, validation, test first, then any other split names alphabetically."""
    return (SPLIT_NAMES.index(s) if s in SPLIT_NAMES else len(SPLIT_NAMES), s)


def parse_split_spec(spec: str) -> dict[str, Path] | None:
    """Parse ``train=a.csv,validation=b.csv``; None if ``spec`` is not of that form."""
    if "=" not in spec:
        return None
    first_key = spec.split("=", 1)[0].strip().lower()
    if first_key not in _SPLIT_ALIASES:
        return None
    out: dict[str, Path] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise DatasetError(f"bad split spec part {part!r}: expected split=path, e.g. 'train=a.csv,validation=b.csv'")
        if key not in _SPLIT_ALIASES:
            raise DatasetError(
                f"unknown split {key!r} in {spec!r}; use train, validation (alias dev) or test, e.g. 'train=a.csv,validation=b.csv'"
            )
        canon = _SPLIT_ALIASES[key]
        if canon in out:
            raise DatasetError(f"split {canon!r} is given twice in {spec!r}")
        out[canon] = Path(value.strip()).expanduser().resolve()
    return out
