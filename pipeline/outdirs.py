"""Output directories lst may write into, and which of them it may clear.

Why: ``--overwrite`` clears ``--out`` before a run or an extraction starts. Until session 41 it cleared
whatever directory it was given: ``lst train --out . --overwrite`` emptied the current directory, and
``--out mydir --overwrite`` deleted files lst had never written. lst now clears only what it wrote
itself (an lst cache, or a run directory that holds the files its runs own) and never the current
directory, one of its parents, the home directory or a filesystem root, and it refuses to mix its
files into a directory that holds someone else's.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError


def is_local(url: str) -> bool:
    """A path on this machine (no ``scheme://``), where these checks apply; remote stores have none."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def _what_it_is(path: Path) -> str | None:
    """Why ``path`` may never be an output directory (None: it may)."""
    p = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if p == cwd:
        return "the current directory"
    if p in cwd.parents:
        return "a parent of the current directory"
    if p == Path.home().resolve():
        return "the home directory"
    if p == Path(p.anchor):
        return "a filesystem root"
    return None


def check_out_dir(path: str | Path, flag: str = "--out", example: str = "runs/NAME") -> None:
    """Refuse an output path lst must not write into: an existing file, the current directory, one of
    its parents, the home directory or a filesystem root."""
    p = Path(path)
    what = _what_it_is(p)
    if what is not None:
        raise UserError(f"{flag} {path}: that is {what}; lst writes its own files there (and --overwrite "
                        f"clears it), so give a new directory, e.g. {flag} {example}")
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; give a new directory, e.g. {flag} {example}")


def foreign_files(path: Path, owned: frozenset[str]) -> list[str]:
    """The names in ``path`` that are not among ``owned`` (lst's own files there), sorted; [] when it
    is absent or empty."""
    if not path.is_dir():
        return []
    return sorted(n for n in os.listdir(path) if n not in owned)
