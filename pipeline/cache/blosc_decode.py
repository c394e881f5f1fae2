"""Blosc frames decoded through c-blosc's shared context, whose block temporaries outlive a call.

Why: off the main thread numcodecs decodes with ``blosc_decompress_ctx`` (zarr also sets
``numcodecs.blosc.use_threads = False`` at import), which builds a context and allocates
``2 x blocksize`` of temporaries (~516 KB at the 256 KB blocks of our 768 KB tap chunks) on every
call. Above lst's 128 KiB mmap threshold each is mapped, zero-filled and unmapped again: 129 page
faults per frame, 372 k of the stage-two reader's ~745 k faults on a cached MiniLM SST-2 epoch.
c-blosc's global ``blosc_decompress`` (the same library numcodecs ships and exports) takes its own
mutex and decodes on its thread pool, whose temporaries are allocated once: measured on a 768 KB
bf16 tap chunk from a worker thread, 0.22 ms of CPU per frame and no faults, against 0.38 ms and 129.

Where that entry point is missing, in a process forked after this module was imported (c-blosc's
threads do not survive a fork), or for a non-contiguous destination, numcodecs decodes as before.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from numcodecs import blosc

HEADER_BYTES = 16


def _global_decompress():
    try:
        fn = ctypes.CDLL(blosc.__file__).blosc_decompress
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_DECOMPRESS = _global_decompress()
_IMPORT_PID = os.getpid()


def decompress_into(frame, out: np.ndarray) -> None:
    """Decode one Blosc ``frame`` (bytes-like) into ``out``, which must hold exactly its bytes."""
    if _DECOMPRESS is None or os.getpid() != _IMPORT_PID or not out.flags.c_contiguous:
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
    got = _DECOMPRESS(src.ctypes.data, out.ctypes.data, out.nbytes)
    if got != nbytes:
        raise RuntimeError(f"error during blosc decompression: {got}")
