"""Dropout with a cheaper mask on CPU, drawn from a per-variant stream when one is set.

``nn.Dropout`` on CPU draws its mask with ``bernoulli_``, which profiled at 14% of a cached side
step with attention dropout off and 37% with it on (MiniLM side network, batch 100): a side network
is small, so its dropout masks cost as much as its matmuls. A mask element needs far fewer random
bits than a float: ``drop_mask`` takes 15 bits per element, two from each 32-bit draw of torch's CPU
generator, and compares them with round(p * 2**15) (so p is rounded to a multiple of 2**-15: 0.1 ->
0.100006). On the 2-core box a [100, 12, 20, 20] mask costs 0.7 ms against 1.6 ms for float
uniforms compared with p (session 18), which cost 60% of ``bernoulli_``. Where lst's CPU kernels are
built (``cpu_kernels``), the compare and the arithmetic are one pass in C++ on the same lanes (same
mask, same values). Off CPU, ``nn.Dropout`` is used as is (CUDA's kernel is fused and fast).

Where the random bits come from: torch's global generator, unless ``dropout_stream(g)`` names a
generator for the current thread (a ``ContextVar``). A fused sweep trains variants on several
threads at once, so they cannot take turns swapping one global RNG state in and out; each gets its
own generator, holding exactly the state the global one would have had, so every mask (and so every
number) equals a run of its own. ``checkpoint`` reruns a block in the backward from the RNG state
it had in the forward: the stream's, or the global generator's as torch's ``preserve_rng_state``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import cpu_kernels

__all__ = ["Dropout", "dropout", "dropout_stream", "drop_mask", "lane_mask", "random_words", "random_lanes",
           "mask_threshold", "normal", "checkpoint"]

#: random bits behind one mask element
MASK_BITS = 15

_STREAM: ContextVar[torch.Generator | None] = ContextVar("lst_dropout_stream", default=None)


@contextmanager
def dropout_stream(generator: torch.Generator | None) -> Iterator[None]:
    """Draw this thread's dropout masks from ``generator`` (None: torch's global generator)."""
    token = _STREAM.set(generator)
    try:
        yield
    finally:
        _STREAM.reset(token)


def normal(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """N(0, 1) draws of ``like``'s dtype and device from the current stream (``torch.randn``'s values)."""
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=_STREAM.get())


def random_words(n: int, like: Tensor) -> Tensor:
    """``n`` int16 halves of (n + 1) // 2 draws of ``int32.random_()`` (31 random bits) from the current
    stream, in order: ``random_lanes`` before its mask (the CPU kernels mask as they read). On CPU the
    kernels draw them (``kernels_cpu.cpp``: the same words, the generator moved on the same way, ~8x
    faster than ``random_``'s one-output-at-a-time MT19937)."""
    count = (n + 1) // 2
    kern = cpu_kernels.kernels() if like.device.type == "cpu" else None
    if kern is not None:
        words = kern.random_words(count, _STREAM.get())
    else:
        words = torch.empty((count,), dtype=torch.int32, device=like.device).random_(generator=_STREAM.get())
    return words.view(torch.int16)[:n]


def random_lanes(n: int, like: Tensor) -> Tensor:
    """``n`` uniform ``MASK_BITS``-bit integers (int16) from the current stream: the two 16-bit halves of
    each of (n + 1) // 2 draws of ``int32.random_()`` (31 random bits), each masked to 15 bits, in
    order. So lanes drawn in chunks of an even size are the lanes of one draw."""
    return random_words(n, like).bitwise_and_((1 << MASK_BITS) - 1)


def mask_threshold(p: float) -> int:
    """Lanes below this are dropped: P = mask_threshold(p) / 2**MASK_BITS, p rounded to that grid."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], not {p}")
    return round(p * (1 << MASK_BITS))


def lane_mask(n: int, p: float, like: Tensor, *, keep: bool, out: Tensor | None = None) -> Tensor:
    """``n`` mask elements from ``random_lanes``: True where dropped (``keep=False``) or where kept
    (``keep=True``), dropped with probability p on ``mask_threshold``'s grid; written into ``out`` when
    given. The lanes are drawn whatever p is, so the stream moves the same way."""
    lanes = random_lanes(n, like)
    t = mask_threshold(p)
    if out is None:
        out = torch.empty((n,), dtype=torch.bool, device=like.device)
    if t >= 1 << MASK_BITS:  # p = 1 (int16 cannot hold the threshold): every element dropped
        return out.fill_(not keep)
    return torch.ge(lanes, t, out=out) if keep else torch.lt(lanes, t, out=out)


def drop_mask(shape: tuple[int, ...] | torch.Size, p: float, like: Tensor) -> Tensor:
    """A bool mask of ``shape``, True with probability p (on ``mask_threshold``'s grid) where an
    element is dropped, drawn from the current stream (``random_lanes``)."""
    return lane_mask(math.prod(shape), p, like, keep=False).view(shape)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, True)
    if x.dtype == torch.float32 and cpu_kernels.kernels() is not None:
        return _KernelDropout.apply(x, random_words(x.numel(), x), mask_threshold(p), 1.0 / (1.0 - p))
    # the same values as where(u >= p, x / (1 - p), 0), one temporary fewer (each one is mapped and
    # zero-filled afresh under lst's 128 KiB mmap threshold)
    drop = drop_mask(x.shape, p, x)
    return (x * (1.0 / (1.0 - p))).masked_fill_(drop, 0.0)


class _KernelDropout(torch.autograd.Function):
    """``dropout``'s mask and arithmetic in one pass of the C++ kernel (``cpu_kernels``): the same lanes,
    so the same mask and the same values bit for bit, where torch's path takes a compare, a multiply and
    a masked fill (two passes in the backward) and keeps a bool per element; this keeps a bit."""

    @staticmethod
    def forward(ctx, x: Tensor, lanes: Tensor, threshold: int, c: float) -> Tensor:
        kern = cpu_kernels.kernels()
        out, bits = kern.dropout_forward(x, lanes, threshold, c)
        ctx.save_for_backward(bits)
        ctx.c, ctx.kernels = c, kern  # the backward runs where the forward ran
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (bits,) = ctx.saved_tensors
        return ctx.kernels.dropout_backward(grad, bits, ctx.c).view(grad.shape), None, None, None


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` keeping none of its activations for the backward, which reruns it.

    The algorithm of ``torch.utils.checkpoint(use_reentrant=False)``, written here because torch's
    imports ``torch._dynamo`` at its first rerun (~1 s and ~69 MB of every stage-two process; see
    ``pipeline.train.adamw``). Every tensor the forward saves for the backward is replaced by its
    index; the first one the backward asks for reruns ``fn`` once, with grad on, on detached copies of
    the inputs and from the forward's RNG state (this thread's dropout stream, or torch's global CPU
    and CUDA generators, which it leaves where they were), and the rerun's saved tensors, taken in
    the same order, are handed out. Gradients reach ``fn``'s parameters, and anything else outside,
    through the first pass's graph, so they equal a plain step's bit for bit.
    """
    stream = _STREAM.get()
    state = stream.get_state() if stream is not None else None
    cpu_state = torch.get_rng_state() if stream is None else None
    cuda = [a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"][:1]
    cuda_state = torch.cuda.get_rng_state(cuda[0]) if cuda and stream is None else None
    saved: dict[int, Tensor] = {}
    count = [0]

    def pack(_t: Tensor) -> int:
        count[0] += 1
        return count[0] - 1

    def rerun() -> None:
        inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]

        def keep(t: Tensor) -> int:
            saved[len(saved)] = t
            return len(saved) - 1

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda i: saved[i]):
            if stream is not None:
                replay = torch.Generator(device=stream.device)
                replay.set_state(state)
                with dropout_stream(replay):
                    fn(*inputs)
                return
            with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, cuda[0])
                fn(*inputs)

    def unpack(i: int) -> Tensor:
        if i not in saved:  # the first the backward needs (or a second backward): rerun
            saved.clear()
            rerun()
        return saved.pop(i)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args)
