"""Ladder side networks (LST) trained from backbone taps.

    SideConfig            -- one variant (config.py)
    LadderSideNetwork     -- encoder / decoder-only side network (model.py)
    initialise_side       -- random / magnitude / Fisher pruning init from the init pack (init.py)
    count_parameters      -- per-component counts (params.py)
    T5LadderSideModel     -- the official T5 encoder-decoder LST (t5.py)
    T5LabelScorer         -- it, trained and evaluated on cached label-word targets (seq2seq.py)
    register_block        -- add a side-block type (blocks/)
"""

from __future__ import annotations

from pipeline.lazy import lazy_getattr

# Imported on first use, so `import pipeline.<pkg>.config` (the CLI's --help) stays free of torch.
_LAZY = {
    "available_blocks": "blocks",
    "build_block": "blocks",
    "register_block": "blocks",
    "SideConfig": "config",
    "backbone_dims": "families",
    "family_for": "families",
    "reduced_config": "families",
    "initialise_side": "init",
    "select_indices": "init",
    "slice_block_state": "init",
    "LadderSideNetwork": "model",
    "count_parameters": "params",
    "side_parameter_breakdown": "params",
    "pool": "pooling",
    "T5LabelScorer": "seq2seq",
    "T5LadderSideModel": "t5",
    "from_official_layers": "t5",
    "initialise_t5_side": "t5",
    "t5_side_parameter_count": "t5",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
