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


def return_freed_memory_to_os(threshold: int = 1 << 17) -> bool:
    """Make glibc hand large freed buffers back to the OS at once (a process-wide setting).

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB), after
    which batch-sized tensors come from the heap arenas and stay in the process's RSS when freed:
    measured on a cached MiniLM `lst train` step, the peak RSS went from 1,950 MB to 1,261 MB with
    a fixed 128 KiB threshold. A fixed threshold turns that adjustment off: every buffer above it
    is its own mapping, unmapped on free. Returns False where there is no glibc (not Linux).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False
