"""BERT / RoBERTa block (post-norm) with BertLayer's parameter names and shapes.

Written here rather than calling ``transformers.BertLayer`` because HF block forwards
change between releases (mask formats, attention back-ends, renamed kwargs); the names
match so pruning slices ``encoder.layer.{i}.*`` straight into it, and a parity test runs
it against a real ``BertModel``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from .activations import activation

from .attention import attend, merge_heads, split_heads
from .base import SideBlock
from .context import BlockContext
from .dropout import Dropout
from .plan import AttentionStep, LinearStep, NormStep, Step

__all__ = ["BertBlock", "init_bert_like"]


class _SelfAttention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        inner = c.hidden_size  # heads * head_dim
        self.query = nn.Linear(c.hidden_size, inner)
        self.key = nn.Linear(c.hidden_size, inner)
        self.value = nn.Linear(c.hidden_size, inner)


class _DenseNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, d_out: int, eps: float, p: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = Dropout(p)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.finish(self.dense(x), residual)

    def finish(self, y: Tensor, residual: Tensor) -> Tensor:
        """LayerNorm(dropout(y) + residual), for a ``y`` computed elsewhere (the recomputed FFN)."""
        return self.LayerNorm(self.dropout(y) + residual)


class _Attention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)


class _Intermediate(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


def init_bert_like(module: nn.Module, std: float) -> None:
    """HF BERT init: N(0, initializer_range) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertBlock(SideBlock):
    def __init__(self, config: Any, *, first: bool = False, layer: int = 1) -> None:
        super().__init__()
        c = config
        self.heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.attn_dropout = float(c.attention_probs_dropout_prob)
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)
        init_bert_like(self, c.initializer_range)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        sa = self.attention.self
        q, k, v = (split_heads(p(hidden), self.heads, self.head_dim) for p in (sa.query, sa.key, sa.value))
        a = attend(q, k, v, ctx.bias, 1.0 / math.sqrt(self.head_dim), self.attn_dropout, self.training)
        a = self.attention.output(merge_heads(a), hidden)
        return self.output.finish(self.feed_forward(lambda x: self.output.dense(self.intermediate(x)), a), a)

    def pruning_plan(self) -> list[Step]:
        return [
            AttentionStep(q="attention.self.query", k="attention.self.key", v="attention.self.value"),
            LinearStep(("attention.output.dense",), "hidden"),
            NormStep("attention.output.LayerNorm"),
            LinearStep(("intermediate.dense",), "intermediate"),
            LinearStep(("output.dense",), "hidden"),
            NormStep("output.LayerNorm"),
        ]
