"""'backbone' side block: the backbone family's own block at width d/r (the paper's choice).

The blocks are our own modules with the HF blocks' parameter names and shapes (one file
per family), so pruning can slice backbone weights into them by name; see ``bert.py``
for why they do not call the HF classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..families import family_for
from .bert import BertBlock
from .gpt2 import GPT2Block
from .llama import LlamaBlock
from .mpnet import MPNetBlock
from .registry import register_block
from .t5 import T5Block

__all__ = ["FAMILY_BLOCKS", "backbone_block"]

FAMILY_BLOCKS: dict[str, type[nn.Module]] = {
    "bert": BertBlock,
    "mpnet": MPNetBlock,
    "t5": T5Block,
    "gpt2": GPT2Block,
    "llama": LlamaBlock,
}


@register_block("backbone")
def backbone_block(side_hf_config: Any, *, index: int, layer: int) -> nn.Module:
    cls = FAMILY_BLOCKS[family_for(side_hf_config).name]
    return cls(side_hf_config, first=(index == 0), layer=layer)
