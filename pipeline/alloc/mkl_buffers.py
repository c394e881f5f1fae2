"""MKL's GEMM buffer cache, kept within what a step needs plus a share of the reader's budget.

Why: MKL keeps the packing buffers of its GEMMs for reuse, and on a wide side network they add up.
On the 7B-shaped cache of `lst bench scale` (d 4096, 9 taps, ladders [4096 -> 512]) they grew step by
step to 23.9 MB (``mkl_serv_mem_stat``: 1.1, 3.5, 7.6, 12.1, 18.4, 23.9 MB as new GEMM shapes came),
and they sit beside the side step's peak. One step needs 12.7 MB of them; the rest is buffers kept
from earlier steps' shapes. Turning MKL's cache off (``MKL_DISABLE_FAST_MM=1``) saved as much but made
every small GEMM allocate afresh: a fused 16-variant MiniLM sweep ran 2.2x slower.

So the cache is freed between steps, but only of what a step does not need again: ``trim`` frees it
when it holds more than ``cap`` beyond the most one step has mapped from nothing (``need``, learned
from the step after each free). Freeing at a flat ``cap`` freed what the next step maps again: the
MiniLM side step of a cached SST-2 epoch holds 17.9-18.1 MB of them, over the 8 MB cap of the default
budget, so every step freed and re-mapped ~18 MB, which cost it 0.67 ms (median over 214 batches each
stepped twice in one process, once right after a free; ~0.9% of the step). Keeping them left the
peak where it was (`lst bench memory --methods cached`, two alternated pairs: 250.0-251.8 against
250.2-250.4 MB above the baseline), since one step maps them all again anyway.

MKL is linked into torch's CPU library and exports ``mkl_serv_mem_stat`` and
``mkl_serv_free_buffers`` there (``mkl_free_buffers``'s own entry points). Where torch has no MKL (an
ARM or a non-MKL build), ``find`` returns None and nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Callable

from pipeline.alloc import budget_share


def cap_bytes(budget: int | None) -> int:
    """The most MKL may keep between steps: the CPU buffer cache's share of the reader's budget in
    bytes (1/64, at most 8 MB: 512 MB -> 8 MB, 128 MB -> 2 MB), without its ``LST_CPU_CACHE`` override."""
    return budget_share(budget)


@dataclass
class MklBuffers:
    """MKL's buffer cache in this process: what it holds (``held``), a call that frees it, and what
    one step needs of it (``need``, learned by ``trim``)."""

    held: Callable[[], int]
    free: Callable[[], None]
    cap: int
    need: int = 0
    _freed: bool = field(default=False, repr=False)

    def trim(self) -> bool:
        """Free MKL's cached buffers when they hold more than ``cap`` beyond ``need``. Call it only where
        no thread is inside an MKL call (between training steps); returns whether it freed them. What
        the cache holds at the first call after a free is what one step mapped afresh: ``need`` is the
        most of that seen, so a step's own buffers stay and only those of other shapes go."""
        held = self.held()
        if self._freed:
            self.need, self._freed = max(self.need, held), False
        if held <= self.need + self.cap:
            return False
        self.release()
        return True

    def release(self) -> None:
        """Free the cache now (before an evaluation, which needs fewer of them than a training step)."""
        self.free()
        self._freed = True


def find(cap: int) -> MklBuffers | None:
    """MKL's buffer cache in torch's CPU library, trimmed past a step's need plus ``cap`` bytes; None where
    torch has no MKL."""
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
