"""T5 block (encoder, or decoder with cross-attention) with T5Block's parameter names.

As in the official ``modeling_side_t5.py`` the first side block of a stack owns a
relative-position bias (``has_relative_attention_bias``) and later blocks reuse the bias
it computed (``ctx.shared``).  T5 attention has no 1/sqrt(d) scaling and no biases.

Random init follows the official code, which initialises side blocks with the
*backbone's* T5 init (std from the full d_model / d_kv / d_ff, since its ``_init_weights``
reads the backbone config); the full widths are recovered as side width x r.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from .activations import activation

from .attention import attend, merge_heads, relative_position_bucket, split_heads
from .base import SideBlock
from .context import BlockContext
from .dropout import Dropout
from .norms import RMSNorm
from .plan import AttentionStep, LinearStep, NormStep, Step

__all__ = ["T5Block", "T5Attention", "init_t5"]

_SELF_BIAS = "t5_position_bias"


class T5Attention(nn.Module):
    def __init__(self, c: Any, has_relative_attention_bias: bool = False, is_decoder: bool = False) -> None:
        super().__init__()
        self.heads, self.d_kv = c.num_heads, c.d_kv
        inner = c.num_heads * c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.dropout = float(getattr(c, "lst_attention_dropout", c.dropout_rate))
        self.is_decoder = is_decoder
        self.num_buckets = int(c.relative_attention_num_buckets)
        self.max_distance = int(getattr(c, "relative_attention_max_distance", 128))
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads)

    def compute_bias(self, ctx: BlockContext) -> Tensor:
        pos = ctx.positions
        rel = pos[None, :] - pos[:, None]
        buckets = relative_position_bucket(rel, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> Tensor:
        q = split_heads(self.q(x), self.heads, self.d_kv)
        k = split_heads(self.k(kv), self.heads, self.d_kv)
        v = split_heads(self.v(kv), self.heads, self.d_kv)
        return self.o(merge_heads(attend(q, k, v, bias, 1.0, self.dropout, self.training)))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, c: Any, has_bias: bool, is_decoder: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(c, has_bias, is_decoder)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = Dropout(c.dropout_rate)

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        att = self.SelfAttention
        if att.has_relative_attention_bias:
            ctx.shared[_SELF_BIAS] = att.compute_bias(ctx)
        pb = ctx.shared.get(_SELF_BIAS)
        bias = ctx.bias if pb is None else ctx.bias + pb
        h = self.layer_norm(x)
        return x + self.dropout(att(h, h, bias))


class _CrossAttentionLayer(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(c, False, True)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = Dropout(c.dropout_rate)

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        if ctx.encoder_hidden is None:
            raise ValueError("a T5 decoder side block needs ctx.encoder_hidden (the side encoder's output)")
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), ctx.encoder_hidden, ctx.encoder_bias))


class _DenseActDense(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.gated = bool(getattr(c, "is_gated_act", False))
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.dropout = Dropout(c.dropout_rate)
        self.act = activation(c.dense_act_fn)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class _FFLayer(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.DenseReluDense = _DenseActDense(c)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.dropout = Dropout(c.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


def init_t5(module: nn.Module, c: Any) -> None:
    """Mesh-TF init of HF/official T5, with the widths scaled back up by r (see module doc)."""
    r = int(getattr(c, "lst_reduction_factor", 1))
    f = float(getattr(c, "initializer_factor", 1.0))
    d_model, d_kv, d_ff, heads = c.d_model * r, c.d_kv * r, c.d_ff * r, c.num_heads
    for m in module.modules():
        if isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, _DenseActDense):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(m, name):
                    nn.init.normal_(getattr(m, name).weight, 0.0, f * d_model**-0.5)
            nn.init.normal_(m.wo.weight, 0.0, f * d_ff**-0.5)
        elif isinstance(m, T5Attention):
            nn.init.normal_(m.q.weight, 0.0, f * (d_model * d_kv) ** -0.5)
            nn.init.normal_(m.k.weight, 0.0, f * d_model**-0.5)
            nn.init.normal_(m.v.weight, 0.0, f * d_model**-0.5)
            nn.init.normal_(m.o.weight, 0.0, f * (heads * d_kv) ** -0.5)
            if m.has_relative_attention_bias:
                nn.init.normal_(m.relative_attention_bias.weight, 0.0, f * d_model**-0.5)


class T5Block(SideBlock):
    shared_sources = {
        "layer.0.SelfAttention.relative_attention_bias.weight": "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    }

    def __init__(self, config: Any, *, first: bool = False, layer: int = 1, is_decoder: bool = False) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        mods: list[nn.Module] = [_SelfAttentionLayer(config, first, is_decoder)]
        if is_decoder:
            mods.append(_CrossAttentionLayer(config))
        mods.append(_FFLayer(config))
        self.layer = nn.ModuleList(mods)
        init_t5(self, config)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        h = self.layer[0](hidden, ctx)
        if self.is_decoder:
            h = self.layer[1](h, ctx)
        ff = self.layer[-1]
        return h + ff.dropout(self.feed_forward(lambda x: ff.DenseReluDense(ff.layer_norm(x)), h))

    def pruning_plan(self) -> list[Step]:
        ff = len(self.layer) - 1
        dense = self.layer[-1].DenseReluDense
        wi = ("wi_0", "wi_1") if dense.gated else ("wi",)
        steps: list[Step] = [
            NormStep("layer.0.layer_norm"),
            AttentionStep(q="layer.0.SelfAttention.q", k="layer.0.SelfAttention.k", v="layer.0.SelfAttention.v"),
            LinearStep(("layer.0.SelfAttention.o",), "hidden"),
        ]
        if self.is_decoder:
            steps += [
                NormStep("layer.1.layer_norm"),
                AttentionStep(q="layer.1.EncDecAttention.q", k="layer.1.EncDecAttention.k", v="layer.1.EncDecAttention.v"),
                LinearStep(("layer.1.EncDecAttention.o",), "hidden"),
            ]
        steps += [
            NormStep(f"layer.{ff}.layer_norm"),
            LinearStep(tuple(f"layer.{ff}.DenseReluDense.{n}" for n in wi), "intermediate"),
            LinearStep((f"layer.{ff}.DenseReluDense.wo",), "hidden"),
        ]
        return steps
