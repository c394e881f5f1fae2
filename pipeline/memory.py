"""Peak resident memory of this process.

``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``exec``: a child started from a large parent reports
the parent's peak. ``VmHWM`` in /proc/self/status belongs to the current address space, so it is
reset at exec and measures only this program.
"""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: environment variable that sets the threshold: a size ("128KB", "4MB") or "glibc" (glibc's own)
THRESHOLD_ENV = "LST_MMAP_THRESHOLD"
DEFAULT_THRESHOLD = 1 << 17


def mmap_threshold(env: dict | None = None) -> int | None:
    """The threshold ``LST_MMAP_THRESHOLD`` asks for (default 128 KiB); None for "glibc".
    A value that is neither is the user's to fix (``UserError``: one line, exit 2 from ``lst``)."""
    import os

    from pipeline.errors import UserError
    from pipeline.sizes import parse_size

    text = (os.environ if env is None else env).get(THRESHOLD_ENV, "").strip()
    if not text:
        return DEFAULT_THRESHOLD
    if text.lower() in ("glibc", "auto"):
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(f"{THRESHOLD_ENV}={text!r}: {e}; or 'glibc' for glibc's own adaptive threshold") from None


def return_freed_memory_to_os(threshold: int | None = DEFAULT_THRESHOLD) -> bool:
    """Make glibc hand large freed buffers back to the OS at once (a process-wide setting).

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB), after
    which batch-sized tensors come from the heap arenas and stay in the process's RSS when freed:
    measured on a cached MiniLM `lst train` step, the peak RSS went from 1,950 MB to 1,261 MB with
    a fixed 128 KiB threshold. A fixed threshold turns that adjustment off: every buffer above it
    is its own mapping, unmapped on free. The price is speed: each step maps and zero-fills its
    buffers again. Measured (session 10, `lst train`, cached SST-2 20k MiniLM epoch, 2 threads):
    128 KiB 38.5 s and 634 MB peak, 1 MB 26.1 s / 768 MB, 4 MB 20.6 s / 898 MB, glibc's own 19.3 s / 938 MB.
    ``threshold=None`` leaves glibc's setting. Returns False where nothing was set (no glibc).

    MKL's own buffer cache (its GEMMs keep their packing buffers) is left on: ``MKL_DISABLE_FAST_MM=1``
    took 15-24 MB off a 7B-shaped side step's peak (`lst bench scale`, 128 MB at 128-512 tokens) but made a
    fused 16-variant MiniLM sweep 2.2x slower (101 s against 46 s), each small GEMM then allocating
    and mapping its buffers afresh. Instead the training loop frees MKL's cache between steps once it
    passes a share of the reader's budget (``pipeline.alloc.mkl_buffers``).
    """
    import ctypes
    import ctypes.util

    if threshold is None:
        return False

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False
