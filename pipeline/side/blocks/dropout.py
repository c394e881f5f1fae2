"""Dropout with a cheaper mask on CPU, drawn from a per-variant stream when one is set.

``nn.Dropout`` on CPU draws its mask with ``bernoulli_``, which profiled at 14% of a cached side
step with attention dropout off and 37% with it on (MiniLM side network, batch 100): a side network
is small, so its dropout masks cost as much as its matmuls.  Drawing uniforms and comparing gives
the same Bernoulli(1 - p) mask at about 60% of the time.  Off CPU, ``nn.Dropout`` is used as is
(CUDA's kernel is fused and fast).

Where the uniforms come from: torch's global generator, unless ``dropout_stream(g)`` names a
generator for the current thread (a ``ContextVar``). A fused sweep trains variants on several
threads at once, so they cannot take turns swapping one global RNG state in and out; each gets its
own generator, holding exactly the state the global one would have had, so every mask (and so every
number) equals a run of its own. ``checkpoint`` reruns a block in the backward from the stream state
it had in the forward, as torch's ``preserve_rng_state`` does for the global generator.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

__all__ = ["Dropout", "dropout", "dropout_stream", "uniform", "normal", "checkpoint"]

_STREAM: ContextVar[torch.Generator | None] = ContextVar("lst_dropout_stream", default=None)


@contextmanager
def dropout_stream(generator: torch.Generator | None) -> Iterator[None]:
    """Draw this thread's dropout masks from ``generator`` (None: torch's global generator)."""
    token = _STREAM.set(generator)
    try:
        yield
    finally:
        _STREAM.reset(token)


def uniform(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """U[0, 1) draws of ``like``'s dtype and device from the current stream (``torch.rand``'s values)."""
    return torch.rand(shape, dtype=like.dtype, device=like.device, generator=_STREAM.get())


def normal(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """N(0, 1) draws of ``like``'s dtype and device from the current stream (``torch.randn``'s values)."""
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=_STREAM.get())


def _uniform_like(x: Tensor) -> Tensor:
    g = _STREAM.get()
    if g is None:
        return torch.rand_like(x)
    return torch.empty_like(x).uniform_(0.0, 1.0, generator=g)  # what rand_like does, from g


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, True)
    # the same values as where(u >= p, x / (1 - p), 0), one temporary fewer (each one is mapped and
    # zero-filled afresh under lst's 128 KiB mmap threshold)
    drop = _uniform_like(x) < p
    return (x * (1.0 / (1.0 - p))).masked_fill_(drop, 0.0)


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) whose rerun draws the forward's dropout masks again,
    from the global generator (torch restores it) or from this thread's stream (restored here)."""
    g = _STREAM.get()
    if g is None:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    state = g.get_state()
    calls = [0]

    def run(*a: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a)
        replay = torch.Generator(device=g.device)
        replay.set_state(state)
        with dropout_stream(replay):
            return fn(*a)

    return torch_checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
