"""The side-block interface."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .context import BlockContext
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

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def pruning_plan(self) -> list[Step] | None:
        return None
