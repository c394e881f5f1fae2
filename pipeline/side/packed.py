"""Packed taps: a batch's real token rows without the padding.

A cached batch of short sentences is mostly padding (SST-2 at batch 100: ~13 real tokens an
example, padded to the longest, ~50), and a padded fp32 batch of every tap was the largest object
of a cached step (7 MiniLM taps: ~54 MB). The reader hands out the real rows only, in the store's
dtype ([N, d], N = real tokens), with their flat positions in the padded [B, L] grid. The side
network applies each ladder (a per-token linear map) to the N rows and scatters the d/r-wide result
into the padded grid, filling the padding rows with the ladder's bias, which is exactly what the
ladder gives on the zero rows a padded batch carries there. So the side states, the loss and every
gradient equal those of the padded batch, at a fraction of the memory and of the ladder FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks.dropout import drop_mask, normal

__all__ = ["PackedTap", "apply_ladder", "packed_dropout", "tap_noise"]


@dataclass
class PackedTap:
    """Rows ``values`` [N, d] of a padded [B, L, d] tap; ``rows`` [N] are their flat indices b*L + t.

    ``scale`` [N] (float32; int8 caches): each row's value is ``values[i] * scale[i]``, the codes
    handed out as stored. Why not scaled as they are gathered: that fp32 copy was 4x the codes' bytes,
    and scaled rows could be neither views of their window nor laid out in batch order as they decode,
    as every other packed batch is; while the ladder, the only consumer, is linear per row:
    ``W (s q) + b = s (W q) + b``, and tap dropout and tap noise are elementwise, so they commute with
    ``s``. The scale is applied to the ladder's d/r-wide output. (On MiniLM SST-2 int8, session 40: dev
    scores equal to 4 decimals; the epoch's time and stall unchanged within the machine's noise.)"""

    values: Tensor
    rows: Tensor
    batch: int
    length: int
    scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.batch, self.length, int(self.values.shape[-1]))

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' values and pending scales, in the dtype they were handed out in."""
        return self.values.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    def to(self, *args, **kwargs) -> "PackedTap":
        """Move or cast like a tensor (a dtype applies to the values, the scale staying pending; a
        device to all three)."""
        values = self.values.to(*args, **kwargs)
        rows = self.rows.to(values.device) if values.device != self.rows.device else self.rows
        scale = self.scale
        if scale is not None and scale.device != values.device:
            scale = scale.to(values.device, non_blocking=kwargs.get("non_blocking", False))
        return PackedTap(values, rows, self.batch, self.length, scale)

    def with_values(self, values: Tensor) -> "PackedTap":
        """The same rows (and pending scale) holding ``values``."""
        return PackedTap(values, self.rows, self.batch, self.length, self.scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The rows' values [N, d] in ``dtype``, the scale applied."""
        v = self.values.to(dtype)
        return v if self.scale is None else v * self.scale.to(dtype).unsqueeze(1)

    def padded(self, dtype: torch.dtype | None = None) -> Tensor:
        """The zero-padded [B, L, d] tensor (for consumers that need the grid), the scale applied."""
        v = self.values if dtype is None and self.scale is None else self.dequantized(dtype or torch.float32)
        out = v.new_zeros((self.batch * self.length, v.shape[-1]))
        out.index_copy_(0, self.rows, v)
        return out.view(self.batch, self.length, -1)


class _RowsLinear(torch.autograd.Function):
    """``x.to(w.dtype) @ w.T + b`` for a tap that needs no gradient, saving ``x`` as it came (the
    batch's own bf16/fp32 rows or int8 codes, already held) instead of the widened copy ``F.linear``
    would keep for the weight gradient: on MiniLM at 6,600 tokens that copy was 68 MB of the step's
    246 MB. ``scale`` [N] (int8 codes): ``(x.to(w.dtype) @ w.T) * scale + b``, whose weight gradient is
    ``(grad * scale).T @ x``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, scale: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, scale)
        ctx.has_bias = b is not None
        ctx.w_dtype = w.dtype
        if scale is None:
            return nn.functional.linear(x.to(w.dtype), w, b)
        y = nn.functional.linear(x.to(w.dtype), w).mul_(scale.to(w.dtype).unsqueeze(1))
        return y if b is None else y.add_(b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            g = grad if scale is None else grad * scale.to(grad.dtype).unsqueeze(1)
            grad_w = weight_grad(g, x, ctx.w_dtype)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None, grad_w, grad_b, None


#: a wide tap's weight gradient goes in blocks of this many input columns (``weight_grad``)
GRAD_COLUMNS = 512


def weight_grad(grad: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad.T @ x`` in ``dtype``. A tap wider than ``GRAD_COLUMNS`` that needs widening goes a block
    of columns at a time, each widened on its own: the whole [rows, d] fp32 copy came at the end of
    the backward, where every other gradient is already held (on the 7B shape, 4 MB a 256-token batch
    at the step's peak). Each output element is still one dot product over the same rows, and the
    blocks measured equal to the whole product bit for bit (MKL, 37-3,000 rows, d 768 and 4,096)."""
    if x.dtype == dtype or x.shape[1] <= GRAD_COLUMNS:
        return grad.t().mm(x.to(dtype))
    out = grad.new_empty((grad.shape[1], x.shape[1]), dtype=dtype)
    gt = grad.t()
    for c in range(0, x.shape[1], GRAD_COLUMNS):
        torch.mm(gt, x[:, c:c + GRAD_COLUMNS].to(dtype), out=out[:, c:c + GRAD_COLUMNS])
    return out


def apply_ladder(ladder: nn.Linear, tap: Tensor | PackedTap, dtype: torch.dtype) -> Tensor:
    """``ladder(tap)`` as [B, L, d_out] for a padded or a packed tap (same values either way)."""
    if not isinstance(tap, PackedTap):
        return ladder(tap.to(dtype))
    x = tap.values
    if x.requires_grad or ladder.weight.dtype != dtype:
        y = ladder(tap.dequantized(dtype))
    else:
        y = _RowsLinear.apply(x, ladder.weight, ladder.bias, tap.scale)
    bias = ladder.bias if ladder.bias is not None else y.new_zeros(y.shape[-1])
    full = bias.to(y.dtype).expand(tap.batch * tap.length, y.shape[-1]).index_copy(0, tap.rows, y)
    return full.view(tap.batch, tap.length, -1)


def packed_dropout(tap: PackedTap, p: float, training: bool, dtype: torch.dtype) -> PackedTap:
    """Dropout on the real rows with the mask a padded [B, L, d] tap would draw (same generator
    calls, so the same masks, and a resumed run the same stream); padding rows are zero either way."""
    v = tap.values.to(dtype)
    if not training or p == 0.0:
        return tap.with_values(v)
    if v.device.type != "cpu":
        return tap.with_values(nn.functional.dropout(v, p, True))
    drop = drop_mask((tap.batch * tap.length, v.shape[-1]), p, v).index_select(0, tap.rows)
    return tap.with_values((v * (1.0 / (1.0 - p))).masked_fill_(drop, 0.0))


def tap_noise(tap: Tensor | PackedTap, sigma: float, dtype: torch.dtype) -> Tensor | PackedTap:
    """``tap * (1 + sigma * N(0, 1))`` in ``dtype``: a stand-in, at training time, for the fresh dropout
    draw a live backbone gives each step (a cache holds one eval-mode pass). A packed tap takes the
    draws a padded one would at its rows (one [B*L, d] draw, as ``packed_dropout``), so packed and
    padded runs stay equal number for number."""
    if isinstance(tap, PackedTap):
        v = tap.values.to(dtype)
        eps = normal((tap.batch * tap.length, v.shape[-1]), v).index_select(0, tap.rows)
        return tap.with_values(v * eps.mul_(sigma).add_(1.0))
    v = tap.to(dtype)
    return v * normal(v.shape, v).mul_(sigma).add_(1.0)
