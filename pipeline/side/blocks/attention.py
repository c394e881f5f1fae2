"""Attention arithmetic shared by the family blocks (heads, SDPA, position encodings)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels, native_attention
from .dropout import lane_mask, mask_threshold, random_words

__all__ = ["split_heads", "merge_heads", "attend", "relative_position_bucket", "rotary_cos_sin", "apply_rotary"]


def split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """[B, L, H*hd] -> [B, H, L, hd]"""
    b, n, _ = x.shape
    return x.view(b, n, heads, head_dim).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, hd] -> [B, L, H*hd]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, dropout: float, training: bool) -> Tensor:
    """softmax(q k^T * scale + bias) v; k/v heads are repeated for grouped-query attention.

    With attention dropout on CPU, SDPA falls back to its math path (plus a fully-masked-row check)
    and draws the mask with ``bernoulli_``; the same arithmetic written out with the cheaper CPU
    dropout mask (``blocks.dropout``) is faster there. On CPU rows of fewer than ``SMALL_SOFTMAX``
    keys take the written-out arithmetic too, dropout or not (SDPA's softmax is a scalar loop there).
    Small heads on CPU (``native_attention.fits``) take the C++ kernel before either, where it is
    built. Everywhere else SDPA's own kernels run."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if bias is not None:
        bias = bias.to(q.dtype)
    drops = training and dropout > 0
    shape = q.shape[:-1] + (k.shape[-2],)  # the scores' (and a dropout mask's)
    c = 1.0 / (1.0 - dropout) if drops else 1.0
    if native_attention.fits(q, k, bias, drops) and cpu_kernels.kernels() is not None:
        if not drops:
            return native_attention.apply(q, k, v, bias, scale, c)
        # the same draws as the torch path's mask, read in the kernel's lane order
        if math.prod(shape) <= native_attention.LANES_AT_ONCE:
            return native_attention.apply(q, k, v, bias, scale, c, lanes=random_words(math.prod(shape), q),
                                          threshold=mask_threshold(dropout))
        return native_attention.apply(q, k, v, bias, scale, c, bits=_pack_bits(keep_mask(shape, dropout, q)))
    if q.device.type == "cpu" and drops:
        return _DropoutAttention.apply(q, k, v, bias, scale, c, keep_mask(shape, dropout, q))
    if q.device.type == "cpu" and k.shape[-2] < SMALL_SOFTMAX:
        return _DropoutAttention.apply(q, k, v, bias, scale, 1.0, None)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout if training else 0.0, scale=scale
    )


#: scores one step of ``_DropoutAttention`` computes at a time (fp32: 4 MB per [b, H, L, L] tensor)
CHUNK_SCORES = 1 << 20

#: a long example (one example's heads over ``CHUNK_SCORES``) goes in groups of heads of at most
#: ``CHUNK_SCORES // HEAD_CHUNK_DIVISOR`` scores: its backward holds four to five chunk-sized
#: temporaries, 16-20 MB at a whole chunk, and such chunks are large enough that more of them cost
#: no measurable time. Whole short examples keep ``CHUNK_SCORES`` (smaller batch slices would
#: multiply a MiniLM step's small attention calls).
HEAD_CHUNK_DIVISOR = 4

#: rows shorter than this take the written-out softmax. torch's CPU softmax kernels (forward,
#: backward, and inside SDPA) vectorise along the row and fall back to a scalar loop for rows
#: shorter than one AVX-512 vector: on the 2-core box at [100, 12, L, L], L = 15, softmax took 4.6 ms
#: against 0.8 ms written out (max, exp, sum, divide: each op vectorised over all rows), and its
#: backward 1.9 ms against 0.45; from 16 up torch's kernels are the faster ones. By-length batches
#: of short sentences (SST-2: ~13 tokens) are mostly that short.
SMALL_SOFTMAX = 16


def softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dimension, in place (the faster of torch's kernel and the written-out
    arithmetic for this row length; they agree to a few ulp)."""
    if x.shape[-1] >= SMALL_SOFTMAX:
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def softmax_backward(grad: Tensor, probs: Tensor) -> Tensor:
    """d(softmax)/d(scores) applied to ``grad``: probs * (grad - sum(grad * probs)), as
    ``softmax_``: torch's kernel from ``SMALL_SOFTMAX`` up, written out below it."""
    if probs.shape[-1] >= SMALL_SOFTMAX:
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype)
    return (grad - (grad * probs).sum(-1, keepdim=True)).mul_(probs)


def keep_mask(shape: torch.Size, p: float, like: Tensor) -> Tensor:
    """``~drop_mask(shape, p)`` as blocks.dropout draws it, but ``CHUNK_SCORES`` lanes at a time (an even
    count: two lanes a draw): the CPU generator hands out its numbers in order, so the mask is the
    same, and the random lanes never exist for the whole [B, H, L, L] at once (2x the bool mask: 64 MB
    for one example of 32 heads at 1,024 tokens, drawn again when a recomputed block reruns)."""
    keep = torch.empty(shape, dtype=torch.bool, device=like.device)
    flat = keep.view(-1)
    step = max(2, CHUNK_SCORES - CHUNK_SCORES % 2)
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        lane_mask(n, p, like, keep=True, out=flat[i:i + n])
    return keep


def _pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bits, 8 to a byte, lowest bit first (the shape is kept by the caller).
    numpy's packbits: 40x faster than the same bits from torch shifts and a sum (0.04 ms against 1.7
    ms for a [100, 12, 32, 32] mask on the 2-core box), and this Function runs on CPU only."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))


def _unpack_bits(bits: Tensor, shape: torch.Size) -> Tensor:
    flat = np.unpackbits(bits.numpy(), count=math.prod(shape), bitorder="little")
    return torch.from_numpy(flat.view(np.bool_)).view(shape)


def _scaled_keep(keep: Tensor, c: float, dtype: torch.dtype) -> Tensor:
    """``keep`` as c (kept) or 0 (dropped) in ``dtype``, so dropout is one vectorised multiply: on the
    2-core box at [100, 12, 32, 32], 0.5 ms to build plus 0.4 ms to multiply, against 2.1 ms for
    ``masked_fill_`` (and 1.1 ms for a multiply by the bool mask, which converts it element by
    element). ``x * c`` rounds the same either way, since ``1.0 * c`` is exactly ``c``."""
    return keep.view(torch.uint8).to(dtype).mul_(c)


def _batch_chunks(q: Tensor, k: Tensor) -> list[tuple[slice, slice]]:
    """(batch, head) slices holding about ``CHUNK_SCORES`` attention scores each: whole examples
    while one example's heads fit, else one example at a time in groups of heads of at most a
    ``HEAD_CHUNK_DIVISOR``-th of that (long sequences: at 32 heads and 1,024 tokens one example alone
    has 32 M scores, 128 MB per fp32 tensor)."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    everything = slice(None)
    if H * Lq * Lk <= CHUNK_SCORES:
        step = max(1, CHUNK_SCORES // max(1, H * Lq * Lk))
        return [(slice(i, min(B, i + step)), everything) for i in range(0, B, step)]
    step = max(1, CHUNK_SCORES // HEAD_CHUNK_DIVISOR // max(1, Lq * Lk))
    return [(slice(i, i + 1), slice(h, min(H, h + step))) for i in range(B) for h in range(0, H, step)]


def _rows(t: Tensor | None, s: tuple[slice, slice]) -> Tensor | None:
    """The part of ``t`` (a bias or its gradient, [B or 1, H or 1, ., .]) for chunk ``s``; a dimension
    of 1 is shared by every chunk and kept as is (e.g. a position bias shared by the batch)."""
    if t is None:
        return None
    b, h = s
    if t.shape[0] > 1:
        t = t[b]
    return t[:, h] if t.shape[1] > 1 else t


def _head_major_empty(like: Tensor, last: int) -> Tensor:
    """An empty [B, H, L, last] tensor stored as [B, L, H, last] (a transposed view): the layout
    ``split_heads`` reads and ``merge_heads`` writes, so neither has to copy it."""
    b, h, n, _ = like.shape
    return like.new_empty(b, n, h, last).transpose(1, 2)


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias), dropped out with ``keep`` and scaled by ``c``, times v
    (``keep`` None: no dropout, ``c`` unused).

    Autograd on the written-out arithmetic keeps three [B, H, L, L] tensors per layer for the
    backward (the probabilities in fp32, the dropped probabilities in fp32 and the bool mask): on a
    MiniLM side network at batch 100 that was most of a step's memory. Here only the mask is kept,
    as bits (1/32 of the fp32 probabilities: 3.7 MB instead of 30 MB for the bool mask at 100 x 66
    tokens), and the probabilities are recomputed in the backward, the way fused attention kernels do;
    the forward arithmetic is the same, and the backward is the same formulas (``softmax_backward``),
    so values match the written-out version to float rounding.

    Both passes run over slices of the batch (and of the heads, for long sequences) of about
    ``CHUNK_SCORES`` scores each, so their temporaries (scores, probabilities, dropped probabilities
    and their gradients: four to five [B, H, L, L] tensors at once, ~75 MB at 100 x 62 tokens) are
    bounded by the slice, not the batch or the sequence length; every head's arithmetic is unchanged
    (the mask is still drawn for the whole batch, in one call).
    """

    @staticmethod
    def _probs(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
        # in place: each [b, H, L, L] temporary not allocated is one not mapped and zero-filled again
        # under lst's 128 KiB mmap threshold (the out= softmax reads each row before writing it)
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            scores.add_(bias)
        return softmax_(scores)

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, c: float,
                keep: Tensor) -> Tensor:
        # q, k, v arrive as head views of [B, L, H*hd] projections; every matmul below would copy
        # them into [B*H, L, hd] again (a strided copy of 16-byte rows at hd 4), so copy once, here,
        # and keep the copies for the backward. The output is laid out [B, L, H, hd], so that
        # ``merge_heads`` of it is a view.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = _head_major_empty(q, v.shape[-1])
        for s in _batch_chunks(q, k):
            probs = _DropoutAttention._probs(q[s], k[s], _rows(bias, s), scale)
            if keep is not None:  # probs * c where kept, +0 where dropped (probabilities are >= 0)
                probs = probs.mul_(_scaled_keep(keep[s], c, probs.dtype))
            out[s] = torch.matmul(probs, v[s])
        ctx.save_for_backward(q, k, v, bias, _pack_bits(keep) if keep is not None else None)
        ctx.scale, ctx.c, ctx.keep_shape = scale, c, keep.shape if keep is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, bits = ctx.saved_tensors
        keep = _unpack_bits(bits, ctx.keep_shape) if bits is not None else None
        grad_out = grad_out.contiguous()  # used by two matmuls per chunk: copied once, not twice
        # laid out [B, L, H, hd] as the projections are, so the head views' backward is a view too
        grad_q, grad_k, grad_v = (_head_major_empty(t, t.shape[-1]) for t in (q, k, v))
        want_bias = bias is not None and ctx.needs_input_grad[3]
        grad_bias = torch.zeros_like(bias) if want_bias else None
        for s in _batch_chunks(q, k):
            qs, ks, vs, go = q[s], k[s], v[s], grad_out[s]
            kp = keep[s] if keep is not None else None
            probs = _DropoutAttention._probs(qs, ks, _rows(bias, s), ctx.scale)
            grad_probs = torch.matmul(go, vs.transpose(-1, -2))
            if kp is None:
                grad_v[s] = torch.matmul(probs.transpose(-1, -2), go)
            else:
                scaled = _scaled_keep(kp, ctx.c, probs.dtype)
                grad_probs.mul_(scaled)  # a dropped gradient becomes -0 or +0: equal as numbers
                grad_v[s] = torch.matmul(scaled.mul_(probs).transpose(-1, -2), go)  # the dropped probs
                del scaled
            grad_scores = softmax_backward(grad_probs, probs)
            del grad_probs, probs
            grad_q[s] = torch.matmul(grad_scores, ks).mul_(ctx.scale)
            grad_k[s] = torch.matmul(grad_scores.transpose(-1, -2), qs).mul_(ctx.scale)
            if want_bias:
                rows = _rows(grad_bias, s)
                rows += grad_scores.sum_to_size(rows.shape)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucketing of (key - query) offsets (MPNet uses the same with bidirectional=True)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


def rotary_cos_sin(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Default RoPE tables [L, dim] (HF 'default' rope: inv_freq = theta^(-2i/dim))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
