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
``lst train --floor-file F --floor-steps`` (the bench's ``--step-floor``, session 42) interleaves the
floor with the run step by step instead (``StepFloor``), so both arms see the machine of the same
moment.

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

import torch

from pipeline.memory import peak_rss_bytes
from pipeline.train.loop import TapSource, VariantRunner
from pipeline.train.reader import CacheReader


@dataclass
class Floor:
    """A side network to step (its own runner), its own reader of the run's batches, and their taps."""

    runner: VariantRunner
    reader: CacheReader
    source: TapSource


def _sync(floor: Floor) -> None:
    """Wait for the queued kernels on CUDA, so a timer around steps times their work, not its launch."""
    if floor.runner.device.type == "cuda":
        torch.cuda.synchronize(floor.runner.device)


def held_pass(floor: Floor, epoch: int, n_batches: int = 0) -> float:
    """Seconds of ``floor.runner``'s steps over ``epoch``'s batches, all decoded first and held in
    memory (``n_batches`` > 0: that many spread evenly over the epoch, the time scaled to its step
    count). Only the steps are timed; the decode before them is not."""
    reader = floor.reader
    steps = reader.num_batches(epoch)
    n = n_batches if 0 < n_batches < steps else steps
    every = max(1, steps // n)
    batches = [b for i, b in enumerate(reader.iter_epoch(epoch)) if i % every == 0][:n]
    _sync(floor)
    t0 = time.perf_counter()
    for b in batches:
        floor.runner.train_step(floor.source(b), b)
    _sync(floor)
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


class StepFloor:
    """`lst train --floor-file F --floor-steps`: the floor one held step at a time, between the run's own
    steps, from epoch ``from_epoch`` (1: the steady epochs; the first stays a plain epoch).

    Why: on this project's VM the same fixed work ran up to ~20% apart from one second to the next
    (session 41), so a cached epoch and a held pass timed one after the other, even in one process,
    differ by the machine's drift as much as by the reader. Here the run's steps (their waits for the
    reader included) and the twin's steps on the same epoch's batches, decoded before the epoch and
    held, alternate every ~50-100 ms, so both arms see the same machine. The loop leaves the twin's
    steps out of its ``epoch_s`` and stall (``run_loop(after_step=)``), so the row's ratio is the
    epoch as the run timed it against the sum of its twin's held steps.

    The order within each pair of batches is run 2j, twin 2j, twin 2j+1, run 2j+1: each arm follows
    the other on the same batch for half the steps. Why not run i, twin i throughout: a step right
    after a step of the same shapes finds its buffers sized in the CPU buffer cache, while the first
    step of a new batch length misses and page-faults them afresh (by-length batches: ~3,700 misses
    and ~170 k faults an epoch on cached MiniLM SST-2). Always second, the twin never paid them and
    the run paid them all, which read as a ~5% gap in the steps themselves (session 42:
    ``probes_session42.json``).

    Each epoch's batches are decoded before its timer starts (``before_epoch``) and each is dropped
    once stepped. The twin is built, and steps ``warmup`` held batches untimed, before its first
    epoch, so no first-step costs (buffers growing to the step's shapes) land in a timed step. One
    JSON line an epoch to ``path``: ``epoch`` (1-based), ``floor_s`` (the twin's steps),
    ``cached_steps_s`` (the run's spans between them: its steps and waits), ``steps``; the first also
    ``peak_mb_before`` (the process's peak RSS before the twin)."""

    def __init__(self, build: Callable[[], Floor], path: str | Path, from_epoch: int = 1, warmup: int = 2) -> None:
        self._build = build
        self.path = Path(path)
        self.from_epoch = from_epoch
        self.warmup = warmup
        self._floor: Floor | None = None
        self._held: list | None = None
        self._row: dict = {}
        self._last = 0.0

    def before_epoch(self, epoch: int) -> None:
        self._held = None
        if epoch < self.from_epoch:
            return
        row: dict = {"epoch": epoch + 1}
        fresh = self._floor is None
        if fresh:
            row["peak_mb_before"] = round(peak_rss_bytes() / 2**20, 1)
            self._floor = self._build()
        floor = self._floor
        assert floor is not None
        self._held = list(floor.reader.iter_epoch(epoch))
        for b in self._held[:self.warmup] if fresh else []:
            floor.runner.train_step(floor.source(b), b)
        self._row = {**row, "floor_s": 0.0, "cached_steps_s": 0.0, "steps": 0}
        self._last = time.perf_counter()

    def after_step(self, epoch: int, i: int) -> None:
        held = self._held
        if held is None or i % 2 or i >= len(held):
            return
        self._row["cached_steps_s"] += time.perf_counter() - self._last
        self._step(i)
        if i + 1 < len(held):
            self._step(i + 1)
        self._last = time.perf_counter()

    def _step(self, i: int) -> None:
        held, floor = self._held, self._floor
        assert held is not None and floor is not None
        b, held[i] = held[i], None  # dropped once stepped, as a streamed batch is
        t0 = time.perf_counter()  # (the loop waited for the run's own queued kernels before this pause)
        floor.runner.train_step(floor.source(b), b)
        _sync(floor)
        self._row["floor_s"] += time.perf_counter() - t0
        self._row["steps"] += 1

    def after_epoch(self, epoch: int) -> None:
        if self._held is None:
            return
        self._held = None
        row = {k: round(x, 4) if isinstance(x, float) else x for k, x in self._row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_floor_file(path: str | Path) -> list[dict]:
    """The rows a `lst train --floor-file` run wrote, in epoch order."""
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
