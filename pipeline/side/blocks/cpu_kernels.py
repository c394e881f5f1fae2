"""lst's C++ kernels for small side networks on CPU (``kernels_cpu.cpp``): attention
(``native_attention``) and dropout (``dropout``). This module builds and loads them.

They are optional: ``LST_CPU_KERNELS=0`` (or the older ``LST_NATIVE_ATTENTION=0``) runs torch's
arithmetic instead, as does a process where they cannot be built. A process that finds no build
compiles them (~25 s) unless another process is already at it; ``scripts/setup.sh`` builds them
(``python -m pipeline.side.blocks``). Compiled with ``-march=native`` for the CPU at hand
(``native.Extension.this_cpu``).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

from pipeline import native

__all__ = ["EXTENSION", "ENV", "kernels"]

#: environment variable: "0"/"off" runs torch's arithmetic instead of the kernels
ENV = "LST_CPU_KERNELS"
#: its first name (session 30's attention kernel), still read
OLD_ENV = "LST_NATIVE_ATTENTION"
#: 512-bit vectors where there are any (GCC otherwise splits the kernels' 16-lane vectors in two)
_WIDE = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
EXTENSION = native.Extension(
    "lst_side_cpu", Path(__file__).with_name("kernels_cpu.cpp"),
    cflags=("-O3", "-march=native", *_WIDE, "-fopenmp"),
    ldflags=("-fopenmp",),  # resolves to the libgomp torch already loaded: the same thread pool
    this_cpu=True)
#: the first load (or build) happens once even where variant threads ask at the same moment
_LOAD_LOCK = threading.Lock()


def _disabled() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("0", "off", "no", "none") for v in (ENV, OLD_ENV))


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    """The built kernels, compiled here first if missing (None: unbuildable, or another process is
    compiling them; this process then runs torch's arithmetic throughout)."""
    try:
        path = native.library(EXTENSION)
        if not path.exists():
            path = native.build_once_here(
                EXTENSION, f"lst: compiling the CPU side-network kernels once (~25 s; {ENV}=0 skips it)")
            if path is None:
                return None
        return native.load(EXTENSION, path)
    except Exception as e:  # no compiler, no ninja, an unloadable library: torch's path
        print(f"lst: CPU side-network kernels unavailable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}); using torch's arithmetic", file=sys.stderr)
        return None


def kernels() -> ModuleType | None:
    """The kernel module, or None where they are off (``ENV``) or cannot be built."""
    if _disabled():
        return None
    with _LOAD_LOCK:
        return _load()
