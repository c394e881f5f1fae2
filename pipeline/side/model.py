"""LadderSideNetwork: the LST side network for encoder and decoder-only backbones.

It reads the backbone only through its taps (tap 0 = embedding output, tap b = block b's
output on the residual stream), so it trains from an activation cache as well as beside
a live backbone.  Structure and init follow the official ``modeling_side_t5.py``:

    tap_b = tap_b * (1 + s * N(0, 1))                        # training only, with --tap-noise s > 0
    h = Down_0(dropout(tap_0))                               # first side state
    for each kept block b (1-based, backbone order):
        mu = sigmoid(alpha_b / T)                            # 'learnable' (alpha=0 -> 0.5)
        h  = mu * h + (1 - mu) * Down_b(tap_b)               # 'sum': h + Down_b(tap_b)
        h  = SideBlock_b(h)                                  # 'none': no ladder here
    h = dropout(FinalNorm(h)); h = Up(h)                     # Up: d/r -> d, with bias
    logits = Head(pool(h))                                   # computed as Head(Up(pool(h))): same value

Ladders, Up and the head are ``Linear`` with N(0, 0.01) weights and zero bias (the
official ``_init_weights`` branch for every non-T5 ``nn.Linear``).  Ladder b reads block
b's *output*: in the official loop backbone block i runs first and its output is mixed
into the side state right before side block i.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import build_block, make_context
from .blocks.dropout import Dropout, checkpoint
from .blocks.norms import make_norm
from .config import SideConfig
from .families import backbone_dims, family_for, reduced_config
from .packed import PackedTap, apply_ladder, packed_dropout, tap_noise
from .pooling import pool

__all__ = ["LadderSideNetwork", "LADDER_INIT_STD"]

LADDER_INIT_STD = 0.01


def _linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=True)
    nn.init.normal_(lin.weight, 0.0, LADDER_INIT_STD)
    nn.init.zeros_(lin.bias)
    return lin


class LadderSideNetwork(nn.Module):
    """Side network for ``backbone_config`` shaped by ``config``.

    ``forward(taps, attention_mask)`` takes the taps listed by ``required_taps()``, in
    that order, each [B, L, d] or a :class:`PackedTap` of its real rows (cast to the side
    network's dtype), and a [B, L] mask
    (1 = real token, right padding); it returns logits [B, num_labels] (regression: [B, 1]).
    """

    #: recompute each block in the backward (``TrainConfig.recompute``): a training setting, not
    #: part of the architecture, so it is not in ``SideConfig``
    recompute: bool = False

    def __init__(self, config: SideConfig, backbone_config: Any) -> None:
        super().__init__()
        self.config = config.resolved(backbone_config)
        self.backbone_config = backbone_config
        self.family = family_for(backbone_config)
        self.dims = backbone_dims(backbone_config)
        self.side_hf_config = reduced_config(backbone_config, self.config.r, self.config.dropout,
                                             self.config.attention_dropout, self.config.side_heads)
        self.side_dims = self.dims.reduced(self.config.r, self.config.side_heads)
        self.layers: list[int] = list(self.config.layers or [])
        d, ds = self.dims.hidden, self.side_dims.hidden

        self.tap_dropout = Dropout(self.config.dropout)
        self.ladders = nn.ModuleDict({str(t): _linear(d, ds) for t in self.required_taps()})
        if self.config.gate == "learnable":
            self.gate_alpha = nn.Parameter(torch.full((len(self.layers),), float(self.config.gate_alpha_init)))
        else:
            self.register_parameter("gate_alpha", None)
        self.blocks = nn.ModuleDict(
            {
                str(b): build_block(self.config.block, self.side_hf_config, index=j, layer=b)
                for j, b in enumerate(self.layers)
            }
        )
        self.final_norm = make_norm(self.family.norm, ds, self.side_dims.norm_eps)
        self.dropout = Dropout(self.config.dropout)
        self.upsample = _linear(ds, d)
        out = self.config.num_labels if self.config.task_type == "classification" else 1
        if self.config.head == "lm":
            if not self.family.causal:
                raise ValueError(f"head='lm' scores label words with a decoder-only LM head; the {self.family.name} "
                                 "backbone has none here (T5 scores them with its side decoder)")
            # the frozen LM head's rows of the label words' first tokens (``set_label_head``)
            self.register_buffer("label_head", torch.zeros(out, d))
            self.head = None
        else:
            self.head = _linear(d, out)

    # -- what the reader must load ---------------------------------------------------------
    def required_taps(self) -> list[int]:
        """Tap indices the forward consumes, in order: 0 plus every kept block (only 0 for
        gate='none', whose kept blocks take no ladder input)."""
        return [0] if self.config.gate == "none" else [0, *self.layers]

    #: taps may come as :class:`PackedTap` (the reader then skips the padding)
    accepts_packed_taps = True

    def required_decoder_taps(self) -> list[int]:
        """None: only the T5 label scorer reads decoder taps (same interface, so callers never ask
        which kind of side network they hold)."""
        return []

    # -- forward ----------------------------------------------------------------------------
    def gate_values(self) -> Tensor:
        """mu per kept block (1.0 = side state only); meaningful for gate='learnable'."""
        if self.gate_alpha is None:
            return torch.ones(len(self.layers))
        return torch.sigmoid(self.gate_alpha / self.config.gate_T)

    def encode(self, taps: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
        """Side states after the final norm, dropout and upsample: [B, L, d]."""
        return self.upsample(self.side_states(taps, attention_mask))

    def side_states(self, taps: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
        """Side states after the final norm and dropout, before the upsample: [B, L, d/r]."""
        need = self.required_taps()
        if len(taps) != len(need):
            raise ValueError(f"expected {len(need)} taps (indices {need}, in that order), got {len(taps)}")
        dtype = self.upsample.weight.dtype  # a cache may decode to bf16; compute in the side's dtype
        ctx = make_context(attention_mask, self.family.causal, dtype)
        if self.training and self.config.tap_noise > 0:
            taps = [tap_noise(t, self.config.tap_noise, dtype) for t in taps]
        t0 = taps[0]
        if isinstance(t0, PackedTap):
            t0 = packed_dropout(t0, self.tap_dropout.p, self.tap_dropout.training, dtype)
        else:
            t0 = self.tap_dropout(t0.to(dtype))
        h = apply_ladder(self.ladders["0"], t0, dtype)
        gates = self.gate_values().to(dtype) if self.gate_alpha is not None else None
        for j, b in enumerate(self.layers):
            if self.config.gate != "none":
                ladder = apply_ladder(self.ladders[str(b)], taps[j + 1], dtype)
                h = gates[j] * h + (1 - gates[j]) * ladder if gates is not None else h + ladder
            h = self._block(self.blocks[str(b)], h, ctx)
        return self.dropout(self.final_norm(h))

    def _block(self, block: nn.Module, h: Tensor, ctx: Any) -> Tensor:
        """One side block; with ``recompute`` only its input is kept for the backward, which reruns it.

        A side block's saved activations (q/k/v, attention output, norms, the 4x-wide FFN) are ~19
        widths per token against the one width kept here, and they set a cached run's peak memory.
        The rerun restores the RNG state, so its dropout draws, and the gradients, are the same."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, ctx)
        return block(h, ctx)

    def set_label_head(self, rows: Tensor) -> None:
        """Install the frozen LM-head rows [num_labels, d] of the label words (head='lm')."""
        if self.head is not None:
            raise ValueError("set_label_head is for head='lm'")
        if tuple(rows.shape) != tuple(self.label_head.shape):
            raise ValueError(f"label head rows {tuple(rows.shape)}, expected {tuple(self.label_head.shape)}")
        self.label_head.copy_(rows.detach())

    def forward(self, taps: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
        # Pool, then upsample: the upsample is linear (and every pooling an average or a pick of
        # token rows), so this equals pooling the upsampled states, without the [B, L, d] tensor.
        pooled = self.upsample(pool(self.side_states(taps, attention_mask), attention_mask, self.config.pooling))
        if self.head is None:
            return F.linear(pooled, self.label_head.to(pooled.dtype))
        return self.head(pooled)

    def training_loss(self, taps: Sequence[Tensor], attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.loss(self(taps, attention_mask), labels)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy (classification) or MSE on the single output (regression)."""
        if self.config.task_type == "classification":
            return F.cross_entropy(logits, labels.long())
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))

    # -- bookkeeping --------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
