"""Ladder side networks (LST) trained from backbone taps.

    SideConfig            -- one variant (config.py)
    LadderSideNetwork     -- encoder / decoder-only side network (model.py)
    initialise_side       -- random / magnitude / Fisher pruning init from the init pack (init.py)
    count_parameters      -- per-component counts (params.py)
    T5LadderSideModel     -- the official T5 encoder-decoder LST (t5.py)
    T5LabelScorer         -- it, trained and evaluated on cached label-word targets (seq2seq.py)
    register_block        -- add a side-block type (blocks/)
"""

from .blocks import available_blocks, build_block, register_block
from .config import SideConfig
from .families import backbone_dims, family_for, reduced_config
from .init import initialise_side, select_indices, slice_block_state
from .model import LadderSideNetwork
from .params import count_parameters, side_parameter_breakdown
from .pooling import pool
from .seq2seq import T5LabelScorer
from .t5 import T5LadderSideModel, from_official_layers, initialise_t5_side, t5_side_parameter_count

__all__ = [
    "SideConfig",
    "LadderSideNetwork",
    "initialise_side",
    "select_indices",
    "slice_block_state",
    "count_parameters",
    "side_parameter_breakdown",
    "T5LadderSideModel",
    "T5LabelScorer",
    "initialise_t5_side",
    "t5_side_parameter_count",
    "from_official_layers",
    "available_blocks",
    "build_block",
    "register_block",
    "backbone_dims",
    "family_for",
    "reduced_config",
    "pool",
]
