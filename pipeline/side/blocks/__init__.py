"""Side blocks: the registry plus the built-in block types ('backbone', 'mlp')."""

from .base import SideBlock
from .context import BlockContext, make_context
from .plan import AttentionStep, LinearStep, NormStep, Step
from .registry import available_blocks, build_block, register_block

from . import backbone as _backbone  # noqa: E402,F401  (registers 'backbone')
from . import mlp as _mlp  # noqa: E402,F401  (registers 'mlp')

__all__ = [
    "SideBlock",
    "BlockContext",
    "make_context",
    "AttentionStep",
    "LinearStep",
    "NormStep",
    "Step",
    "available_blocks",
    "build_block",
    "register_block",
]
