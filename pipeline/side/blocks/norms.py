"""Norms of the supported families (LayerNorm, or T5/Llama RMSNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "make_norm"]


class RMSNorm(nn.Module):
    """Scale-only RMS norm, computed in fp32 (T5LayerNorm / LlamaRMSNorm; same ``weight`` name)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; use 'layernorm' or 'rmsnorm'")
