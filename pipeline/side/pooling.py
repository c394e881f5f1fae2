"""Pool token states [B, L, d] to one vector per example, respecting right padding."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pool"]


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """'cls': first token; 'mean': mean over real tokens; 'last': last real token
    (the decoder-only default: with causal attention it is the only token that saw the
    whole input)."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        total = (hidden * mask.unsqueeze(-1)).sum(1)
        return total / mask.sum(1, keepdim=True).clamp_min(1.0)
    if mode == "last":
        last = (attention_mask.long().sum(1) - 1).clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; use 'cls', 'mean' or 'last'")
