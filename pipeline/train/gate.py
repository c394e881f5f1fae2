"""Turns at epoch starts, handed out through two named pipes, so two processes can take epochs in turn.

Why: `lst bench train` sets the epochs of a real cached `lst train` against the passes of a reader-free
floor, each in a fresh process. On the VM this project is measured on, one fixed workload timed in one
process ran 1.06 s in one minute and 1.5-1.6 s in another (session 39: 40 steps on one held batch,
timed before and after each pass), so two processes run one after the other see different spells of
it, and their ratio moved 0.94-1.24 from run to run. Taking turns an epoch at a time, each cached epoch
runs between two of the floor's passes and both sample the same spells. Measured, that was no tighter
(one `--repeats 3` run: the pairs 0.89-1.32), so the bench does it only with ``--interleave``.

A process given a gate directory (``lst train --epoch-gate DIR``, hidden: only the bench sets it)
writes its epoch number to ``DIR/ready`` before each epoch's timer starts and waits for a line on
``DIR/go``; the holder of the other ends (``TurnKeeper``) answers when it is that process's turn. Its
epochs are timed as ever, the wait outside them. Where the keeper is gone (its pipe closed), the
process runs on without waiting.
"""

from __future__ import annotations

import os
import select
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class EpochGate:
    """The waiting side: ``gate(epoch)`` returns once the keeper gives this process its turn."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ready: int | None = None
        self._go: int | None = None

    def __call__(self, epoch: int) -> None:
        if self._ready is None:  # the keeper holds both pipes open, so neither open blocks
            self._ready = os.open(self.path / "ready", os.O_WRONLY)
            self._go = os.open(self.path / "go", os.O_RDONLY)
        try:
            os.write(self._ready, f"{epoch}\n".encode())
        except BrokenPipeError:
            return
        _read_line(self._go)

    def close(self) -> None:
        for fd in (self._ready, self._go):
            if fd is not None:
                os.close(fd)
        self._ready = self._go = None


@contextmanager
def epoch_gate(path: str | Path | None) -> Iterator[EpochGate | None]:
    """The gate on ``path`` for the length of the block (None where there is no path), its pipes
    closed however the block ends: the gated `lst train` and the gated floor open theirs this way."""
    gate = EpochGate(path) if path else None
    try:
        yield gate
    finally:
        if gate is not None:
            gate.close()


def _read_line(fd: int, alive: Callable[[], bool] | None = None, poll_s: float = 0.2) -> str | None:
    """One line from ``fd``, read a byte at a time (the pipes carry a few bytes a turn); None at EOF or
    once ``alive()`` says the writer has exited."""
    out = b""
    while True:
        if alive is not None:
            ready, _, _ = select.select([fd], [], [], poll_s)
            if not ready:
                if not alive():
                    return None
                continue
        b = os.read(fd, 1)
        if not b:
            return None
        if b == b"\n":
            return out.decode()
        out += b


class TurnKeeper:
    """The answering side, for one gated process: makes ``DIR/ready`` and ``DIR/go`` and holds both open
    (read-write, so neither side's open blocks on the other)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("ready", "go"):
            f = self.path / name
            if f.exists():
                f.unlink()
            os.mkfifo(f)
        self._ready = os.open(self.path / "ready", os.O_RDWR)
        self._go = os.open(self.path / "go", os.O_RDWR)
        self.waited = False  # whether the process is at a gate, waiting for its turn

    def wait(self, alive: Callable[[], bool]) -> bool:
        """Until the process is at its next gate (True) or has exited (False)."""
        if not self.waited:
            self.waited = _read_line(self._ready, alive) is not None
        return self.waited

    def turn(self, alive: Callable[[], bool]) -> None:
        """Give the process one epoch: let it through its gate, and wait until it is at the next one or
        has exited (nothing to do where it had already exited)."""
        if not self.wait(alive):
            return
        os.write(self._go, b"go\n")
        self.waited = False
        self.wait(alive)

    def close(self) -> None:
        os.close(self._ready)
        os.close(self._go)
