"""The native frame reader (``read_cpu.cpp``): reads, checks and decodes a window's Blosc frames in
one call, over torch's own CPU threads, with the GIL released.

Why: the stage-two reader decoded frame by frame in Python on decode threads of its own. On a
2-core machine whose two torch threads are the side step's, those threads competed with the
training thread's OpenMP worker (which spins for milliseconds after every parallel region) and
held the GIL between their C calls, so a window's decode ran ~1.5-way parallel while the step
waited for it. Called from the training thread, the same frames decode on the team the step uses.

Optional like every extension (``native.OptionalExtension``): ``LST_NATIVE_READ=0`` or
``LST_CPU_KERNELS=0`` reads through Python as before, as does a process where it cannot be built, or whose c-blosc2 has
no context API. ``python -m pipeline.cache`` builds it (``scripts/setup.sh`` does).
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from pipeline import native
from pipeline.cache.blosc_decode import ThreadDecoder, context_functions, context_nbytes
from pipeline.cache.fastread import FrameTasks, damaged_shard

__all__ = ["EXTENSION", "ENV", "FrameReader", "module"]

#: environment variable: "0"/"off" reads frames through Python instead
ENV = "LST_NATIVE_READ"
_X86 = platform.machine() in ("x86_64", "AMD64")
EXTENSION = native.Extension(
    "lst_cache_cpu", Path(__file__).with_name("read_cpu.cpp"),
    cflags=("-O3", "-march=native" if _X86 else "-mcpu=native", "-fopenmp"),
    ldflags=("-fopenmp",),  # torch's libgomp: the frames go to the team the step uses
    this_cpu=True)
_READER = native.OptionalExtension(EXTENSION, "native cache reader", envs=(ENV, native.KERNELS_ENV),
                                   build_note="~20 s")

# a task's status (read_cpu.cpp's Status)
_ERRORS = {1: "is cut short", 2: "fails its checksum", 3: "does not decode", 4: "is larger than its read scratch"}


def module() -> ModuleType | None:
    """The built reader, or None where it is off, cannot be built, or c-blosc2 has no context API."""
    if context_functions() is None:
        return None
    return _READER.get()


class FrameReader:
    """``slots`` decoding slots (a read scratch of ``frame_bytes``, with ``chunk_bytes`` more for tasks
    that scatter a decoded chunk, and a c-blosc2 context each), kept for an epoch: ``decode`` uses at
    most that many of torch's threads (one slot: the calling thread only). ``nbytes`` is what it holds
    once used, for the caller's accounting."""

    def __init__(self, slots: int, frame_bytes: int, block_bytes: int, chunk_bytes: int = 0) -> None:
        mod = module()
        if mod is None:
            raise RuntimeError("the native cache reader is not available here (native_read.module() is None)")
        if (mod.COLS, mod.SEG_COLS) != (FrameTasks.COLS, FrameTasks.SEG_COLS):
            raise RuntimeError(f"the native cache reader's task layout ({mod.COLS}, {mod.SEG_COLS} columns) is not "
                               f"FrameTasks' ({FrameTasks.COLS}, {FrameTasks.SEG_COLS}): rebuild it "
                               "(python -m pipeline.cache)")
        self._mod = mod
        self._fns = context_functions()
        self._frame_bytes = int(frame_bytes)
        self._scratch = torch.empty((slots, frame_bytes + chunk_bytes), dtype=torch.uint8)
        self._decoders = [ThreadDecoder() for _ in range(slots)]
        self._contexts = [d.address() for d in self._decoders]
        self.nbytes = self.sizes(slots, frame_bytes, block_bytes, chunk_bytes)

    @staticmethod
    def sizes(slots: int, frame_bytes: int, block_bytes: int, chunk_bytes: int = 0) -> int:
        return slots * (frame_bytes + chunk_bytes + context_nbytes(block_bytes))

    def decode(self, tasks: FrameTasks) -> None:
        """Every task's frame read, checked and decoded into its destination; a bad frame raises
        ``ChecksumError`` (or ``RuntimeError``) naming its file and rows after the others are done."""
        if not len(tasks):
            return
        status = self._mod.decode_frames(torch.from_numpy(tasks.task_table()),
                                         torch.from_numpy(tasks.segment_table()), self._scratch,
                                         self._frame_bytes, self._contexts, *self._fns, len(self._contexts) > 1)
        bad = np.flatnonzero(status.numpy())
        if len(bad):
            i = int(bad[0])
            f, c0, c1 = tasks.where[i]
            code = int(status[i])
            what = f"chunk at rows {c0}:{c1} {_ERRORS.get(code, f'failed ({code})')}"
            if code in (1, 2):  # cut short or bad bytes: the store's damage, reported as such
                raise damaged_shard(f, what)
            raise RuntimeError(f"{f}: {what}")

    def close(self) -> None:
        for d in self._decoders:
            d.close()
        self._decoders, self._contexts = [], []
