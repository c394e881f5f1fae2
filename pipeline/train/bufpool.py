"""The reader's window buffers, reused from one shuffle window to the next within an epoch.

Why: each window's decoded taps (one buffer per piece and tap, ~1-3 MB each on MiniLM) were fresh
``np.empty`` arrays. Under lst's 128 KiB mmap threshold every one is mapped, zero-filled page by page
as it is decoded into, and unmapped when the window is freed: on a cached MiniLM SST-2 epoch that is
~350 k page faults for 1.4 GB of decoded taps, on the CPU the training step needs.

Every buffer maps ``capacity`` bytes (the reader passes the largest request of the epoch's plan), so
any freed buffer can serve any later request; what it holds is what is resident, its last request.
A window asks for all its buffers at once (``take_all``), largest request first: each takes the freed
buffer whose resident bytes are the smallest that cover it, handing the pages past the request back
to the OS at once (``drop_pages``), or else the one with the most resident bytes, whose missing pages
the decode then faults in. The freed buffers no request took are dropped, and only then are new
buffers mapped, the pages of their request allocated up front (``populated``). So between decodes the
pool holds the buffers of the windows in use, each resident up to its request, and nothing else.

Until session 28 a freed buffer served only requests it could hold within a slack, and new buffers
were mapped at their request: consecutive windows of 3 or 4 pieces whose buffers differ by a few
rows missed 105 of 574 takes an epoch (cached MiniLM SST-2), each a fresh mapping to zero-fill
(~290 MB an epoch, ~0.1 s serial on the decode loop's thread before the window's reads start).

Bounded: what the pool holds (the requests in use, and the resident bytes of freed buffers kept for
reuse) never passes ``limit``, the reader's window share: freed buffers are dropped before a new one
is mapped, and a reused buffer is resident up to its request only. Mapped but unused capacity is
address space, not memory, and is not counted. The reader clears the pool when the epoch ends, so
evaluation, which never runs beside training, finds the memory free.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from typing import Callable

import numpy as np


class WindowBufferPool:
    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None, capacity: int = 0):
        """``limit``: the most bytes held at once; ``on_change(delta)``: told of every change in
        ``pooled`` (the resident bytes of freed buffers), for the reader's accounting; ``capacity``:
        the bytes a new buffer maps (at least its request)."""
        self.limit = int(limit)
        self.capacity = int(capacity)
        self._on_change = on_change or (lambda d: None)
        self._lock = threading.Lock()
        self._free: list[tuple[np.ndarray, int]] = []  # given back, not yet taken again: (it, resident bytes)
        self._in_use: dict[int, tuple[np.ndarray, int]] = {}  # id(buffer in use) -> (it, bytes requested)
        self.in_use = 0  # bytes requested by the buffers in use
        self.pooled = 0  # resident bytes of the freed buffers kept for reuse
        self.hits = 0
        self.misses = 0
        self.faulted = 0  # bytes reused buffers had to fault in past what they held (a longer request)

    @property
    def held(self) -> int:
        return self.in_use + self.pooled

    def take(self, nbytes: int) -> np.ndarray:
        """One buffer: ``take_all([nbytes])``."""
        return self.take_all([nbytes])[0]

    def take_all(self, sizes: list[int]) -> list[np.ndarray]:
        """Flat uint8 buffers of capacity >= each of ``sizes`` (use the first ``size`` of each): one
        window's requests, all at once. Freed buffers are reused where one is long enough (largest
        requests first; the smallest resident that covers the request, else the largest resident), their
        pages past the request handed back (``drop_pages``); the freed buffers left over are dropped
        before any new buffer is mapped (``populated``), so the pool holds the window's own buffers and
        nothing that waits for a later one. Reuse never holds more than the requests, so the caller's
        reservations (within ``limit``) bound what the pool holds."""
        ns = [int(n) for n in sizes]
        out: list[np.ndarray | None] = [None] * len(ns)
        with self._lock:
            order = sorted(range(len(ns)), key=lambda i: -ns[i])
            for i in order:
                n = ns[i]
                fits = [k for k, (b, _) in enumerate(self._free) if b.nbytes >= n]
                if not fits:
                    continue
                cover = [k for k in fits if self._free[k][1] >= n]
                best = min(cover, key=lambda k: self._free[k][1]) if cover else \
                    max(fits, key=lambda k: self._free[k][1])
                buf, resident = self._free.pop(best)
                out[i] = buf
                self.hits += 1
                self.faulted += max(0, n - resident)
                self._moved(-resident)
                if resident > n:
                    drop_pages(buf, n)
                self._hand_out(buf, n)
            self._drop_free()
        # mapped and populated outside the lock: a consumer giving back its window's buffers meanwhile
        # (decoding ahead) does not wait for the kernel to allocate pages
        new = {i: populated(ns[i], self.capacity) for i in order if out[i] is None}
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
                return
            self._free.append((buf, n))
            self._moved(n)

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
        self._moved(-self.pooled)
        self._free.clear()

    def _moved(self, pooled: int) -> None:
        self.pooled += pooled
        if pooled:
            self._on_change(pooled)


#: Linux's ``MADV_POPULATE_WRITE`` (5.14+): allocate a range's pages now, as writing them would
MADV_POPULATE_WRITE = 23


def populated(nbytes: int, capacity: int = 0) -> np.ndarray:
    """A flat uint8 array of ``max(nbytes, capacity)`` bytes in a private anonymous mapping whose first
    ``nbytes`` the kernel allocates at once (``MAP_POPULATE`` where that is the whole array, else
    ``MADV_POPULATE_WRITE`` on Linux 5.14+), where that exists; ``np.empty`` elsewhere.

    Why: a new window buffer is written right away by the decode threads, which otherwise fault its
    pages in one at a time. Measured on cached MiniLM SST-2 epochs (session 27): the decode threads'
    faults fell from 69 k to 2 k an epoch, for ~0.1 s of populating on the decode loop's thread before
    the jobs start; the decode's wall time stayed within the noise (0.69-0.71 s an epoch, against
    0.66-0.75 s faulting in the jobs)."""
    size = max(int(nbytes), int(capacity), 1)
    if not hasattr(mmap, "MAP_PRIVATE"):
        return np.empty(size, np.uint8)
    whole = size == nbytes and hasattr(mmap, "MAP_POPULATE")
    flags = mmap.MAP_PRIVATE | (mmap.MAP_POPULATE if whole else 0)
    arr = np.frombuffer(mmap.mmap(-1, size, flags=flags), np.uint8, count=size)
    if not whole and nbytes > 0 and _madvise is not None and sys.platform == "linux":
        _madvise(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(int(nbytes)), MADV_POPULATE_WRITE)
    return arr


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
