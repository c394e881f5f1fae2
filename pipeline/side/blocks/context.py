"""What every side block needs besides its hidden state, built once per forward.

The side network never sees the backbone, so the masks and positions the backbone's
blocks would receive are rebuilt here from the attention mask alone (right padding:
real tokens sit at positions 0..n-1).  ``shared`` carries per-forward values that the
first block computes and later blocks reuse (T5/MPNet relative-position bias), as the
HF stacks pass ``position_bias`` from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockContext", "make_context", "mask_bias"]


@dataclass
class BlockContext:
    mask: Tensor  # [B, L] bool, True = real token
    bias: Tensor  # [B, 1, L, L] additive: 0 = may attend, finfo.min = may not
    positions: Tensor  # [L] int64
    causal: bool
    shared: dict[str, Any] = field(default_factory=dict)
    encoder_hidden: Tensor | None = None  # T5 decoder blocks: the side encoder's output
    encoder_bias: Tensor | None = None  # [B, 1, 1, L_enc] additive


def mask_bias(mask: Tensor, dtype: torch.dtype, causal: bool, query_len: int | None = None) -> Tensor:
    """Additive attention bias from a [B, L_k] key mask (and causality).

    Uses ``torch.where`` rather than adding two masks, so a position masked twice gets
    finfo.min and not -inf (an all -inf row would turn into NaN in softmax). Without causality the
    rows are one [B, 1, 1, L_k] row expanded (the CPU attention kernel then reads one row per example).
    """
    b, lk = mask.shape
    lq = lk if query_len is None else query_len
    allowed = mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    if not causal:  # every query row is the same: one row per example, expanded (a view)
        return torch.where(allowed, zero, neg).expand(b, 1, lq, lk)
    tri = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    return torch.where(allowed.expand(b, 1, lq, lk) & tri, zero, neg)


def make_context(attention_mask: Tensor, causal: bool, dtype: torch.dtype = torch.float32) -> BlockContext:
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    return BlockContext(mask=mask, bias=mask_bias(mask, dtype, causal), positions=positions, causal=causal)
