"""lst's C++ kernels for small side networks on CPU (``kernels_cpu.cpp``): attention
(``native_attention``) and dropout (``dropout``). This module builds and loads them.

They are optional: ``LST_CPU_KERNELS=0`` (or the older ``LST_NATIVE_ATTENTION=0``) runs torch's
arithmetic instead, as does a process where they cannot be built. A process that finds no build
compiles them (~25 s) unless another process is already at it; ``scripts/setup.sh`` builds them
(``python -m pipeline.side.blocks``). Compiled with ``-march=native`` for the CPU at hand
(``native.Extension.this_cpu``).
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import ModuleType

from pipeline import native

__all__ = ["EXTENSION", "ENV", "kernels"]

#: environment variable: "0"/"off" runs torch's arithmetic instead of the kernels
ENV = native.KERNELS_ENV
#: its first name (session 30's attention kernel), still read
OLD_ENV = "LST_NATIVE_ATTENTION"
#: 512-bit vectors where there are any (GCC otherwise splits the kernels' 16-lane vectors in two)
_WIDE = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
EXTENSION = native.Extension(
    "lst_side_cpu", Path(__file__).with_name("kernels_cpu.cpp"),
    cflags=("-O3", "-march=native", *_WIDE, "-fopenmp"),
    ldflags=("-fopenmp",),  # resolves to the libgomp torch already loaded: the same thread pool
    this_cpu=True)
_KERNELS = native.OptionalExtension(EXTENSION, "CPU side-network kernels", envs=(ENV, OLD_ENV))


def kernels() -> ModuleType | None:
    """The kernel module, or None where they are off (``ENV``) or cannot be built."""
    return _KERNELS.get()
