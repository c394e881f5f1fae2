"""Attention arithmetic shared by the family blocks (heads, SDPA, position encodings)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import dropout as _dropout

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
    dropout mask (``blocks.dropout``) is faster there. Everywhere else SDPA's own kernels run."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if bias is not None:
        bias = bias.to(q.dtype)
    if training and dropout > 0 and q.device.type == "cpu":
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        return torch.matmul(_dropout(scores.softmax(-1), dropout), v)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout if training else 0.0, scale=scale
    )


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
