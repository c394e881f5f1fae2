"""A bounded cache of freed CPU tensor buffers (``cpu_cache.cpp``), installed as torch's CPU allocator.

Why: for bounded memory `lst` makes every freed buffer above 128 KiB leave the process at once
(``pipeline.memory``). Measured on a cached MiniLM SST-2 epoch, that cost 12.7 M page faults and a
third of the CPU time in the kernel, since each side step mapped and zero-filled its ~1 MB
temporaries again. This cache hands freed buffers back to requests of about the same size, each its
own mapping. It keeps ``cap`` bytes of them, or more while the live buffers are below their own peak
(what a step's forward held comes back for the next one): live + cached never passes
max(peak live, live + cap), so the peak RSS grows by at most ``cap``.

The C++ source is compiled once per torch version (``pipeline.native``: torch's own extension builder,
into ``~/.cache/lst/native``); ``scripts/setup.sh`` builds it,
and a process that finds no build makes one (~30 s) unless another process is already at it. Where
it cannot be built, `lst` runs as before. ``LST_CPU_CACHE`` sets the cap ("0" turns the cache off).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from pipeline import native

#: environment variable: the cache's cap (a size such as "8MB"), or "0"/"off" for no cache
ENV = "LST_CPU_CACHE"
#: the cap without a reader budget to scale from
DEFAULT_CAP = 8 << 20
#: the cap as a share of the reader's budget (512 MB -> 8 MB, 128 MB -> 2 MB). It bounds what the cache
#: may add to the process's peak; reuse comes mostly from the peak-live allowance (see ``cpu_cache.cpp``):
#: measured on a cached MiniLM SST-2 epoch, 2 MB, 8 MB and 32 MB caps gave the same hit rate (0.946)
#: and 32 MB peaked 12 MB higher
BUDGET_SHARE = 64
#: requests below this go to torch's own allocator (glibc's heap serves them without faults)
MIN_BYTES = 128 << 10
#: a cached block serves a request up to this share smaller than itself (its own size counts as live).
#: Measured on a cached MiniLM SST-2 epoch (8 MB cap): 0.25 hit 88.7% of requests in 22.8 s at a 578 MB
#: peak, 0.5 91.5% in 21.9 s at 580 MB, 1.0 94.6% in 21.8 s at 593 MB
SLACK = 0.5
SOURCE = Path(__file__).with_name("cpu_cache.cpp")
MODULE = "lst_cpu_cache"
EXTENSION = native.Extension(MODULE, SOURCE, functions=("install", "stats", "release", "restore_peak"))


@dataclass(frozen=True)
class CacheStats:
    cached_bytes: int
    peak_cached_bytes: int
    cap_bytes: int
    hits: int
    misses: int
    live_blocks: int
    min_bytes: int
    live_bytes: int  # bytes of the blocks handed out now
    peak_live_bytes: int  # ... at most so far (since install or release)
    resized: int = 0  # misses served by growing a smaller cached block (only the growth faults)
    run_peak_live_bytes: int = 0  # ``peak_live_bytes`` since install, across ``release`` calls


def cap_bytes(reader_memory: str | int | None = None, env: dict | None = None) -> int:
    """The cap ``LST_CPU_CACHE`` asks for; by default 1/64 of the reader's budget (``reader_memory``,
    a size such as "512MB" or bytes), at most 8 MB, so the cache stays a small share of what a
    ``--reader-memory`` run promises. A budget that does not parse counts as none: the command that
    reads it says what is wrong with it."""
    from pipeline.errors import UserError
    from pipeline.sizes import parse_size

    text = (os.environ if env is None else env).get(ENV, "").strip().lower()
    if text in ("0", "off", "none", "no"):
        return 0
    if text:
        try:
            return parse_size(text)
        except ValueError as e:
            raise UserError(f"{ENV}={text!r}: {e}; or 0 to turn the CPU buffer cache off") from None
    try:
        budget = parse_size(reader_memory) if reader_memory else None
    except ValueError:
        budget = None
    return budget_share(budget)


def budget_share(budget: int | None) -> int:
    """1/64 of a reader budget in bytes (``BUDGET_SHARE``), at most ``DEFAULT_CAP``; the cap itself
    without a budget. What the process's buffer caches (this one, MKL's: ``mkl_buffers``) may keep."""
    return DEFAULT_CAP if budget is None else min(DEFAULT_CAP, int(budget) // BUDGET_SHARE)


def build_dir() -> Path:
    """Where the build for this torch version and this source lives."""
    return native.build_dir(EXTENSION)


def build(verbose: bool = False) -> Path:
    """Compile the extension into ``build_dir()`` and return the library's path (``native.build``)."""
    return native.build(EXTENSION, verbose=verbose)


def install(cap: int, *, build_if_missing: bool = True, quiet: bool = False) -> bool:
    """Make torch's CPU tensors come from the bounded cache (a process-wide setting, once per
    process). Returns whether the cache is in place; False with ``cap`` 0, or where it cannot be
    built (the reason goes to stderr, once, unless ``quiet``)."""
    if cap <= 0:
        return False
    try:
        path = native.library(EXTENSION)
        if not path.exists():
            if not build_if_missing:
                return False
            note = None if quiet else f"lst: compiling the CPU buffer cache once (~30 s; {ENV}=0 skips it)"
            path = native.build_once_here(EXTENSION, note)
            if path is None:
                return False
        module = native.load(EXTENSION, path)
        module.install(MIN_BYTES, int(cap), SLACK)
        return True
    except Exception as e:  # no compiler, no ninja, an unloadable library: run as before
        if not quiet:
            print(f"lst: CPU buffer cache unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"running without it", file=sys.stderr)
        return False


def prepare_process(reader_memory: str | int | None = None, *, cpu_cache: bool = True, quiet: bool = False) -> bool:
    """Set up a process's memory as `lst` does when it starts: glibc hands freed buffers above the mmap
    threshold back at once (``pipeline.memory``), and, with ``cpu_cache``, torch's CPU tensors come from
    this cache, capped from the reader's budget (``cap_bytes``). One place for `lst`'s main, the sweep's
    worker processes and the bench's floor child, so each runs as `lst train` does. Returns whether the
    cache is in place."""
    from pipeline.memory import mmap_threshold, return_freed_memory_to_os

    return_freed_memory_to_os(mmap_threshold())
    return cpu_cache and install(cap_bytes(reader_memory), quiet=quiet)


def stats() -> CacheStats | None:
    """The cache's counters in this process, or None when it is not installed. ``run_peak_live_bytes``
    is the live peak since the cache was installed; ``release`` restarts the cache's own (``peak_live_bytes``)."""
    module = sys.modules.get(MODULE)
    got = module.stats() if module is not None else []
    if not got:
        return None
    st = CacheStats(*got)
    return replace(st, run_peak_live_bytes=max(st.peak_live_bytes, getattr(module, "released_peak_live", 0)))


def release() -> int:
    """Unmap every cached block (evaluation does, before its pass: the training step's blocks would
    otherwise sit beside it). The cache's peak of live bytes restarts from what is live now, so the
    blocks freed later are cached against that, not against the training step's peak; the peak
    before it is kept on the loaded module for ``stats`` and returned (0 without the cache), for
    ``restore_peak``."""
    module = sys.modules.get(MODULE)
    if module is None:
        return 0
    got = module.stats()
    peak = CacheStats(*got).peak_live_bytes if got else 0
    module.released_peak_live = max(getattr(module, "released_peak_live", 0), peak)
    module.release()
    return peak


def restore_peak(peak: int) -> None:
    """Cache against ``peak`` live bytes again (at least): after an evaluation, the training steps' peak
    that ``release`` returned. Without it the next epoch cached against its own peak so far, which
    starts at the evaluation's: on a cached MiniLM SST-2 run, 91.9 MB against 101.6 MB, and epoch 2
    missed ~1,000 more times (4,987 against 3,961) and page-faulted ~30 k times more on the training
    thread than the bench's floor, whose second pass follows the first with no evaluation between."""
    module = sys.modules.get(MODULE)
    if module is not None:
        module.restore_peak(int(peak))


@contextmanager
def released() -> Iterator[None]:
    """A pass (evaluation) that needs none of the training steps' cached blocks: ``release`` before it,
    ``restore_peak`` after it."""
    peak = release()
    try:
        yield
    finally:
        restore_peak(peak)


def main() -> int:
    """``python -m pipeline.alloc``: build it now (set-up does this)."""
    print(build(verbose=False))
    return 0
