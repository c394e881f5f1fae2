"""Test hooks for the fault-injection benchmark (``lst bench faults``); all off by default.

Writers call :func:`fault_point` at the moments a crash matters (a shard's data written but its
``done`` flag not yet set, a checkpoint file about to be replaced, ...). Nothing happens unless one
of these environment variables is set:

``LST_FAULT_TRACE=1``
    print ``lst-fault: NAME`` on stderr at each point, so a test can SIGKILL right there.
``LST_FAULT_SLEEP_<NAME>=SECONDS``
    sleep at point NAME (upper case, '-' as '_'), e.g. ``LST_FAULT_SLEEP_BEFORE_DONE=0.5``
    widens the window between a shard's data and its done flag.
``LST_FAULT_ENOSPC=NAME:N``
    raise ``OSError(ENOSPC)`` at the N-th time point NAME is reached (a full disk, injected).
"""

from __future__ import annotations

import errno
import os
import sys
import time

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    if "LST_FAULT_TRACE" not in os.environ and not any(k.startswith("LST_FAULT_") for k in os.environ):
        return
    if os.environ.get("LST_FAULT_TRACE"):
        print(f"lst-fault: {name}", file=sys.stderr, flush=True)
    delay = os.environ.get("LST_FAULT_SLEEP_" + name.upper().replace("-", "_"))
    if delay:
        time.sleep(float(delay))
    spec = os.environ.get("LST_FAULT_ENOSPC", "")
    if spec:
        target, _, nth = spec.partition(":")
        if target == name:
            _counts[name] = _counts.get(name, 0) + 1
            if _counts[name] >= int(nth or 1):
                raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
