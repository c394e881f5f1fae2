"""The reader's window buffers, reused from one shuffle window to the next within an epoch.

Why: each window's decoded taps (one buffer per piece and tap, ~1-3 MB each on MiniLM) were fresh
``np.empty`` arrays. Under lst's 128 KiB mmap threshold every one is mapped, zero-filled page by page
as it is decoded into, and unmapped when the window is freed: on a cached MiniLM SST-2 epoch that is
~350 k page faults for 1.4 GB of decoded taps, on the CPU the training step needs. Consecutive
windows ask for buffers of about the same sizes (pieces are cut to a common target), so a freed
buffer serves the next request it can hold that is at most ``SLACK`` smaller than itself.

Bounded: the pool never lets what it holds (buffers in use, the unused tail of reused ones, and freed
buffers kept for reuse) pass ``limit``, the reader's window share. Freed buffers are dropped, oldest
first, to make room; the tails of reused buffers (``overhead``) are counted: the reader's window
reservations include them, and a tail is taken on only while it fits beside every reservation.
Past the reader's idle cap, once a window is decoded, ``drop_tails`` hands the tails' pages back to
the OS (the count then is an upper bound) and ``clear`` drops the freed buffers that window did not
reuse (they would otherwise sit beside all its steps); the reader clears the pool when the epoch
ends too, so evaluation, which never runs beside training, finds the memory free.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from typing import Callable

import numpy as np

#: a freed buffer serves a request down to 1 / (1 + SLACK) of its size. Measured on a reader-only cached
#: MiniLM SST-2 epoch (session 22): 0.25 missed 188 of 574 takes an epoch, 1.0 missed 90, and page faults
#: went from 190 k to 140 k (~0.05 s less kernel CPU); a 7B-shaped run at 128 MB peaked the same
#: (1,137-1,138 MB against 1,138-1,139). The unused tails are counted against the window share.
SLACK = 1.0


class WindowBufferPool:
    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        """``limit``: the most bytes held at once; ``on_change(delta)``: told of every change in
        ``overhead + pooled`` (the bytes beyond the requests in use), for the reader's accounting."""
        self.limit = int(limit)
        self._on_change = on_change or (lambda d: None)
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []  # oldest first
        self._in_use: dict[int, tuple[np.ndarray, int]] = {}  # id(buffer in use) -> (it, bytes requested)
        self._tails: dict[int, int] = {}  # id(buffer in use) -> its resident tail past the request
        self.in_use = 0  # bytes requested by the buffers in use
        self.overhead = 0  # capacity of the buffers in use beyond what was requested
        self.pooled = 0  # capacity of the freed buffers kept for reuse
        self.hits = 0
        self.misses = 0

    @property
    def held(self) -> int:
        return self.in_use + self.overhead + self.pooled

    @property
    def resident_tails(self) -> int:
        """Of ``overhead``, the tails whose pages are still resident (not yet dropped)."""
        with self._lock:
            return sum(self._tails.values())

    def take(self, nbytes: int, reserved: int = 0) -> np.ndarray:
        """A flat uint8 buffer of capacity >= ``nbytes`` (use its first ``nbytes``), reused if one fits.

        ``reserved``: the bytes the caller has promised to take in all (this request included; the
        reader's window reservations). A reused buffer's unused tail is taken only while it and every
        reservation still fit the limit, so each later request can be met by dropping freed buffers."""
        n = int(nbytes)
        with self._lock:
            room = self.limit - max(int(reserved), self.in_use + n) - self.overhead
            best = -1
            for i, b in enumerate(self._free):
                if n <= b.nbytes <= min(n + n * SLACK, n + room) and (best < 0 or b.nbytes < self._free[best].nbytes):
                    best = i
            if best >= 0:
                buf = self._free.pop(best)
                self.hits += 1
                self._moved(pooled=-buf.nbytes, overhead=buf.nbytes - n)
                if buf.nbytes > n:
                    self._tails[id(buf)] = buf.nbytes - n
            else:
                self.misses += 1
                evicted = 0
                while self._free and self.in_use + self.overhead + self.pooled - evicted + n > self.limit:
                    evicted += self._free.pop(0).nbytes
                self._moved(pooled=-evicted, overhead=0)
                buf = np.empty(n, np.uint8)
            self.in_use += n
            self._in_use[id(buf)] = (buf, n)
            return buf

    def give(self, buf: np.ndarray, shared: bool = False) -> None:
        """Hand back a buffer from ``take``. ``shared``: something outside the reader still reads it (a
        batch handed out as a view of it), so it leaves the pool's count and is never reused."""
        with self._lock:
            n = self._in_use.pop(id(buf))[1]
            self._tails.pop(id(buf), None)
            self.in_use -= n
            if shared:
                self._moved(pooled=0, overhead=-(buf.nbytes - n))
                return
            self._free.append(buf)
            self._moved(pooled=buf.nbytes, overhead=-(buf.nbytes - n))

    def _in_use_buffers(self) -> list[np.ndarray]:
        """The buffers handed out and not yet given back (for tests)."""
        with self._lock:
            return [buf for buf, _ in self._in_use.values()]

    def drop_tails(self) -> int:
        """Hand the resident tails of the buffers in use back to the OS (``drop_pages``): their owners
        use only the bytes they asked for. Returns the bytes dropped. The accounting still counts the
        tails (``overhead``): a buffer's whole capacity is what a later, longer request may touch."""
        with self._lock:
            dropped = 0
            for key, tail in self._tails.items():
                buf, n = self._in_use[key]
                drop_pages(buf, n)
                dropped += tail
            self._tails.clear()
            return dropped

    def clear(self) -> None:
        """Drop every freed buffer (buffers still in use stay theirs)."""
        with self._lock:
            self._moved(pooled=-self.pooled, overhead=0)
            self._free.clear()

    def _moved(self, *, pooled: int, overhead: int) -> None:
        self.pooled += pooled
        self.overhead += overhead
        if pooled + overhead:
            self._on_change(pooled + overhead)


def drop_pages(buf: np.ndarray, start: int) -> None:
    """Hand the whole pages of ``buf`` past byte ``start`` back to the OS (``MADV_DONTNEED``: they read
    as zeros when next touched). Only pages wholly inside the buffer are dropped, so a heap neighbour
    is never touched; a no-op where there is no ``madvise``."""
    page = mmap.PAGESIZE
    addr = buf.ctypes.data
    lo = -(-(addr + int(start)) // page) * page
    hi = (addr + buf.nbytes) // page * page
    if hi > lo and _madvise is not None:
        _madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def _libc_madvise():
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


class GatherBuffers:
    """One reused buffer per tap for the packed batches a reader gathers, taken only while nothing uses it.

    Why: a fresh ``torch.empty`` per batch and tap (1.44 GB of bf16 rows an epoch on cached MiniLM SST-2)
    is, under lst's 128 KiB mmap threshold, mapped, zero-filled page by page and unmapped again: ~350 k
    page faults an epoch on the CPU the training step needs. A batch's taps are read by its step and
    dropped before the next batch is asked for, so one buffer per tap serves every batch.

    Each buffer is its own anonymous mapping, as long as the longest batch so far (a longer one replaces
    it, about ln(batches) times an epoch in random order). A shorter batch hands the pages past its end
    back to the OS (``MADV_DONTNEED``), so what is resident is the current batch, as with fresh buffers:
    keeping the longest batch's pages made a 7B-shaped run peak 7 MB higher.

    Never wrong, only slower: a buffer is reused only when no tensor made from it is alive
    (``torch.from_numpy``'s storage holds the array, so its reference count says so). When one is
    still in use (a consumer that keeps batches), it is left to that consumer and a fresh one kept
    instead. ``on_change(delta)`` is told of every change in the bytes in use (the current batch's).
    """

    def __init__(self, on_change: Callable[[int], None] | None = None):
        self._on_change = on_change or (lambda d: None)
        self._bufs: dict[int, _Mapped] = {}
        self.held = 0  # bytes of the current batch in the kept buffers
        self.hits = 0
        self.misses = 0

    def take(self, key: int, nbytes: int) -> np.ndarray:
        """The flat uint8 buffer kept for ``key``, at least ``nbytes`` long (a new one if it is in use or short)."""
        nbytes = int(nbytes)
        kept = self._bufs.get(key)
        if kept is not None and sys.getrefcount(kept.array) <= _FREE_REFS and kept.array.nbytes >= nbytes:
            self.hits += 1
        else:
            self.misses += 1
            self._drop(key)
            kept = self._bufs[key] = _Mapped(nbytes)
        self._moved(kept.use(nbytes))
        return kept.array

    def clear(self) -> None:
        for key in list(self._bufs):
            self._drop(key)

    def idle(self) -> None:
        """Hand every kept buffer's pages back to the OS, keeping the mappings (a batch that needs no
        gathering is out: the last gathered batch's pages would otherwise sit beside its step). A
        buffer a consumer still uses is left to it."""
        for kept in self._bufs.values():
            if sys.getrefcount(kept.array) <= _FREE_REFS:
                self._moved(kept.use(0))

    def _drop(self, key: int) -> None:
        kept = self._bufs.pop(key, None)
        if kept is not None:
            self._moved(-kept.used)

    def _moved(self, delta: int) -> None:
        self.held += delta
        if delta:
            self._on_change(delta)


class _Mapped:
    """A flat uint8 array in its own private anonymous mapping, and how much of it the current batch uses.

    Private, not Python's default shared mapping: ``MADV_DONTNEED`` frees a private mapping's pages,
    whereas a shared anonymous mapping is shmem, whose pages only leave the process's RSS and stay
    allocated (system ``Shmem``) until the mapping closes. Measured: 200 MB touched then handed back
    left 200 MB of ``Shmem`` shared, none private. Until session 22 the buffers were shared, so RSS
    saw the current batch while the longest one stayed allocated."""

    def __init__(self, nbytes: int):
        private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # (not on Windows)
        self._map = mmap.mmap(-1, max(1, nbytes), **private)
        self.array = np.frombuffer(self._map, np.uint8, count=nbytes)
        self.used = 0

    def use(self, nbytes: int) -> int:
        """Make ``nbytes`` the bytes in use; pages past them that the last use touched go back to the OS.
        Returns the change in bytes in use."""
        cut = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        if cut < self.used and hasattr(self._map, "madvise"):  # (not on Windows)
            self._map.madvise(mmap.MADV_DONTNEED, cut, self.used - cut)
        delta, self.used = nbytes - self.used, nbytes
        return delta


#: references to a kept array nothing else uses: ``_Mapped.array`` and getrefcount's argument
_FREE_REFS = 2
