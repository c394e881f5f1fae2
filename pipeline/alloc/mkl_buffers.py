"""MKL's GEMM buffer cache, kept within a share of the reader's budget by freeing it between steps.

Why: MKL keeps the packing buffers of its GEMMs for reuse, and on a wide side network they add up.
On the 7B-shaped cache of `lst bench scale` (d 4096, 9 taps, ladders [4096 -> 512]) they grew step by
step to 23.9 MB (``mkl_serv_mem_stat``: 1.1, 3.5, 7.6, 12.1, 18.4, 23.9 MB as new GEMM shapes came),
and they sit beside the side step's peak. One step needs 12.7 MB of them; the rest is buffers kept
from earlier steps' shapes. Turning MKL's cache off (``MKL_DISABLE_FAST_MM=1``) saved as much but made
every small GEMM allocate afresh: a fused 16-variant MiniLM sweep ran 2.2x slower. Freeing the cache
once a step, and only when it holds more than ``cap``, costs one re-allocation of a step's buffers
where it triggers (a 7B-shaped step takes ~0.5 s) and nothing where it does not (MiniLM's side
network holds 1.2 MB of them, under the 8 MB cap of the default budget).

MKL is linked into torch's CPU library and exports ``mkl_serv_mem_stat`` and
``mkl_serv_free_buffers`` there (``mkl_free_buffers``'s own entry points). Where torch has no MKL (an
ARM or a non-MKL build), ``find`` returns None and nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Callable

from pipeline.alloc import budget_share


def cap_bytes(budget: int | None) -> int:
    """The most MKL may keep between steps: the CPU buffer cache's share of the reader's budget in
    bytes (1/64, at most 8 MB: 512 MB -> 8 MB, 128 MB -> 2 MB), without its ``LST_CPU_CACHE`` override."""
    return budget_share(budget)


@dataclass(frozen=True)
class MklBuffers:
    """MKL's buffer cache in this process: what it holds (``held``) and a call that frees it."""

    held: Callable[[], int]
    free: Callable[[], None]
    cap: int

    def trim(self) -> bool:
        """Free MKL's cached buffers when they hold more than ``cap``. Call it only where no thread
        is inside an MKL call (between training steps); returns whether it freed them."""
        if self.held() <= self.cap:
            return False
        self.free()
        return True


def find(cap: int) -> MklBuffers | None:
    """MKL's buffer cache in torch's CPU library, trimmed at ``cap`` bytes; None where torch has no MKL."""
    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        lib = ctypes.CDLL(os.path.join(lib_dir, "libtorch_cpu.so"))
        mem_stat, free_buffers = lib.mkl_serv_mem_stat, lib.mkl_serv_free_buffers
    except (OSError, AttributeError):
        return None
    mem_stat.restype = ctypes.c_int64
    mem_stat.argtypes = [ctypes.POINTER(ctypes.c_int)]
    free_buffers.restype = None
    free_buffers.argtypes = []

    def held() -> int:
        return int(mem_stat(ctypes.byref(ctypes.c_int(0))))

    return MklBuffers(held=held, free=free_buffers, cap=int(cap))
