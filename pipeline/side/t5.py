"""LST for T5 encoder-decoder backbones, as the official ``modeling_side_t5.py``.

Two side stacks at width d/r.  The side encoder reads the backbone encoder's taps; the
side decoder reads the backbone decoder's taps (tap 0 = decoder input embeddings, tap b =
decoder block b's output) and cross-attends to the side encoder's output (after its final
norm).  Each stack: a first ladder on tap 0, a ladder per kept block, one learnable gate
scalar per *backbone* block (the official ParameterList spans all blocks, kept or not), a
relative-position bias in its first side block, a final side norm.  Then an upsample
d/r -> d with bias, a d_model^-0.5 rescale (when the embeddings are tied, as T5 v1.0), and
the backbone's frozen LM head (a buffer: not trained, not counted).

Layer lists here are 1-based like ``SideConfig.layers``; ``from_official_layers`` turns the
official 0-based lists (``encoder_side_layers``) into ours.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import make_context
from .blocks.context import mask_bias
from .blocks.dropout import Dropout
from .blocks.norms import RMSNorm
from .blocks.t5 import T5Block
from .config import GATES
from .families import backbone_dims, family_for, reduced_config
from .init import (
    find_root,
    initial_index,
    prune_stack_into,
    ranking_source,
    slice_norm_into,
    _block_state,
)
from .model import LADDER_INIT_STD

__all__ = [
    "T5SideStack",
    "T5LadderSideModel",
    "t5_side_parameter_count",
    "from_official_layers",
    "initialise_t5_side",
]


def from_official_layers(layers: Sequence[int]) -> list[int]:
    """Official 0-based side-layer ids (``i in side_layers`` over ``range(num_layers)``) -> 1-based."""
    return [int(i) + 1 for i in layers]


def _linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=True)  # official: add_bias_sampling=True
    nn.init.normal_(lin.weight, 0.0, LADDER_INIT_STD)
    nn.init.zeros_(lin.bias)
    return lin


def _check_layers(layers: Sequence[int], n: int, what: str) -> list[int]:
    layers = list(layers)
    if not layers or any(not 1 <= b <= n for b in layers) or layers != sorted(set(layers)):
        raise ValueError(f"{what} layers {layers} invalid: need increasing 1-based indices within 1..{n}")
    return layers


class T5SideStack(nn.Module):
    """The side half of one official ``T5Stack``."""

    def __init__(self, side_hf: Any, d_model: int, n_layers: int, layers: Sequence[int], *, is_decoder: bool,
                 gate: str = "learnable", gate_T: float = 0.1, gate_alpha_init: float = 0.0, dropout: float = 0.1) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate {gate!r} is not one of {GATES}")
        ds = side_hf.d_model
        self.is_decoder, self.gate, self.gate_T = is_decoder, gate, gate_T
        self.layers = _check_layers(layers, n_layers, "decoder" if is_decoder else "encoder")
        self.dropout = Dropout(dropout)
        self.first_ladder = _linear(d_model, ds)
        self.ladders = nn.ModuleDict({str(b): _linear(d_model, ds) for b in self.layers} if gate != "none" else {})
        self.gate_alpha = nn.Parameter(torch.full((n_layers,), float(gate_alpha_init))) if gate == "learnable" else None
        self.blocks = nn.ModuleDict(
            {str(b): T5Block(side_hf, first=(j == 0), layer=b, is_decoder=is_decoder) for j, b in enumerate(self.layers)}
        )
        self.final_norm = RMSNorm(ds, side_hf.layer_norm_epsilon)

    def required_taps(self) -> list[int]:
        return [0] if self.gate == "none" else [0, *self.layers]

    def forward(self, taps: Sequence[Tensor], mask: Tensor, encoder_hidden: Tensor | None = None,
                encoder_mask: Tensor | None = None) -> Tensor:
        need = self.required_taps()
        if len(taps) != len(need):
            raise ValueError(f"expected {len(need)} taps (indices {need}), got {len(taps)}")
        dtype = taps[0].dtype
        ctx = make_context(mask, causal=self.is_decoder, dtype=dtype)
        if self.is_decoder:
            if encoder_hidden is None or encoder_mask is None:
                raise ValueError("the side decoder needs the side encoder's output and mask")
            ctx.encoder_hidden = encoder_hidden
            ctx.encoder_bias = mask_bias(encoder_mask, dtype, causal=False, query_len=1)
        h = self.first_ladder(self.dropout(taps[0]))
        for j, b in enumerate(self.layers):
            if self.gate != "none":
                ladder = self.ladders[str(b)](taps[j + 1])
                if self.gate_alpha is not None:
                    mu = torch.sigmoid(self.gate_alpha[b - 1] / self.gate_T).to(dtype)
                    h = mu * h + (1 - mu) * ladder
                else:
                    h = h + ladder
            h = self.blocks[str(b)](h, ctx)
        return self.dropout(self.final_norm(h))


class T5LadderSideModel(nn.Module):
    """Side encoder + side decoder + upsample + frozen LM head for a T5 backbone."""

    def __init__(self, t5_config: Any, r: int = 8, encoder_layers: Sequence[int] | None = None,
                 decoder_layers: Sequence[int] | None = None, *, gate: str = "learnable", gate_T: float = 0.1,
                 gate_alpha_init: float = 0.0, dropout: float = 0.1, attention_dropout: float | None = None) -> None:
        super().__init__()
        if family_for(t5_config).name != "t5":
            raise ValueError(f"T5LadderSideModel needs a T5 config, got model_type {t5_config.model_type!r}")
        self.t5_config = t5_config
        self.family = family_for(t5_config)
        self.dims = backbone_dims(t5_config)
        self.side_dims = self.dims.reduced(r)
        self.side_hf_config = reduced_config(t5_config, r, dropout, attention_dropout)
        n_enc = t5_config.num_layers
        n_dec = t5_config.num_decoder_layers if t5_config.num_decoder_layers is not None else n_enc
        enc = list(encoder_layers) if encoder_layers is not None else list(range(1, n_enc + 1))
        # official scripts pass the same list to encoder_side_layers and decoder_side_layers
        dec = list(decoder_layers) if decoder_layers is not None else (enc if encoder_layers is not None else list(range(1, n_dec + 1)))
        kw = dict(gate=gate, gate_T=gate_T, gate_alpha_init=gate_alpha_init, dropout=dropout)
        d = t5_config.d_model
        self.encoder = T5SideStack(self.side_hf_config, d, n_enc, enc, is_decoder=False, **kw)
        self.decoder = T5SideStack(self.side_hf_config, d, n_dec, dec, is_decoder=True, **kw)
        self.upsample = _linear(self.side_dims.hidden, d)
        self.scale = d**-0.5 if getattr(t5_config, "tie_word_embeddings", True) else 1.0
        self.register_buffer("lm_head", torch.zeros(0, d), persistent=False)

    def set_lm_head(self, weight: Tensor, token_ids: Sequence[int] | None = None) -> None:
        """Install the frozen LM head ([vocab, d], e.g. 'lm_head.weight' or the tied
        'shared.weight' from the init pack); ``token_ids`` keeps only those rows (label
        tokens), so logits come out over them in that order."""
        w = weight.detach()
        if token_ids is not None:
            w = w[torch.as_tensor(list(token_ids), dtype=torch.long)]
        self.lm_head = w.to(self.upsample.weight.dtype).clone()

    def forward(self, encoder_taps: Sequence[Tensor], encoder_mask: Tensor,
                decoder_taps: Sequence[Tensor], decoder_mask: Tensor) -> Tensor:
        """Logits [B, L_dec, vocab (or len(token_ids))]."""
        return self.decode(self.encoder(encoder_taps, encoder_mask), encoder_mask, decoder_taps, decoder_mask)

    def decode(self, side_encoder_out: Tensor, encoder_mask: Tensor, decoder_taps: Sequence[Tensor],
               decoder_mask: Tensor) -> Tensor:
        """Logits from the side encoder's output (``self.encoder(...)``): the encoder runs once
        when several decoder inputs (candidates, generation steps) share it."""
        if self.lm_head.numel() == 0:
            raise ValueError("no LM head installed: call set_lm_head(init_pack['lm_head.weight'] ...) first")
        dec = self.decoder(decoder_taps, decoder_mask, side_encoder_out, encoder_mask)
        return F.linear(self.upsample(dec) * self.scale, self.lm_head)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def t5_side_parameter_count(t5_config: Any, r: int, layers: Sequence[int] | None = None, **kw: Any) -> int:
    """Trainable side parameters (frozen LM head excluded) of the official LST on T5, with
    ``layers`` (1-based) kept in both stacks; built on the meta device, so no memory."""
    with torch.device("meta"):
        model = T5LadderSideModel(t5_config, r, layers, layers, **kw)
    return model.trainable_parameters()


def initialise_t5_side(model: T5LadderSideModel, init: str, init_pack_state: Mapping[str, Tensor] | None = None,
                       importance: Mapping[str, Tensor] | None = None, *, attention_selection: str = "per_head") -> dict:
    """Pruning init of both side stacks in the official order: shared embedding -> encoder
    blocks -> encoder final norm -> decoder blocks (the decoder walk continues with the
    index the encoder left: the official code copies decoder embeddings without re-choosing
    it) -> decoder final norm."""
    imp = ranking_source(init, init_pack_state, importance)
    if imp is None:
        return {"init": "random"}
    fam, full, side = model.family, model.dims, model.side_dims
    enc_plan = next(iter(model.encoder.blocks.values())).pruning_plan()
    dec_plan = next(iter(model.decoder.blocks.values())).pruning_plan()
    root = find_root(init_pack_state, "encoder.", fam.layer_template, enc_plan)
    first_imp = _block_state(imp, root + "encoder.block.0.")
    index, source = initial_index(imp, root, fam.embedding_keys, first_imp, enc_plan, side.hidden)
    enc_blocks = {int(b): m for b, m in model.encoder.blocks.items()}
    index = prune_stack_into(enc_blocks, init_pack_state, imp, enc_plan, root + "encoder.", fam.layer_template,
                             full.layers, index, full, side, attention_selection)
    slice_norm_into(model.encoder.final_norm, init_pack_state, root + "encoder.final_layer_norm.", index)
    n_dec = model.t5_config.num_decoder_layers or full.layers
    dec_blocks = {int(b): m for b, m in model.decoder.blocks.items()}
    index = prune_stack_into(dec_blocks, init_pack_state, imp, dec_plan, root + "decoder.", fam.layer_template,
                             n_dec, index, full, side, attention_selection)
    slice_norm_into(model.decoder.final_norm, init_pack_state, root + "decoder.final_layer_norm.", index)
    return {"init": init, "root": root, "first_index_from": source}
