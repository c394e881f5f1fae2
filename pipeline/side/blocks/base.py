"""The side-block interface."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from .context import BlockContext
from .dropout import checkpoint
from .plan import Step

__all__ = ["SideBlock"]


class SideBlock(nn.Module):
    """``forward(hidden [B, L, d_side], ctx) -> [B, L, d_side]``.

    ``pruning_plan()`` returns the slicing walk for pruning-based init, or None when the
    block has no backbone counterpart (then only init='random' applies).
    ``shared_sources`` maps a parameter of this block to a backbone key, relative to the
    stack (``encoder.``, ``decoder.`` or the model root for decoders), that is copied as is (e.g. the T5/MPNet relative-position bias, whose shape is [buckets,
    heads] and so does not shrink), used only when the block has that parameter.
    """

    shared_sources: ClassVar[dict[str, str]] = {}

    #: keep only the feed-forward sublayer's input for the backward and rerun the sublayer there
    #: (``TrainConfig.recompute='ffn'``, the default): a training setting, not part of the architecture
    recompute_ffn: bool = False

    def feed_forward(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)``: the block's feed-forward sublayer (its norm where the block is pre-norm, the
        4x-wide inner layer, its activation and the projection back).

        Its activations are the widest a side block keeps for the backward (two or three tensors
        4 widths wide per token, against ~9 widths for the rest of the block), and rerunning it costs
        its forward once more (two small GEMMs and an activation: ~5-15% of a MiniLM side epoch). The
        rerun restores the RNG state (T5 drops out inside the sublayer), so the values, dropout draws
        and gradients are the same bit for bit."""
        if self.recompute_ffn and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x)
        return fn(x)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def pruning_plan(self) -> list[Step] | None:
        return None
