"""Which byte ranges of a file sit in the OS page cache (``mincore`` over a read-only mapping of it).

Why: the reader reads a window's frames ahead with ``O_DIRECT`` (``train.prefetch``), which pays where
the frames are not in the page cache (a cache larger than memory, or one evicted since it was last
read), and costs the steps where they are: on a warm page cache the read-ahead thread's reads slowed
the steps beside them more than they saved the decode (session 39: in one process, epochs alternated
over the same batches, 0.1-3.4% longer with read-ahead than without it in 6 of 8 rounds). So frames
already cached are left to the decode, which reads them from the page cache, and only the rest are
read ahead.

Nothing is read: ``mincore`` reports, page by page, whether a file page is cached, and the mapping
that lets it ask is unmapped again before it returns (no page is faulted in, no mapping is kept, so a
cache of any number of files holds none of them). Where there is no ``mincore`` (not Linux or macOS,
or no ``mmap``), every range reads as not cached and the reader reads ahead as before.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


def _libc():
    if not hasattr(mmap, "MAP_SHARED") or not hasattr(mmap, "PROT_READ"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = libc.mmap, libc.munmap, libc.mincore
    except (OSError, AttributeError):
        return None
    fns[0].argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fns[0].restype = ctypes.c_void_p
    fns[1].argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fns[1].restype = ctypes.c_int
    fns[2].argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fns[2].restype = ctypes.c_int
    return fns


_FNS = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def available() -> bool:
    """Whether residency can be asked here at all (else ``resident`` says False for every range)."""
    return _FNS is not None


def resident(path: Path, ranges: list[tuple[int, int]], fd: int | None = None) -> list[bool]:
    """For each ``(offset, nbytes)`` of ``path``, whether every page it spans is in the page cache.
    False where it cannot be told (no ``mincore``, a file that cannot be opened or mapped, a range past
    its end), which leaves that range to be read ahead. ``fd``: a descriptor of ``path`` the caller
    already holds (the read-ahead's ``O_DIRECT`` one maps as well), used and left open, so asking opens
    nothing."""
    if not ranges:
        return []
    none = [False] * len(ranges)
    if _FNS is None:
        return none
    mmap_, munmap, mincore = _FNS
    own = fd is None
    if own:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return none
    try:
        size = os.fstat(fd).st_size
        lo = min(off for off, _ in ranges) // PAGE * PAGE
        hi = min(size, max(off + n for off, n in ranges))
        if size == 0 or hi <= lo:
            return none
        length = hi - lo
        addr = mmap_(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
        if addr is None or addr == _MAP_FAILED:
            return none
        try:
            pages = (ctypes.c_ubyte * (-(-length // PAGE)))()
            if mincore(addr, length, pages) != 0:
                return none
            # pages cached before each page: a range is cached where all its pages are
            before = np.concatenate([[0], np.cumsum(np.frombuffer(pages, np.uint8) & 1)])
        finally:
            munmap(addr, length)
    finally:
        if own:
            os.close(fd)
    at = np.asarray(ranges, np.int64).reshape(-1, 2)
    a = (at[:, 0] - lo) // PAGE
    b = np.minimum(-(-(at.sum(1) - lo) // PAGE), len(before) - 1)
    ok = (at[:, 1] > 0) & (at.sum(1) <= size) & (before[b] - before[a] == b - a)
    return ok.tolist()


def evict(root: Path) -> int:
    """Drop every file under ``root`` (or ``root`` itself) from the page cache, written back first
    (``fsync``, then ``POSIX_FADV_DONTNEED``), as a cache never read since boot would be: what a cold
    read is measured and tested on, without root's ``drop_caches``. Returns how many files it asked
    to drop; a file system that keeps them (tmpfs) keeps them, which ``resident`` then says."""
    root = Path(root)
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)
