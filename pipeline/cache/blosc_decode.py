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
  kernels where numcodecs' c-blosc has SSE2 ones. The reader's decode threads take turns on its
  mutex; the training step, not decoding, is what the second core is for.
- c-blosc's global ``blosc_decompress`` (the library numcodecs ships and exports), which decodes on
  its own thread pool, whose temporaries are allocated once: measured on a 768 KB bf16 tap chunk from
  a worker thread, 0.22 ms of CPU per frame and no faults, against 0.38 ms and 129.

Where neither entry point is there, in a process forked after this module was imported (a pool's
threads and a held mutex do not survive a fork), or for a non-contiguous destination, numcodecs
decodes as before.
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


def _blosc2_decompress() -> Callable[[int, int, int, int], int] | None:
    """``blosc2_decompress(src, srcsize, dest, destsize)`` of the installed ``blosc2`` wheel's
    library, its global context set to one thread; None where there is none. The Python package
    itself is not imported (its import pulls in far more than a decoder)."""
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
            fn = so.blosc2_decompress
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
        fn.restype = ctypes.c_int
        return fn
    return None


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


def decompress_into(frame, out: np.ndarray) -> None:
    """Decode one Blosc ``frame`` (bytes-like) into ``out``, which must hold exactly its bytes."""
    if _SHARED is None or os.getpid() != _IMPORT_PID or not out.flags.c_contiguous:
        blosc.decompress(frame, out)
        return
    src = np.frombuffer(frame, np.uint8)
    if src.nbytes < HEADER_BYTES:
        raise RuntimeError(f"error during blosc decompression: a {src.nbytes}-byte frame has no header")
    nbytes = int.from_bytes(src[4:8].tobytes(), "little")
    cbytes = int.from_bytes(src[12:16].tobytes(), "little")
    if cbytes > src.nbytes:
        raise RuntimeError(f"error during blosc decompression: the frame says {cbytes} bytes, {src.nbytes} given")
    if nbytes > out.nbytes:
        raise ValueError(f"destination buffer too small; expected at least {nbytes}, got {out.nbytes}")
    got = _SHARED[1](src.ctypes.data, cbytes, out.ctypes.data, out.nbytes)
    if got != nbytes:
        raise RuntimeError(f"error during blosc decompression: {got}")
