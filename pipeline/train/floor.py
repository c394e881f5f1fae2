"""The reader-free floor: a side network's steps on an epoch's batches decoded up front and held.

`lst bench train` asks how long a cached epoch would take were reading free. Two processes run the
floor: the bench's own floor process (``pipeline.bench.train floor``), and, given
``lst train --floor-file`` (hidden: only the bench sets it), the `lst train` process itself, after
each epoch and its evaluation, outside every timer.

Why in the run's own process as well: on this project's VM two processes a minute apart ran the
same steps up to ~20% apart (session 40: single steady-epoch pairs 0.76-1.49), a spread four times
the reader's own cost (~5% of an epoch), while in a probe inside one process an epoch streamed by
the reader ran 0.99-1.01 of the same epoch's batches held. The in-process floor sets each cached
epoch against a pass of the same epoch in the same process, right after it. Measured in the bench
(session 41), its pairs spread as widely (1.01-1.48 on a quiet machine): the drift is the machine's
from one pass to the next, so the bench runs it only when asked (``--in-process-floor``).

The floor's side network is its own: built afresh as the run builds its network, with its own
optimizer, reader and RNG stream. The run's steps restore their own RNG state before each step, so
the run trains exactly as without it (``tests/test_train.py``); only its process's peak grows, by
the epoch's batches held (the bench reports the peak before the first pass beside it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.memory import peak_rss_bytes
from pipeline.train.loop import TapSource, VariantRunner
from pipeline.train.reader import CacheReader


@dataclass
class Floor:
    """A side network to step (its own runner), its own reader of the run's batches, and their taps."""

    runner: VariantRunner
    reader: CacheReader
    source: TapSource


def held_pass(floor: Floor, epoch: int, n_batches: int = 0) -> float:
    """Seconds of ``floor.runner``'s steps over ``epoch``'s batches, all decoded first and held in
    memory (``n_batches`` > 0: that many spread evenly over the epoch, the time scaled to its step
    count). Only the steps are timed; the decode before them is not."""
    reader = floor.reader
    steps = reader.num_batches(epoch)
    n = n_batches if 0 < n_batches < steps else steps
    every = max(1, steps // n)
    batches = [b for i, b in enumerate(reader.iter_epoch(epoch)) if i % every == 0][:n]
    t0 = time.perf_counter()
    for b in batches:
        floor.runner.train_step(floor.source(b), b)
    took = time.perf_counter() - t0
    del batches
    return took / n * steps


class RunFloor:
    """``after_epoch`` of `lst train --floor-file`: a held pass of each finished epoch's batches, one
    JSON line to ``path`` per epoch (``epoch``, 1-based, ``floor_s``), the first line also with the
    process's peak RSS before any pass (``peak_mb_before``). The floor is built at the first call,
    after the run's first epoch, so the run's own start is as without it."""

    def __init__(self, build: Callable[[], Floor], path: str | Path, n_batches: int = 0) -> None:
        self._build = build
        self.path = Path(path)
        self.n_batches = n_batches
        self._floor: Floor | None = None

    def __call__(self, epoch: int) -> None:
        row: dict = {"epoch": epoch + 1}
        if self._floor is None:
            row["peak_mb_before"] = round(peak_rss_bytes() / 2**20, 1)
            self._floor = self._build()
        row["floor_s"] = round(held_pass(self._floor, epoch, self.n_batches), 4)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_floor_file(path: str | Path) -> list[dict]:
    """The rows a `lst train --floor-file` run wrote, in epoch order."""
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
