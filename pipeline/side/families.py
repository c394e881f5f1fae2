"""Backbone families: the facts about a HF config the side network depends on.

One ``Family`` per block architecture (BERT-like post-norm encoders, MPNet, the T5 encoder,
GPT-2, Llama-like decoders).  It says how wide the backbone is (``backbone_dims``), how to
shrink its HF config by r (``reduced_config``, the config the side blocks are built from),
whether attention is causal, which norm it uses, and where its block weights live in a
HF ``state_dict`` (for pruning-based initialisation).  Everything else in ``pipeline.side``
asks this module instead of switching on ``model_type`` itself.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Dims", "Family", "FAMILIES", "family_for", "backbone_dims", "reduced_config", "valid_reductions"]


@dataclass(frozen=True)
class Dims:
    """Widths of a transformer stack (backbone or side)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    norm_eps: float

    def reduced(self, r: int, heads: int | None = None) -> "Dims":
        """The side network's widths: hidden, FFN and per-head dim divided by r; heads kept (the
        paper), or ``heads`` heads sharing the same attention width (heads x head dim = inner / r)."""
        if heads is None or heads == self.heads:
            return Dims(self.hidden // r, self.intermediate // r, self.heads, self.kv_heads, self.head_dim // r,
                        self.layers, self.norm_eps)
        inner = self.heads * self.head_dim // r
        if heads < 1 or inner % heads:
            raise ValueError(f"side_heads={heads} must divide the side attention width {inner} "
                             f"(backbone {self.heads} heads x {self.head_dim} / r={r})")
        if self.kv_heads != self.heads:
            raise ValueError(f"side_heads needs multi-head attention; this backbone groups {self.heads} query heads "
                             f"over {self.kv_heads} key/value heads: leave side_heads unset")
        return Dims(self.hidden // r, self.intermediate // r, heads, heads, inner // heads, self.layers,
                    self.norm_eps)


@dataclass(frozen=True)
class Family:
    """How one backbone architecture maps onto the side network.

    State-dict keys: block i (0-based, as HF numbers it) lives at
    ``root + stack + layer_template.format(i=i)``; ``embedding_keys`` and
    ``final_norm_prefix`` are relative to ``root``.  The root prefix (``''``, ``bert.``,
    ``model.``, ``transformer.`` ...) is found from the keys at init time.
    """

    name: str
    model_types: tuple[str, ...]
    causal: bool
    norm: str  # 'layernorm' | 'rmsnorm'
    default_pooling: str
    stack: str
    layer_template: str
    embedding_keys: tuple[str, ...]
    final_norm_prefix: str | None
    dims: Callable[[Any], Dims]
    shrink: Callable[[Any, Dims, float, float], None]  # sets the side widths/dropouts on a config copy


# -- per-family dims and shrinking -----------------------------------------------------------
def _bert_dims(c: Any) -> Dims:
    return Dims(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_attention_heads,
                c.hidden_size // c.num_attention_heads, c.num_hidden_layers, float(c.layer_norm_eps))


def _bert_shrink(c: Any, side: Dims, p: float, pa: float) -> None:
    c.hidden_size, c.intermediate_size, c.num_attention_heads = side.hidden, side.intermediate, side.heads
    c.hidden_dropout_prob, c.attention_probs_dropout_prob = p, pa


def _t5_dims(c: Any) -> Dims:
    return Dims(c.d_model, c.d_ff, c.num_heads, c.num_heads, c.d_kv, c.num_layers, float(c.layer_norm_epsilon))


def _t5_shrink(c: Any, side: Dims, p: float, pa: float) -> None:
    # As the official modeling_side_t5.py: d_model, d_ff and d_kv all divided by r.
    c.d_model, c.d_ff, c.d_kv, c.num_heads = side.hidden, side.intermediate, side.head_dim, side.heads
    c.dropout_rate = p
    c.lst_attention_dropout = pa


def _gpt2_dims(c: Any) -> Dims:
    ff = c.n_inner if c.n_inner is not None else 4 * c.n_embd
    return Dims(c.n_embd, ff, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_layer, float(c.layer_norm_epsilon))


def _gpt2_shrink(c: Any, side: Dims, p: float, pa: float) -> None:
    c.n_embd, c.n_inner, c.n_head = side.hidden, side.intermediate, side.heads
    c.resid_pdrop = c.embd_pdrop = p
    c.attn_pdrop = pa


def _llama_dims(c: Any) -> Dims:
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    return Dims(c.hidden_size, c.intermediate_size, heads, kv, hd, c.num_hidden_layers, float(c.rms_norm_eps))


def _llama_shrink(c: Any, side: Dims, p: float, pa: float) -> None:
    c.hidden_size, c.intermediate_size, c.head_dim = side.hidden, side.intermediate, side.head_dim
    c.num_attention_heads, c.num_key_value_heads = side.heads, side.kv_heads
    c.attention_dropout = pa
    c.lst_hidden_dropout = p  # Llama blocks have no residual dropout; the side block adds one


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert"), False, "layernorm", "cls",
           "encoder.", "layer.{i}.", ("embeddings.word_embeddings.weight",), None, _bert_dims, _bert_shrink),
    Family("mpnet", ("mpnet",), False, "layernorm", "cls",
           "encoder.", "layer.{i}.", ("embeddings.word_embeddings.weight",), None, _bert_dims, _bert_shrink),
    Family("t5", ("t5", "mt5"), False, "rmsnorm", "mean",
           "encoder.", "block.{i}.", ("shared.weight", "encoder.embed_tokens.weight"), "encoder.final_layer_norm.",
           _t5_dims, _t5_shrink),
    Family("gpt2", ("gpt2",), True, "layernorm", "last",
           "", "h.{i}.", ("wte.weight",), "ln_f.", _gpt2_dims, _gpt2_shrink),
    Family("llama", ("llama", "mistral", "qwen2"), True, "rmsnorm", "last",
           "", "layers.{i}.", ("embed_tokens.weight",), "norm.", _llama_dims, _llama_shrink),
)


def family_for(config: Any) -> Family:
    """The Family of a HF config, or a ValueError naming the supported model types."""
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"no side-network family for backbone model_type {mt!r}; supported: {known}")


def backbone_dims(config: Any) -> Dims:
    return family_for(config).dims(config)


def valid_reductions(dims: Dims, rotary: bool = False) -> list[int]:
    """Every r that divides hidden, FFN and per-head widths (and keeps rotary dims even)."""
    g = math.gcd(math.gcd(dims.hidden, dims.intermediate), dims.head_dim)
    return [r for r in range(1, g + 1) if g % r == 0 and not (rotary and (dims.head_dim // r) % 2)]


def reduced_config(config: Any, r: int, dropout: float, attention_dropout: float | None = None,
                   heads: int | None = None) -> Any:
    """A copy of the backbone's HF config at side width (the config side blocks are built from).

    Hidden, FFN and per-head dims are divided by r, the head count is kept (the paper: "same
    number of heads, per-head dim divided by r"), dropouts are set to the side dropout
    (attention-probability dropout to ``attention_dropout`` when given; ``heads`` side heads
    share the same attention width instead of the backbone's count when given), and
    ``lst_reduction_factor`` records r (T5 blocks use it to reproduce the official init).
    """
    fam = family_for(config)
    dims = fam.dims(config)
    rotary = fam.name == "llama"
    if r not in valid_reductions(dims, rotary):
        raise ValueError(
            f"r={r} does not fit the {fam.name} backbone (hidden {dims.hidden}, FFN {dims.intermediate}, "
            f"per-head dim {dims.head_dim}{', rotary needs an even side head dim' if rotary else ''}); "
            f"valid r: {valid_reductions(dims, rotary)}"
        )
    side = copy.deepcopy(config)
    pa = float(dropout if attention_dropout is None else attention_dropout)
    side_dims = dims.reduced(r, heads)
    if rotary and side_dims.head_dim % 2:
        raise ValueError(f"side_heads={heads} leaves an odd head dim {side_dims.head_dim}; rotary embeddings need it even")
    fam.shrink(side, side_dims, float(dropout), pa)
    side.lst_reduction_factor = int(r)
    side.lst_dropout = float(dropout)
    return side
