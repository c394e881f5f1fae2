"""The reader's window buffers, reused from one shuffle window to the next within an epoch.

Why: each window's decoded taps (one buffer per piece and tap, ~1-3 MB each on MiniLM) were fresh
``np.empty`` arrays. Under lst's 128 KiB mmap threshold every one is mapped, zero-filled page by page
as it is decoded into, and unmapped when the window is freed: on a cached MiniLM SST-2 epoch that is
~350 k page faults for 1.4 GB of decoded taps, on the CPU the training step needs. Consecutive
windows ask for buffers of about the same sizes (pieces are cut to a common target), so a freed
buffer serves the next request it can hold that is at most ``SLACK`` smaller than itself.

A window asks for all its buffers at once (``take_all``): reused buffers hand the pages past their
request back to the OS right away, freed buffers none of its requests fits are dropped, and only
then are new buffers mapped, with their pages allocated up front (``populated``). So between decodes
the pool holds the buffers of the windows in use, each resident up to its request, and nothing else.
Measured on cached MiniLM SST-2 epochs (session 27): the resident tails of reused buffers had been
10.8 MB at the process's peak, on which the page faults their reuse now takes (~12 k an epoch, on the
decode threads) are a fair price.

Bounded: the pool never lets what it holds (buffers in use, the unused capacity of reused ones, and
freed buffers kept for reuse) pass ``limit``, the reader's window share. Freed buffers are dropped
before a new one is mapped; the capacity of reused buffers past their request (``overhead``) is
counted: the reader's window reservations include it, as a later, longer request may use it. The
reader clears the pool when the epoch ends, so evaluation, which never runs beside training, finds
the memory free.
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
        self._free: list[np.ndarray] = []  # given back, not yet taken again
        self._in_use: dict[int, tuple[np.ndarray, int]] = {}  # id(buffer in use) -> (it, bytes requested)
        self.in_use = 0  # bytes requested by the buffers in use
        self.overhead = 0  # capacity of the buffers in use beyond what was requested
        self.pooled = 0  # capacity of the freed buffers kept for reuse
        self.hits = 0
        self.misses = 0

    @property
    def held(self) -> int:
        return self.in_use + self.overhead + self.pooled

    def take(self, nbytes: int, reserved: int = 0) -> np.ndarray:
        """One buffer: ``take_all([nbytes], reserved)``."""
        return self.take_all([nbytes], reserved)[0]

    def take_all(self, sizes: list[int], reserved: int = 0) -> list[np.ndarray]:
        """Flat uint8 buffers of capacity >= each of ``sizes`` (use the first ``size`` of each): one
        window's requests, all at once. Freed buffers are reused where one fits (largest requests
        first, each the smallest free buffer within ``SLACK``), their pages past the request handed
        back (``drop_pages``); the freed buffers none of the requests can use are dropped before any
        new buffer is mapped (``populated``), so the pool holds the window's own buffers and nothing
        that waits for a later one.

        ``reserved``: the bytes the caller has promised to take in all (these requests included; the
        reader's window reservations). A reused buffer's unused tail is taken only while it and every
        reservation still fit the limit, so each later request can be met by dropping freed buffers."""
        ns = [int(n) for n in sizes]
        out: list[np.ndarray | None] = [None] * len(ns)
        with self._lock:
            order = sorted(range(len(ns)), key=lambda i: -ns[i])
            for i in order:
                n = ns[i]
                room = self.limit - max(int(reserved), self.in_use + n) - self.overhead
                best = -1
                for k, b in enumerate(self._free):
                    if n <= b.nbytes <= min(n + n * SLACK, n + room) and (best < 0 or b.nbytes < self._free[best].nbytes):
                        best = k
                if best >= 0:
                    buf = out[i] = self._free.pop(best)
                    self.hits += 1
                    self._moved(pooled=-buf.nbytes, overhead=buf.nbytes - n)
                    drop_pages(buf, n)
                    self._hand_out(buf, n)
            self._drop_free()
        # mapped and populated outside the lock: a consumer giving back its window's buffers meanwhile
        # (decoding ahead) does not wait for the kernel to allocate pages
        new = {i: populated(ns[i]) for i in order if out[i] is None}
        with self._lock:
            for i, buf in new.items():
                self.misses += 1
                out[i] = buf
                self._hand_out(buf, ns[i])
        return out  # type: ignore[return-value]

    def _hand_out(self, buf: np.ndarray, n: int) -> None:
        self.in_use += n
        self._in_use[id(buf)] = (buf, n)

    def give(self, buf: np.ndarray, shared: bool = False) -> None:
        """Hand back a buffer from ``take``. ``shared``: something outside the reader still reads it (a
        batch handed out as a view of it), so it leaves the pool's count and is never reused."""
        with self._lock:
            n = self._in_use.pop(id(buf))[1]
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

    def clear(self) -> None:
        """Drop every freed buffer (buffers still in use stay theirs)."""
        with self._lock:
            self._drop_free()

    def _drop_free(self) -> None:
        """Drop every freed buffer (the lock held)."""
        self._moved(pooled=-self.pooled, overhead=0)
        self._free.clear()

    def _moved(self, *, pooled: int, overhead: int) -> None:
        self.pooled += pooled
        self.overhead += overhead
        if pooled + overhead:
            self._on_change(pooled + overhead)


def populated(nbytes: int) -> np.ndarray:
    """A flat uint8 array of ``nbytes`` in a private anonymous mapping whose pages the kernel allocates
    at once (``MAP_POPULATE``), where that exists; ``np.empty`` elsewhere.

    Why: a new window buffer is written right away by the decode threads, which otherwise fault its
    pages in one at a time. Measured on cached MiniLM SST-2 epochs (session 27): the decode threads'
    faults fell from 69 k to 2 k an epoch, for ~0.1 s of populating on the decode loop's thread before
    the jobs start; the decode's wall time stayed within the noise (0.69-0.71 s an epoch, against
    0.66-0.75 s faulting in the jobs)."""
    if not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(nbytes, np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_POPULATE
    return np.frombuffer(mmap.mmap(-1, max(1, int(nbytes)), flags=flags), np.uint8, count=int(nbytes))


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

    Each buffer is its own anonymous mapping, ``capacity`` bytes long (the reader passes the epoch's
    longest batch, from its plan) or as long as the longest batch so far; a longer one replaces it.
    Pages a batch touched stay resident for the next batches: what is held is the longest batch so far,
    which the step on that batch held anyway. Until session 27 a shorter batch handed the pages past its
    end back to the OS, and the next longer one faulted them in again: on a cached MiniLM SST-2 epoch
    (by-length batches in random order) 37 k faults an epoch, 0.13-0.2 s of the gather's 0.32-0.46 s on
    the training thread. ``idle`` (a batch that needs no gathering is out) and ``clear`` hand the pages back.

    Never wrong, only slower: a buffer is reused only when no tensor made from it is alive
    (``torch.from_numpy``'s storage holds the array, so its reference count says so). When one is
    still in use (a consumer that keeps batches), it is left to that consumer and a fresh one kept
    instead. ``on_change(delta)`` is told of every change in the bytes held (resident).
    """

    def __init__(self, on_change: Callable[[int], None] | None = None, capacity: int = 0):
        self._on_change = on_change or (lambda d: None)
        self.capacity = int(capacity)  # bytes a new buffer maps (at least the request)
        self._bufs: dict[int, _Mapped] = {}
        self.held = 0  # bytes the kept buffers hold resident (each: the longest batch since it was last idle)
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
            kept = self._bufs[key] = _Mapped(max(nbytes, self.capacity))
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
    """A flat uint8 array in its own private anonymous mapping, and how much of it is resident: the
    most any use touched since the last ``use(0)``.

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
        """A use of the first ``nbytes``: they join what is resident. ``use(0)`` hands every touched
        page back to the OS instead. Returns the change in resident bytes."""
        if nbytes == 0:
            if self.used and hasattr(self._map, "madvise"):  # (not on Windows)
                self._map.madvise(mmap.MADV_DONTNEED, 0, -(-self.used // mmap.PAGESIZE) * mmap.PAGESIZE)
            delta, self.used = -self.used, 0
            return delta
        delta = max(0, nbytes - self.used)
        self.used += delta
        return delta


#: references to a kept array nothing else uses: ``_Mapped.array`` and getrefcount's argument
_FREE_REFS = 2
