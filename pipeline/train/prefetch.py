"""The next window's compressed frames, read ahead with ``O_DIRECT`` while the steps run.

Why: a cached epoch reads each frame of the cache once, so by the time a frame is read again its page
of the page cache has sat untouched for a whole epoch. On the VM this project is measured on, memory
left untouched for a second or more is several times slower to touch again (a 9.4 MB shard file read
from the page cache: 2-3 ms right after a read, 20 ms after 1 s idle, 55 ms after 5 s), and the
reader's window decodes in `lst train` took 30-50 ms against ~21 ms with nothing between them, the
extra time in the read's copy out of the page cache (session 36, ``probes_session36.json``). An
``O_DIRECT`` read is done by the device (here, the host): the thread that waits for it leaves its core
to the training step, and the frames land in a buffer that is decoded from a few hundred ms later.

Frames already in the page cache are not read ahead (``cache.page_cache``): the decode reads them from
there. On a warm page cache the ``O_DIRECT`` reads slowed the steps beside them by more than they saved
the decode (session 39, one process, the same batches, epochs alternated: 0.1-3.4% longer with them in
6 of 8 rounds), so they are kept for the frames that would otherwise come from the disk at the decode.
The buffer is mapped at the first window that has such a frame.

One buffer serves one window at a time: the consumer decodes window i from it (``listed`` hands over
the window's frames, as the read-ahead thread listed them, with their copies' addresses), then starts
window i + 1's listing and reads into it (``start``), which finish while window i's batches are
stepped. Frames past the buffer's end, and any that cannot be read this way (a file system without
``O_DIRECT``, a short read), are read by the decode as before.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Callable

from pipeline.cache import page_cache
from pipeline.cache.fastread import WindowFrames
from pipeline.train.bufpool import populated

#: ``O_DIRECT`` reads go in whole blocks of this many bytes, at offsets that are multiples of it
ALIGN = 4096
#: frames of one file closer than this are read as one range (the gap is read and skipped)
MERGE_GAP = 256 << 10


def aligned_ranges(frames: list[tuple[int, int]], room: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """The block-aligned ranges ``(start, end, frames)`` of one file that hold ``frames`` ((offset,
    bytes)), merged where they lie within ``MERGE_GAP`` of each other, taking frames in file order while
    the ranges' bytes stay within ``room`` (the rest are left to the decode). Pure, so tested alone."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    used = 0
    for off, n in sorted(frames):
        a, b = off // ALIGN * ALIGN, -(-(off + n) // ALIGN) * ALIGN
        if out and a <= out[-1][1] + MERGE_GAP:
            s, e, fs = out[-1]
            grow = max(e, b) - e
            if used + grow > room:
                break
            out[-1] = (s, max(e, b), fs + [(off, n)])
            used += grow
        else:
            if used + (b - a) > room:
                break
            out.append((a, b, [(off, n)]))
            used += b - a
    return out


class FramePrefetch:
    """A buffer of ``nbytes`` and a thread that fills it with a window's frames (see module doc)."""

    def __init__(self, nbytes: int, skip_cached: bool = True):
        self.nbytes = int(nbytes) // ALIGN * ALIGN
        self.skip_cached = skip_cached  # leave frames already in the page cache to the decode
        self._arr = None  # the buffer (``bufpool.populated``: its pages allocated at once), mapped at first use
        self._base = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lst-prefetch")
        self._pending: Future | None = None
        self._key: object = None  # the window ``_pending`` reads
        self._fds: dict[Path, int | None] = {}  # O_DIRECT descriptors; None: not readable that way

    def start(self, key: object, listing: Callable[[], WindowFrames]) -> None:
        """List a window's frames (``listing()``) and read them into the buffer, both on the read-ahead
        thread; ``key`` names the window for ``listed``. The last window's copies are gone from then on."""
        self._settle()
        if self.nbytes > 0:
            self._key, self._pending = key, self._thread.submit(self._read, listing)

    def _fd(self, f: Path) -> int | None:
        if f not in self._fds:
            direct = getattr(os, "O_DIRECT", None)  # (Linux; not macOS or Windows)
            try:
                self._fds[f] = None if direct is None else os.open(f, os.O_RDONLY | direct)
            except OSError:  # no such file (the decode fills its rows), or no O_DIRECT on its file system
                self._fds[f] = None
        return self._fds[f]

    def _read(self, listing: Callable[[], WindowFrames]) -> WindowFrames:
        window = listing()
        frames = window.frames()
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for f, off, n in frames:
            by_file.setdefault(f, []).append((off, n))
        to_read: dict[Path, tuple[int, list[tuple[int, int]]]] = {}  # file: its descriptor, frames to read
        for f, fs in by_file.items():
            fd = self._fd(f)
            if fd is None:
                continue
            cached = page_cache.resident(f, fs, fd) if self.skip_cached else [False] * len(fs)
            window.in_page_cache += sum(cached)
            if not all(cached):
                to_read[f] = (fd, [fr for fr, c in zip(fs, cached) if not c])
        located: dict[tuple[Path, int], int] = {}
        if to_read and self._arr is None:
            self._arr = populated(self.nbytes)
            self._base = self._arr.ctypes.data
        pos = 0
        view = memoryview(self._arr) if to_read else None
        for f, (fd, fs) in to_read.items():
            for a, b, inside in aligned_ranges(fs, self.nbytes - pos):
                try:
                    got = os.preadv(fd, [view[pos:pos + (b - a)]], a)
                except OSError:
                    got = 0
                for off, n in inside:
                    if off + n <= a + got:
                        located[(f, off)] = self._base + pos + (off - a)
                pos += b - a
        window.place([located.get((f, off), 0) for f, off, _ in frames])
        return window

    def listed(self, key: object) -> WindowFrames | None:
        """Window ``key``'s frames with their copies (``WindowFrames.copies``), once read; None where the
        last ``start`` was for another window (or none): the decode then lists them itself. A listing
        that failed (a shard index's checksum) raises here, in the consumer."""
        if self._pending is None or self._key is not key:
            return None
        return self._pending.result()

    def _settle(self) -> None:
        """Wait for the reads last started, and forget them (their error, if any, was the consumer's to
        see through ``listed``)."""
        if self._pending is not None:
            wait_futures([self._pending])
        self._pending = self._key = None

    def close(self) -> None:
        self._settle()
        self._thread.shutdown(wait=True)
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds = {}
        self._arr = None  # unmapped with its last reference
