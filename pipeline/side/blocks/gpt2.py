"""GPT-2 block (pre-norm, causal) with GPT2Block's names; Conv1D weights are [in, out].

Positions are absolute and live in the embeddings, so the block needs none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from .activations import activation

from .attention import attend, merge_heads, split_heads
from .base import SideBlock
from .context import BlockContext
from .dropout import Dropout
from .plan import AttentionStep, LinearStep, NormStep, Step

__all__ = ["GPT2Block", "Conv1D"]


class Conv1D(nn.Module):
    """y = x @ W + b with W of shape [in, out] (HF's GPT-2 ``Conv1D``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _Attention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.c_attn = Conv1D(3 * c.n_embd, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, c.n_embd)
        self.resid_dropout = Dropout(c.resid_pdrop)


class _MLP(nn.Module):
    def __init__(self, c: Any, ff: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(ff, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, ff)
        self.act = activation(c.activation_function)
        self.dropout = Dropout(c.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.core(x))

    def core(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(SideBlock):
    def __init__(self, config: Any, *, first: bool = False, layer: int = 1) -> None:
        super().__init__()
        c = config
        d = c.n_embd
        ff = c.n_inner if c.n_inner is not None else 4 * d
        self.heads, self.head_dim = c.n_head, d // c.n_head
        self.attn_dropout = float(c.attn_pdrop)
        scale = 1.0 / math.sqrt(self.head_dim) if c.scale_attn_weights else 1.0
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer)  # HF: layer_idx + 1, and ``layer`` is 1-based
        self.scale = scale
        self.ln_1 = nn.LayerNorm(d, eps=c.layer_norm_epsilon)
        self.attn = _Attention(c)
        self.ln_2 = nn.LayerNorm(d, eps=c.layer_norm_epsilon)
        self.mlp = _MLP(c, ff)
        std = c.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled residual init
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * c.n_layer))
            elif name.endswith(("c_attn.weight", "c_fc.weight")):
                nn.init.normal_(p, 0.0, std)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        h = self.ln_1(hidden)
        q, k, v = self.attn.c_attn(h).split(h.shape[-1], dim=2)
        q, k, v = (split_heads(t, self.heads, self.head_dim) for t in (q, k, v))
        a = attend(q, k, v, ctx.bias, self.scale, self.attn_dropout, self.training)
        hidden = hidden + self.attn.resid_dropout(self.attn.c_proj(merge_heads(a)))
        return hidden + self.mlp.dropout(self.feed_forward(lambda x: self.mlp.core(self.ln_2(x)), hidden))

    def pruning_plan(self) -> list[Step]:
        return [
            NormStep("ln_1"),
            AttentionStep(fused="attn.c_attn", transposed=True),
            LinearStep(("attn.c_proj",), "hidden", transposed=True),
            NormStep("ln_2"),
            LinearStep(("mlp.c_fc",), "intermediate", transposed=True),
            LinearStep(("mlp.c_proj",), "hidden", transposed=True),
        ]
