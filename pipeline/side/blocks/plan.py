"""Pruning plans: how a block's weights are sliced when it is initialised from the backbone.

A block lists its weights in the order the official ``pruning_without_residual`` walks them.
One index set (the "current" kept dims) is threaded through the walk: a norm is sliced by
it; a linear group has its input columns sliced by it and then *selects* its kept output
rows (top L1 of the elementwise product of the group's importances), which become the
current index for the next step.  Names are module paths inside the block, exactly the
HF names, so ``<backbone block prefix> + name + '.weight'`` is the backbone key.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NormStep", "AttentionStep", "LinearStep", "Step"]


@dataclass(frozen=True)
class NormStep:
    """A norm (weight, and bias if any) sliced by the current index."""

    module: str


@dataclass(frozen=True)
class AttentionStep:
    """q/k/v projections, pruned jointly.  Either three modules or one fused module
    (GPT-2's c_attn, output rows [q; k; v]).  ``transposed``: Conv1D weights ([in, out]).
    ``rotary``: keep rotate-half pairs (j, j + head_dim/2) together."""

    q: str = ""
    k: str = ""
    v: str = ""
    fused: str = ""
    transposed: bool = False
    rotary: bool = False


@dataclass(frozen=True)
class LinearStep:
    """Linear(s) sharing input and output index sets; ``out`` is 'hidden' or 'intermediate'
    (how many rows to keep).  Several modules = gated FFN (wi_0/wi_1, gate_proj/up_proj)."""

    modules: tuple[str, ...]
    out: str
    transposed: bool = False


Step = NormStep | AttentionStep | LinearStep
