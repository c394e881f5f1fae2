"""MPNet block with MPNetLayer's parameter names, plus the relative-position bias.

HF keeps MPNet's ``relative_attention_bias`` on the encoder and passes the computed bias
to every layer.  Here the first side block owns it (as the official LST code does for
T5) and leaves the bias in ``ctx.shared`` for the later blocks; pruning init copies the
backbone's ``encoder.relative_attention_bias`` into it ([buckets, heads] does not shrink).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .attention import attend, merge_heads, relative_position_bucket, split_heads
from .base import SideBlock
from .bert import _DenseNorm, _Intermediate, init_bert_like
from .context import BlockContext
from .dropout import Dropout
from .plan import AttentionStep, LinearStep, NormStep, Step

__all__ = ["MPNetBlock"]

_BIAS_KEY = "mpnet_position_bias"


class _SelfAttention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        d = c.hidden_size
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _Attention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.attn = _SelfAttention(c)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)


class MPNetBlock(SideBlock):
    shared_sources = {"relative_attention_bias.weight": "relative_attention_bias.weight"}

    def __init__(self, config: Any, *, first: bool = False, layer: int = 1) -> None:
        super().__init__()
        c = config
        self.heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.attn_dropout = float(c.attention_probs_dropout_prob)
        self.num_buckets = int(c.relative_attention_num_buckets)
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)
        self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads) if first else None
        init_bert_like(self, c.initializer_range)

    def _position_bias(self, ctx: BlockContext) -> Tensor | None:
        if self.relative_attention_bias is not None:
            pos = ctx.positions
            rel = pos[None, :] - pos[:, None]  # key - query
            # MPNetEncoder.compute_position_bias buckets with 32 buckets, max distance 128.
            buckets = relative_position_bucket(rel, True, 32, 128)
            ctx.shared[_BIAS_KEY] = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        return ctx.shared.get(_BIAS_KEY)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        at = self.attention.attn
        q, k, v = (split_heads(p(hidden), self.heads, self.head_dim) for p in (at.q, at.k, at.v))
        pb = self._position_bias(ctx)
        bias = ctx.bias if pb is None else ctx.bias + pb
        a = attend(q, k, v, bias, 1.0 / math.sqrt(self.head_dim), self.attn_dropout, self.training)
        a = self.attention.LayerNorm(self.attention.dropout(at.o(merge_heads(a))) + hidden)
        return self.output.finish(self.feed_forward(lambda x: self.output.dense(self.intermediate(x)), a), a)

    def pruning_plan(self) -> list[Step]:
        return [
            AttentionStep(q="attention.attn.q", k="attention.attn.k", v="attention.attn.v"),
            LinearStep(("attention.attn.o",), "hidden"),
            NormStep("attention.LayerNorm"),
            LinearStep(("intermediate.dense",), "intermediate"),
            LinearStep(("output.dense",), "hidden"),
            NormStep("output.LayerNorm"),
        ]
