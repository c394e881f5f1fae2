"""Blosc frames decoded through a shared context, whose block temporaries outlive a call.

Why: off the main thread numcodecs decodes with ``blosc_decompress_ctx`` (zarr also sets
``numcodecs.blosc.use_threads = False`` at import), which builds a context and allocates
``2 x blocksize`` of temporaries (~516 KB at the 256 KB blocks of our 768 KB tap chunks) on every
call. Above lst's 128 KiB mmap threshold each is mapped, zero-filled and unmapped again: 129 page
faults per frame, 372 k of the stage-two reader's ~745 k faults on a cached MiniLM SST-2 epoch.

Two shared contexts avoid that, tried in this order:

- c-blosc2's global ``blosc2_decompress`` (``libblosc2`` from the ``blosc2`` wheel, which reads the
  Blosc1 frames the store writes), single-threaded: its serial temporaries are kept between calls,
  the caller's own thread does the work (no hand-off to a pool), and its bitshuffle has AVX2/AVX-512
  kernels where numcodecs' c-blosc has SSE2 ones. Callers take turns on its mutex.
- c-blosc's global ``blosc_decompress`` (the library numcodecs ships and exports), which decodes on
  its own thread pool, whose temporaries are allocated once: measured on a 768 KB bf16 tap chunk from
  a worker thread, 0.22 ms of CPU per frame and no faults, against 0.38 ms and 129.

Where neither entry point is there, in a process forked after this module was imported (a pool's
threads and a held mutex do not survive a fork), or for a non-contiguous destination, numcodecs
decodes as before.

The stage-two reader's decode threads use neither shared context where they can: each keeps a
``ThreadDecoder``, a c-blosc2 context of its own, so the threads decode at once instead of in turn on
the global context's mutex, and a chunk cut at a piece edge decodes only the blocks it needs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
from numcodecs import blosc

HEADER_BYTES = 16


def _blosc2_library() -> ctypes.CDLL | None:
    """The installed ``blosc2`` wheel's ``libblosc2``, initialised, its global context set to one
    thread; None where there is none. The Python package itself is not imported (its import pulls in
    far more than a decoder)."""
    try:
        spec = importlib.util.find_spec("blosc2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    for lib in sorted((Path(spec.origin).parent / "lib").glob("libblosc2.*")):
        if lib.suffix == ".a":
            continue
        try:
            so = ctypes.CDLL(str(lib))
            so.blosc2_init()
            so.blosc2_set_nthreads.argtypes = [ctypes.c_int16]
            so.blosc2_set_nthreads(1)
            so.blosc2_decompress  # noqa: B018 - present, or this is no c-blosc2
        except (OSError, AttributeError):
            continue
        return so
    return None


_LIB = _blosc2_library()


def _blosc2_decompress() -> Callable[[int, int, int, int], int] | None:
    """``blosc2_decompress(src, srcsize, dest, destsize)``: c-blosc2's global context (one thread)."""
    if _LIB is None:
        return None
    fn = _LIB.blosc2_decompress
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    fn.restype = ctypes.c_int
    return fn


def _blosc1_decompress() -> Callable[[int, int, int, int], int] | None:
    """c-blosc's global ``blosc_decompress`` from numcodecs' extension, in ``_blosc2_decompress``'s
    signature; None where it is not exported."""
    try:
        fn = ctypes.CDLL(blosc.__file__).blosc_decompress
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda src, srcsize, dest, destsize: fn(src, dest, destsize)


def _shared() -> tuple[str, Callable[[int, int, int, int], int]] | None:
    for name, find in (("blosc2", _blosc2_decompress), ("blosc1", _blosc1_decompress)):
        fn = find()
        if fn is not None:
            return name, fn
    return None


_SHARED = _shared()
_IMPORT_PID = os.getpid()


def shared_decoder() -> str:
    """Which decodes ``decompress_into``'s frames in this process: "blosc2", "blosc1" or "numcodecs"."""
    return "numcodecs" if _SHARED is None or os.getpid() != _IMPORT_PID else _SHARED[0]


def header_block_nbytes(head) -> int:
    """Decoded bytes of one Blosc block, from a frame's header (its first ``HEADER_BYTES``)."""
    return int.from_bytes(bytes(head[8:12]), "little")


def _header(frame) -> tuple[np.ndarray, int, int]:
    """The frame as uint8 and its (decoded, compressed) byte counts, the latter checked against it."""
    src = np.frombuffer(frame, np.uint8)
    if src.nbytes < HEADER_BYTES:
        raise RuntimeError(f"error during blosc decompression: a {src.nbytes}-byte frame has no header")
    nbytes = int.from_bytes(src[4:8].tobytes(), "little")
    cbytes = int.from_bytes(src[12:16].tobytes(), "little")
    if cbytes > src.nbytes:
        raise RuntimeError(f"error during blosc decompression: the frame says {cbytes} bytes, {src.nbytes} given")
    return src, nbytes, cbytes


def _whole(frame, out: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``_header``, and the whole decoded frame checked to fit ``out``."""
    src, nbytes, cbytes = _header(frame)
    if nbytes > out.nbytes:
        raise ValueError(f"destination buffer too small; expected at least {nbytes}, got {out.nbytes}")
    return src, nbytes, cbytes


def decompress_into(frame, out: np.ndarray) -> None:
    """Decode one Blosc ``frame`` (bytes-like) into ``out``, which must hold exactly its bytes."""
    if _SHARED is None or os.getpid() != _IMPORT_PID or not out.flags.c_contiguous:
        blosc.decompress(frame, out)
        return
    src, nbytes, cbytes = _whole(frame, out)
    got = _SHARED[1](src.ctypes.data, cbytes, out.ctypes.data, out.nbytes)
    if got != nbytes:
        raise RuntimeError(f"error during blosc decompression: {got}")


class _DParams(ctypes.Structure):
    """c-blosc2's ``blosc2_dparams`` as its 3.x header declares it (2.x has the first four fields),
    then reserved zeros. It is passed by value, and a struct this size goes on the stack (x86-64) or
    by a pointer to a copy (arm64), so a callee reads only the fields its own version declares and
    the trailing zeros stay unread."""

    _fields_ = [("nthreads", ctypes.c_int16), ("schunk", ctypes.c_void_p), ("postfilter", ctypes.c_void_p),
                ("postparams", ctypes.c_void_p), ("typesize", ctypes.c_int32), ("_reserved", ctypes.c_uint8 * 64)]


def _context_api(so: ctypes.CDLL | None):
    """(create, decompress, getitem, free) of c-blosc2's context API where the library is a 2.x or
    3.x whose ``blosc2_dparams`` starts as ``_DParams`` does; None otherwise."""
    if so is None:
        return None
    try:
        so.blosc2_get_version_string.restype = ctypes.c_char_p
        major = int(so.blosc2_get_version_string().decode().split(".")[0])
        create, dec, get, free = (so.blosc2_create_dctx, so.blosc2_decompress_ctx, so.blosc2_getitem_ctx,
                                  so.blosc2_free_ctx)
    except (AttributeError, ValueError, UnicodeDecodeError):
        return None
    if major not in (2, 3):
        return None
    create.argtypes, create.restype = [_DParams], ctypes.c_void_p
    dec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    dec.restype = ctypes.c_int
    get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_int32]
    get.restype = ctypes.c_int
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return create, dec, get, free


_CTX_API = _context_api(_LIB)


def context_functions() -> tuple[int, int] | None:
    """Addresses of c-blosc2's ``blosc2_decompress_ctx`` and ``blosc2_getitem_ctx`` (for native code that
    decodes through ``ThreadDecoder`` contexts), or None where ``contexts_available()`` is False."""
    if _CTX_API is None:
        return None
    return tuple(ctypes.cast(fn, ctypes.c_void_p).value for fn in _CTX_API[1:3])


def contexts_available() -> bool:
    """Whether ``ThreadDecoder`` works here (c-blosc2's context API, of a known version)."""
    return _CTX_API is not None


def context_nbytes(block_nbytes: int) -> int:
    """What one ``ThreadDecoder``'s context holds once used on frames of ``block_nbytes`` blocks:
    c-blosc2's serial temporaries (four blocks, each with a header of four bytes per item of the
    typesize, which is at most 16 for the store's dtypes) and, rounded up, the context structs."""
    return 4 * (block_nbytes + 4 * 16) + 4096


class ThreadDecoder:
    """One thread's own c-blosc2 decompression context (``blosc2_create_dctx``, one thread).

    Why: the shared context (``decompress_into``) serialises every decode thread on one mutex, so the
    reader's window decodes ran about 1.3-way parallel on two cores while the step waited; a whole
    MiniLM SST-2 epoch's 1,834 tap frames took 0.34 s from two threads through it against 0.15 s with
    a context each (0.25 s from one). A context also decodes part of a frame (``blosc2_getitem_ctx``):
    only the blocks that hold the rows asked for, straight into the destination, where a chunk cut at a
    piece edge was decoded whole into scratch and copied. Its temporaries are kept between calls
    (``context_nbytes``) and freed by ``close``. Where c-blosc2's context API is missing (or of an
    unknown version) ``contexts_available()`` is False and callers decode as before.
    """

    def __init__(self) -> None:
        self._ctx: int | None = None

    def _context(self) -> int:
        if self._ctx is None:
            ctx = _CTX_API[0](_DParams(nthreads=1, typesize=8))
            if not ctx:
                raise MemoryError("c-blosc2 could not create a decompression context")
            self._ctx = ctx
        return self._ctx

    def address(self) -> int:
        """The context's address (created on first use), for native code that decodes through it."""
        return self._context()

    def decompress_into(self, frame, out: np.ndarray) -> None:
        """As the module's ``decompress_into``, through this thread's context."""
        if not out.flags.c_contiguous:
            raise ValueError("ThreadDecoder decodes into contiguous buffers only")
        src, nbytes, cbytes = _whole(frame, out)
        got = _CTX_API[1](self._context(), src.ctypes.data, cbytes, out.ctypes.data, out.nbytes)
        if got != nbytes:
            raise RuntimeError(f"error during blosc decompression: {got}")

    def decompress_part(self, frame, offset: int, out: np.ndarray) -> None:
        """Decoded bytes [offset, offset + out.nbytes) of ``frame`` into ``out`` (contiguous), decoding
        only the blocks they lie in. ``offset`` and ``out.nbytes`` must be whole items of the frame's
        typesize."""
        if not out.flags.c_contiguous:
            raise ValueError("ThreadDecoder decodes into contiguous buffers only")
        src, nbytes, cbytes = _header(frame)
        typesize = int(src[3])
        if offset < 0 or offset + out.nbytes > nbytes or offset % typesize or out.nbytes % typesize:
            raise ValueError(f"bytes {offset}:{offset + out.nbytes} are not whole {typesize}-byte items "
                             f"of a {nbytes}-byte frame")
        n = out.nbytes // typesize
        got = _CTX_API[2](self._context(), src.ctypes.data, cbytes, offset // typesize, n,
                          out.ctypes.data, out.nbytes)
        if got != out.nbytes:
            raise RuntimeError(f"error during blosc decompression: {got}")

    def close(self) -> None:
        if self._ctx is not None:
            _CTX_API[3](self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
