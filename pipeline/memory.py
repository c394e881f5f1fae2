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
