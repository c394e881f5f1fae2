"""'mlp' side block: token-wise pre-norm MLP residual block (no attention).

The cheap baseline of the search space: it answers "how much of LST's accuracy needs
token mixing in the side network at all?"  Width ff/r like the backbone block's FFN, the
family's norm type, GELU.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..families import backbone_dims, family_for
from .base import SideBlock
from .context import BlockContext
from .dropout import Dropout
from .norms import make_norm
from .registry import register_block

__all__ = ["MLPBlock"]


class MLPBlock(SideBlock):
    def __init__(self, side_hf_config: Any) -> None:
        super().__init__()
        dims = backbone_dims(side_hf_config)  # the reduced config: side widths
        p = float(getattr(side_hf_config, "lst_dropout", 0.1))
        self.norm = make_norm(family_for(side_hf_config).norm, dims.hidden, dims.norm_eps)
        self.fc1 = nn.Linear(dims.hidden, dims.intermediate)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dims.intermediate, dims.hidden)
        self.dropout = Dropout(p)
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, 0.0, 0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden: Tensor, ctx: BlockContext) -> Tensor:
        return hidden + self.dropout(self.feed_forward(lambda x: self.fc2(self.act(self.fc1(self.norm(x)))), hidden))


@register_block("mlp")
def mlp_block(side_hf_config: Any, *, index: int, layer: int) -> nn.Module:
    return MLPBlock(side_hf_config)
