"""Small-head attention on CPU in C++ (``kernels_cpu.cpp``, loaded by ``cpu_kernels``), forward and backward.

Why: a side network's heads are tiny. On MiniLM, 12 heads of dim 4: torch's batched matmuls and
softmax over [B, H, L, L] are per-row overhead and [B, H, L, L] temporaries, and attention took ~43%
of a cached side step (session 30's profile, one thread). The kernel computes 16 (batch, head) pairs
side by side, one per vector lane, keeps nothing of size [L, L], reads q, k and v through their
strides (no head copies) and writes its outputs in the layout ``merge_heads`` reads as a view. Forward
and backward at [100, 12, 28, 4] with dropout, one thread: 2.3 ms against 12.7 ms for the written-out
``_DropoutAttention``; without dropout 1.9 ms against 4.6-10.3 ms for SDPA's.

Where it runs (``fits``): float32 on CPU, head dim 4, 8 or 16, at most ``MAX_KEYS`` keys (without
attention dropout: head dim 4 or 8 and at most ``NO_DROPOUT_MAX_KEYS`` keys, where it measured faster
than SDPA's kernel), and a bias that needs no gradient
(T5's and MPNet's learned position biases do: they take the torch path). Everywhere else, and where
the kernel cannot be built, ``attention.attend`` runs torch's arithmetic, to float rounding the same.

The dropout mask comes from the same random draws as the torch path's (so the stream moves the same
way), read in the kernel's lane order: draw n is mask element (lane group, query row, key, lane), not
(batch, head, query row, key). So the dropped elements differ from the torch path's, drawn from the
same distribution. ``lane_order`` maps a [B, H, Lq, Lk] mask to that order and ``from_lane_order``
back (for tests and for anyone comparing the two paths). Up to ``LANES_AT_ONCE`` elements the random
lanes go to the kernel as drawn (``random_words``), which compares them and keeps the mask as bits; a
larger mask is drawn a chunk at a time as the torch path draws it (``keep_mask``) and handed over as
bits. ``LST_CPU_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernels

__all__ = ["LANES", "MAX_KEYS", "LANES_AT_ONCE", "fits", "apply", "lane_order", "from_lane_order"]

#: (batch, head) pairs per vector lane group (the kernel's W)
LANES = 16
#: head dims the kernel is compiled for; without dropout only up to ``NO_DROPOUT_MAX_DIM``
HEAD_DIMS = (4, 8, 16)
NO_DROPOUT_MAX_DIM = 8
#: without dropout SDPA's kernel (which parallelises over query blocks too) is the faster from here,
#: on a causal bias most (session 30, 2 threads: [4, 9, 256, 8] causal 8.4 against 3.5 ms; [16, 9, 56, 8]
#: 1.2 against 1.5 ms; [4, 12, 128, 4] padding 1.1 against 1.3, causal 1.5 against 1.3)
NO_DROPOUT_MAX_KEYS = 64
#: longer rows take torch's path: a group's gathered k, v and gradients grow with the keys, and at
#: 512 keys the kernel was level with SDPA (session 30: 7.6 against 7.55 ms at [2, 12, 512, 4])
MAX_KEYS = 512
#: mask elements whose random lanes (int16: 8 MB) are drawn at once and handed to the kernel; a
#: larger mask is drawn a chunk at a time into bits, bounding that temporary as the torch path does
LANES_AT_ONCE = 4 << 20


def fits(q: Tensor, k: Tensor, bias: Tensor | None, dropout: bool) -> bool:
    """Whether the kernel computes this attention (see the module's docstring)."""
    d = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and q.dim() == 4
            and q.shape[1] == k.shape[1] and d in HEAD_DIMS and k.shape[-2] <= MAX_KEYS
            and (dropout or (d <= NO_DROPOUT_MAX_DIM and k.shape[-2] <= NO_DROPOUT_MAX_KEYS))
            and (bias is None or (bias.dtype == torch.float32 and not bias.requires_grad)))


class _NativeAttention(torch.autograd.Function):
    """Saves q, k, v (the projections' own views), the bias and the mask bits; the backward
    recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, c: float,
                bits: Tensor | None, lanes: Tensor | None, threshold: int) -> Tensor:
        kern = cpu_kernels.kernels()
        if lanes is not None:
            out, bits = kern.forward_lanes(q, k, v, bias, scale, c, lanes, threshold)
        else:
            out = kern.forward(q, k, v, bias, scale, c, bits)
        ctx.save_for_backward(q, k, v, bias, bits)
        ctx.scale, ctx.c, ctx.kernels = scale, c, kern  # the backward runs where the forward ran
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, bits = ctx.saved_tensors
        gq, gk, gv = ctx.kernels.backward(grad_out, q, k, v, bias, ctx.scale, ctx.c, bits)
        return gq, gk, gv, None, None, None, None, None, None


def apply(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, c: float, bits: Tensor | None = None,
          lanes: Tensor | None = None, threshold: int = 0) -> Tensor:
    """softmax(q k^T * scale + bias), dropped out where the mask (lane order: ``bits``, or random
    ``lanes`` below ``threshold``) drops and scaled by c, times v; [B, H, Lq, D] laid out
    [B, Lq, H, D]. ``fits`` must hold."""
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return _NativeAttention.apply(q, k, v, bias, scale, c, bits, lanes, threshold)


def lane_order(mask: Tensor) -> Tensor:
    """A [B, H, Lq, Lk] mask flattened in the kernel's order: (group of ``LANES`` (batch, head) pairs,
    query row, key, lane); the last group holds its own count of lanes."""
    b, h, lq, lk = mask.shape
    flat = mask.reshape(b * h, lq, lk)
    full = (b * h) // LANES * LANES
    parts = [flat[:full].reshape(-1, LANES, lq, lk).permute(0, 2, 3, 1).reshape(-1)]
    if full < b * h:
        parts.append(flat[full:].permute(1, 2, 0).reshape(-1))
    return torch.cat(parts)


def from_lane_order(flat: Tensor, shape: torch.Size) -> Tensor:
    """The [B, H, Lq, Lk] mask whose ``lane_order`` is ``flat`` (the mask a kernel draw means, laid
    out as the torch path's)."""
    where = lane_order(torch.arange(flat.numel()).view(shape))
    return torch.empty_like(flat).index_put_((where,), flat).view(shape)
