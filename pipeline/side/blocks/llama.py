"""Llama-style decoder block (RMSNorm, RoPE, grouped-query attention, SwiGLU) with
LlamaDecoderLayer's names.  Also Mistral and Qwen2 (Qwen2: biases on q/k/v only).

RoPE is recomputed from positions 0..L-1 (right padding) at the side head dim with the
backbone's theta; 'default' RoPE only: scaled variants (llama3, yarn) change the
frequencies, which a side network trained from scratch at width head_dim/r need not copy.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from .activations import activation

from .attention import apply_rotary, attend, merge_heads, rotary_cos_sin, split_heads
from .base import SideBlock
from .bert import init_bert_like
from .context import BlockContext
from .dropout import Dropout
from .norms import RMSNorm
from .plan import AttentionStep, LinearStep, NormStep, Step

__all__ = ["LlamaBlock", "rope_theta"]


def rope_theta(c: Any) -> float:
    params = getattr(c, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(c, "rope_theta", 10000.0))


class _Attention(nn.Module):
    def __init__(self, c: Any, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        hd = c.head_dim
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=o_bias)


class _MLP(nn.Module):
    def __init__(self, c: Any, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=bias)
        self.act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(SideBlock):
    def __init__(self, config: Any, *, first: bool = False, layer: int = 1) -> None:
        super().__init__()
        c = config
        if c.model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(getattr(c, "attention_bias", False))
            mlp_bias = bool(getattr(c, "mlp_bias", False))
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = c.head_dim
        self.theta = rope_theta(c)
        self.attn_dropout = float(getattr(c, "attention_dropout", 0.0))
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c, mlp_bias)
        self.dropout = Dropout(float(getattr(c, "lst_hidden_dropout", 0.0)))
        init_bert_like(self, c.initializer_range)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        key = f"rope_{self.head_dim}_{self.theta}"
        if key not in ctx.shared:
            ctx.shared[key] = rotary_cos_sin(ctx.positions, self.head_dim, self.theta, hidden.dtype)
        cos, sin = ctx.shared[key]
        sa = self.self_attn
        h = self.input_layernorm(hidden)
        q = apply_rotary(split_heads(sa.q_proj(h), self.heads, self.head_dim), cos, sin)
        k = apply_rotary(split_heads(sa.k_proj(h), self.kv_heads, self.head_dim), cos, sin)
        v = split_heads(sa.v_proj(h), self.kv_heads, self.head_dim)
        a = attend(q, k, v, ctx.bias, 1.0 / math.sqrt(self.head_dim), self.attn_dropout, self.training)
        hidden = hidden + self.dropout(sa.o_proj(merge_heads(a)))
        return hidden + self.dropout(self.feed_forward(lambda x: self.mlp(self.post_attention_layernorm(x)), hidden))

    def pruning_plan(self) -> list[Step]:
        return [
            NormStep("input_layernorm"),
            AttentionStep(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", rotary=True),
            LinearStep(("self_attn.o_proj",), "hidden"),
            NormStep("post_attention_layernorm"),
            LinearStep(("mlp.gate_proj", "mlp.up_proj"), "intermediate"),
            LinearStep(("mlp.down_proj",), "hidden"),
        ]
